"""PCGrad, projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl.combiners.base import Combiner, normalised


class PCGrad(Combiner):
    """d = mean_i g_i', g_i' = g_i projected in turn on the normal plane of each conflicting g_j.

    For each i, over the other tasks j in a random order: if g_i'ᵀg_j < 0 then
    g_i' ← g_i' − (g_i'ᵀg_j/‖g_j‖²) g_j, against the original g_j (Yu et al., 2020, Alg. 1).
    Each g_i' is tracked as coefficients on the rows of G, so only A is needed. The orders come from
    the `generator` passed to the call (torch's default CPU generator when None): a K×K block of
    uniform keys drawn on the generator's device, task i visiting the others by increasing key.
    """

    def weights(self, gramian: Tensor, generator: torch.Generator | None = None) -> Tensor:
        gramian, _ = normalised(gramian)
        size = gramian.shape[0]
        device = generator.device if generator is not None else torch.device("cpu")
        keys = torch.rand(size, size, generator=generator, device=device, dtype=gramian.dtype)
        if keys.device != gramian.device:
            # Through pinned memory the copy is asynchronous: no host synchronisation on a GPU.
            keys = keys.pin_memory().to(gramian.device, non_blocking=True)
        keys.fill_diagonal_(2.0)  # sorts each task itself last, out of its own order
        orders = keys.argsort(dim=1)[:, : size - 1]

        rows = torch.arange(size, device=gramian.device)
        squared_norms = gramian.diagonal()
        coefficients = torch.eye(size, dtype=gramian.dtype, device=gramian.device)
        for position in range(size - 1):
            other = orders[:, position]
            products = (coefficients * gramian[other]).sum(1)  # g_i'ᵀg_j for each i and its j
            conflict = products < 0
            shift = products / squared_norms[other].clamp(min=torch.finfo(gramian.dtype).tiny)
            coefficients[rows, other] -= torch.where(conflict, shift, torch.zeros_like(shift))
        return coefficients.mean(0)
