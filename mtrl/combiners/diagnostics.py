"""Conflict statistics of one network's per-task gradients, and how the combined update relates to them.

Logged every `combiner.diagnostics_every` updates under `combiner/<network>/`; the metrics are
defined in docs/combiners.md#diagnostics.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gradient_diagnostics(network: str, matrix: Tensor, update: Tensor, weights: Tensor | None) -> dict[str, Tensor]:
    """Metrics of the per-task gradients `matrix` [K, n], the update `update` [n] and its task `weights` [K]."""
    norms = matrix.norm(dim=1)
    unit = matrix / norms.clamp_min(1e-12)[:, None]
    cos = unit @ unit.T
    k = matrix.shape[0]
    if k > 1:  # statistics of the K(K-1) ordered pairs i != j, by masks rather than indexing: fixed shapes
        pairs = k * (k - 1)
        other = ~torch.eye(k, dtype=torch.bool, device=matrix.device)
        cos_mean = torch.where(other, cos, 0.0).sum() / pairs
        cos_min = torch.where(other, cos, torch.inf).amin()
        conflict_share = ((cos < 0) & other).float().sum() / pairs
    else:  # one task: nothing conflicts
        cos_mean = cos_min = cos.new_ones(())
        conflict_share = cos.new_zeros((), dtype=torch.float32)
    mean_grad = matrix.mean(0)
    angle = torch.rad2deg(
        torch.arccos(torch.clamp(update @ mean_grad / (update.norm() * mean_grad.norm()).clamp_min(1e-12), -1.0, 1.0))
    )
    out = {
        f"combiner/{network}/cos_mean": cos_mean,
        f"combiner/{network}/cos_min": cos_min,
        f"combiner/{network}/conflict_share": conflict_share,
        f"combiner/{network}/grad_norm": norms,
        f"combiner/{network}/update_angle_deg": angle,
        f"combiner/{network}/update_norm": update.norm(),
    }
    if weights is not None:
        out[f"combiner/{network}/weights"] = weights
    return out
