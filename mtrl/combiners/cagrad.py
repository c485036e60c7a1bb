"""CAGrad, conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl.combiners import mtrl_recipe
from mtrl.combiners.base import (
    Combiner,
    HyperParameters,
    check_choice,
    check_number,
    hyper_parameter,
    normalised,
    rescale_divisor,
)
from mtrl.combiners.simplex import SimplexProgram, minimize_on_simplex

SOLVERS = ("exact", "mtrl")

DEGENERATE_NORM = 1e-6
"""‖g_w*‖ below this (relative to the RMS task-gradient norm) means 0 ∈ conv{g_i}: g_w* has no direction."""


@dataclass(frozen=True)
class CAGradParameters(HyperParameters):
    c: float = hyper_parameter(0.4, "radius of the ball around g0 the update stays in, relative to ‖g0‖; >= 0")
    rescale: int = hyper_parameter(1, "final divisor 0 | 1 | 2: none, 1 + c², 1 + c")
    solver: str = hyper_parameter("exact", "exact | mtrl (the authors' Meta-World recipe)")

    def __post_init__(self) -> None:
        self._store("c", check_number("c", self.c, low=0.0))
        self._store("rescale", int(check_choice("rescale", self.rescale, (0, 1, 2))))
        check_choice("solver", self.solver, SOLVERS)


class CAGrad(Combiner):
    """max_d min_i g_iᵀd s.t. ‖d − g0‖ ≤ c‖g0‖ (Liu et al., 2021, Eq. 2), through its dual on the simplex.

    w* = argmin_{w∈Δ} g_wᵀg0 + c‖g0‖·‖g_w‖ (their Eq. 3) and d = (g0 + c‖g0‖/‖g_w*‖ · g_w*) / r, so the
    effective weights are (1/K + λw*)/r with λ = c‖g0‖/‖g_w*‖. If ‖g_w*‖ = 0 (0 ∈ conv{g_i}, the
    dual does not fix a direction) λ is taken as 0 and d = g0/r.

    `solver="exact"` solves the dual to convergence; `solver="mtrl"` is the authors' Meta-World recipe
    (docs/combiners.md#cagrad), which divides by 1 + c², i.e. `rescale=1`.
    """

    Parameters = CAGradParameters
    parameters: CAGradParameters

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        p = self.parameters
        dual, scale = self._exact(gramian) if p.solver == "exact" else self._recipe(gramian)
        return (1.0 / size + scale * dual) / rescale_divisor(p.c, p.rescale)

    def _exact(self, gramian: Tensor) -> tuple[Tensor, Tensor]:
        """(w*, λ) from the dual solved to convergence (the dual and λ are invariant to A's scale)."""
        gramian, _ = normalised(gramian)
        size = gramian.shape[0]
        mean_products = gramian.mean(1)  # g_wᵀg0 = wᵀ(A1/K)
        radius = self.parameters.c * mean_products.mean().clamp(min=0).sqrt()  # c‖g0‖
        dual = minimize_on_simplex(SimplexProgram(size, mean_products, root_weight=radius, root_matrix=gramian))
        return dual, conflict_averse_scale(gramian, dual, radius)

    def _recipe(self, gramian: Tensor) -> tuple[Tensor, Tensor]:
        """(w, λ) by the authors' recipe: SGD on softmax logits of the scaled dual (docs/combiners.md#cagrad)."""
        scaled = mtrl_recipe.ScaledGramian.of(gramian)
        radius = self.parameters.c * (scaled.mean + mtrl_recipe.EPSILON).sqrt()

        def objective(logits: Tensor) -> tuple[Tensor, Tensor]:
            w = logits.softmax(0)
            pulled = scaled.matrix @ w
            root = (w @ pulled + mtrl_recipe.EPSILON).sqrt()
            value = w @ scaled.row_means + radius * root
            by_weight = scaled.row_means + radius * pulled / root
            return value, w * (by_weight - w @ by_weight)  # chain rule through the softmax

        size = gramian.shape[0]
        logits = mtrl_recipe.best_of_momentum_sgd(gramian.new_zeros(size), objective, mtrl_recipe.learning_rate(size))
        w = logits.softmax(0)
        root = (w @ scaled.matrix @ w + mtrl_recipe.EPSILON).sqrt()
        return w, radius / (root + mtrl_recipe.EPSILON)


def conflict_averse_scale(gramian: Tensor, dual: Tensor, radius: Tensor) -> Tensor:
    """λ = c‖g0‖/‖g_w‖ with A normalised to unit mean diagonal; 0 when g_w vanishes."""
    norm = (dual @ gramian @ dual).clamp(min=0).sqrt()
    return torch.where(norm > DEGENERATE_NORM, radius / norm.clamp(min=DEGENERATE_NORM), torch.zeros_like(norm))
