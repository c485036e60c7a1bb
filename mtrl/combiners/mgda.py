"""MGDA (Désidéri, 2012; Sener & Koltun, NeurIPS 2018): the min-norm point of the convex hull of the g_i."""

from __future__ import annotations

from torch import Tensor

from mtrl.combiners.base import Combiner, normalised
from mtrl.combiners.simplex import SimplexProgram, minimize_on_simplex


class MGDA(Combiner):
    """d = g_w*, w* = argmin_{w∈Δ} wᵀAw (docs/combiners.md#mgda)."""

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        return min_norm_weights(normalised(gramian)[0])


def min_norm_weights(gramian: Tensor) -> Tensor:
    """argmin_{w∈Δ} ½wᵀAw; the objective is scale-free, so A may be normalised."""
    size = gramian.shape[0]
    return minimize_on_simplex(SimplexProgram(size, gramian.new_zeros(size), quadratic=gramian))
