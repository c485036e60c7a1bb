"""Aligned-MTL, independent component alignment for multi-task learning (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl.combiners.base import Combiner, HyperParameters, check_choice, hyper_parameter

SCALES = ("min", "median", "rmse")

RANK_TOLERANCE = torch.finfo(torch.float32).eps
"""Eigenvalues of A at or below λ_max·K·this are dropped as zero: the rounding of a Gramian of float32
gradients (what training computes), whatever G's dtype."""


@dataclass(frozen=True)
class AlignedMTLParameters(HyperParameters):
    scale: str = hyper_parameter(
        "min", "length of the aligned principal directions: min | median | rmse (√ of the smallest, median, mean λ)"
    )

    def __post_init__(self) -> None:
        check_choice("scale", self.scale, SCALES)


class AlignedMTL(Combiner):
    """d = Gᵀ B u with B = √λ_s · V Λ^(−1/2) Vᵀ, A = VΛVᵀ, u = 1/K (Senushkin et al., 2023, Alg. 1;
    docs/combiners.md#aligned-mtl).

    With G = V Σ Uᵀ (Σ = Λ^(1/2)), d = √λ_s·U Vᵀu: every principal direction of G gets the same
    length √λ_s, so the update's system has condition number one. λ_s is the smallest kept eigenvalue
    (`scale="min"`, the paper's), their lower median, or their mean (`"rmse"`). The eigen-decomposition
    is in float64; eigenvalues at or below λ_max·K·eps_float32 are dropped (the rank of G). When none
    is kept (G = 0) the weights are u, as in TorchJD.
    """

    Parameters = AlignedMTLParameters
    parameters: AlignedMTLParameters

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        uniform = gramian.new_full((size,), 1.0 / size)
        # A non-finite Gramian (an update the trainer skips) would stop the eigen-solver.
        finite = torch.isfinite(gramian).all()
        values, vectors = torch.linalg.eigh(torch.where(finite, gramian, torch.zeros_like(gramian)))  # ascending
        kept = values > values[-1] * size * RANK_TOLERANCE
        rank = kept.sum()
        inverse_root = torch.where(kept, values.clamp(min=torch.finfo(values.dtype).tiny).rsqrt(), 0.0)
        balance = (vectors * inverse_root) @ vectors.mT * self._level(values, kept, rank).sqrt()
        weights = torch.where(rank > 0, balance @ uniform, uniform)
        return torch.where(finite, weights, torch.full_like(weights, torch.nan))

    def _level(self, values: Tensor, kept: Tensor, rank: Tensor) -> Tensor:
        """λ_s over the kept eigenvalues (the last `rank` of the ascending `values`)."""
        scale = self.parameters.scale
        if scale == "min":
            return torch.where(kept, values, torch.inf).amin()
        if scale == "median":
            # torch.median's lower median of the kept ones, as in TorchJD.
            index = values.shape[0] - rank + (rank - 1).clamp(min=0) // 2
            return values.gather(0, index.clamp(max=values.shape[0] - 1).view(1)).squeeze(0)
        return torch.where(kept, values, 0.0).sum() / rank.clamp(min=1)
