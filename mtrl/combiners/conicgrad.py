"""ConicGrad (Hassanpour et al., 2025): the best worst-task gain inside a cone around g0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl.combiners.base import Combiner, HyperParameters, check_number, hyper_parameter, normalised
from mtrl.combiners.simplex import SimplexProgram, minimize_on_simplex

NO_COMMON_ASCENT = 1e-10
"""σ* (and ‖g0‖) at or below this, relative to the RMS task-gradient norm, count as 0: then d = g0."""


@dataclass(frozen=True)
class ConicGradParameters(HyperParameters):
    c: float = hyper_parameter(0.5, "cosine of the cone's half-angle around g0, in (0, 1]; 1 gives g0")

    def __post_init__(self) -> None:
        self._store("c", check_number("c", self.c, low=0.0, high=1.0, low_open=True))


class ConicGrad(Combiner):
    """max_d min_i g_iᵀd s.t. ‖d‖ ≤ 1 and g0ᵀd ≥ c‖g0‖‖d‖; the update is ‖g0‖·d* (docs/combiners.md#conicgrad).

    The dual is w* = argmin_{w∈Δ} σ(g_w), σ the support function of the cone (half-angle
    arccos c) cut by the unit ball. σ is only C¹ where g_w crosses the cone's surface, so it is
    rewritten as a norm: where σ > 0 the maximising d is a unit vector, so σ is also the support
    function of the ball cut by the half-space ĝ0ᵀd ≥ c (the convex hull of the cone's unit cap),
    whose Lagrangian dual is
        σ(g) = min_{η≥0} ‖g + ηĝ0‖ − cη,   maximised by d* = (g + η*ĝ0)/‖g + η*ĝ0‖.
    So (w*, η*) = argmin_{w∈Δ, η≥0} ‖g_w + ηĝ0‖ − cη, a norm of the rows of G extended by ĝ0 (only
    A is needed), solved exactly as a second-order cone program. η* = 0 exactly when g_w* lies in
    the cone (then d* = ĝ_w*); otherwise d* is on the cone's surface, c·ĝ0 + sqrt(1 − c²)·û with û
    the unit component of g_w* orthogonal to g0. When the optimal value is ≤ 0 no direction in the
    cone helps every task and d = g0; c = 1 (the cone is the ray of g0) gives g0.
    """

    Parameters = ConicGradParameters
    parameters: ConicGradParameters

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        gramian, _ = normalised(gramian)
        size = gramian.shape[0]
        c = self.parameters.c
        uniform = torch.full_like(gramian[0], 1.0 / size)
        if c == 1.0:
            return uniform
        mean_products = gramian.mean(1)  # g_iᵀg0
        mean_norm = mean_products.mean().clamp(min=0).sqrt()  # ‖g0‖
        unit_products = mean_products / mean_norm.clamp(min=NO_COMMON_ASCENT)  # g_iᵀĝ0
        # Gramian of the rows g_1, ..., g_K, ĝ0, and the objective ‖g_w + ηĝ0‖ − cη in x = (w, η).
        extended = torch.cat(
            [torch.cat([gramian, unit_products[:, None]], 1), torch.cat([unit_products, uniform.new_ones(1)])[None]]
        )
        linear = torch.cat([torch.zeros_like(uniform), uniform.new_full((1,), -c)])
        point = minimize_on_simplex(SimplexProgram(size, linear, root_weight=1.0, root_matrix=extended))
        w, eta = point[:size], point[size]
        length = (point @ extended @ point).clamp(min=0).sqrt()  # ‖g_w + ηĝ0‖
        # d = ‖g0‖(g_w + ηĝ0)/‖g_w + ηĝ0‖, with ĝ0 = Σ_i g_i/(K‖g0‖), as weights on the g_i.
        cone_weights = (
            mean_norm / length.clamp(min=NO_COMMON_ASCENT) * (w + eta / (size * mean_norm.clamp(min=NO_COMMON_ASCENT)))
        )
        helps = (length - c * eta > NO_COMMON_ASCENT) & (mean_norm > NO_COMMON_ASCENT)
        return torch.where(helps, cone_weights, uniform)
