"""IMGrad, imbalance-sensitive gradient descent (Zhou et al., 2025)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl.combiners.base import (
    Combiner,
    HyperParameters,
    check_choice,
    check_number,
    hyper_parameter,
    normalised,
    rescale_divisor,
)
from mtrl.combiners.cagrad import DEGENERATE_NORM, conflict_averse_scale
from mtrl.combiners.mgda import min_norm_weights
from mtrl.combiners.simplex import SimplexProgram, minimize_on_simplex

VARIANTS = ("paper", "code")


@dataclass(frozen=True)
class IMGradParameters(HyperParameters):
    c: float = hyper_parameter(0.8, "CAGrad's radius c of the conflict-averse part; >= 0")
    variant: str = hyper_parameter("paper", "paper (the paper's Eq. 8) | code (the authors' implementation)")
    rescale: int = hyper_parameter(1, "final divisor 0 | 1 | 2: none, 1 + c², 1 + c")

    def __post_init__(self) -> None:
        self._store("c", check_number("c", self.c, low=0.0))
        check_choice("variant", self.variant, VARIANTS)
        self._store("rescale", int(check_choice("rescale", self.rescale, (0, 1, 2))))


class IMGrad(Combiner):
    """CAGrad's dual blended with MGDA's according to how far the min-norm direction is from g0.

    With g_m the MGDA min-norm vector, θ = ∠(g0, g_m) and μ = max(cos θ, 0):
    - `variant="paper"` (Eq. 8): w* = argmin_{w∈Δ} (1−μ)(g_wᵀg0 + c‖g0‖‖g_w‖) + μ‖g_w‖²;
    - `variant="code"` (the authors' implementation): w* = argmin_{w∈Δ} (1.5 − cos θ)g_wᵀg0 + cos θ·c‖g0‖‖g_w‖.
    Both return d = (g0 + c‖g0‖/‖g_w*‖ · g_w*)/r, as CAGrad. cos θ ≥ 0 always holds for the exact
    min-norm point (g_mᵀg_i ≥ ‖g_m‖² for every i), so clipping at 0 only removes round-off and both
    duals are convex. When g_m = 0 the angle is undefined and cos θ is taken as 0.
    """

    Parameters = IMGradParameters
    parameters: IMGradParameters

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        p = self.parameters
        gramian, _ = normalised(gramian)
        size = gramian.shape[0]
        mean_products = gramian.mean(1)  # g_wᵀg0 = wᵀ(A1/K)
        mean_norm = mean_products.mean().clamp(min=0).sqrt()
        radius = p.c * mean_norm

        min_norm = min_norm_weights(gramian)
        min_norm_length = (min_norm @ gramian @ min_norm).clamp(min=0).sqrt()
        lengths = min_norm_length * mean_norm
        cosine = torch.where(
            lengths > DEGENERATE_NORM**2, (min_norm @ mean_products) / lengths.clamp(min=DEGENERATE_NORM**2), 0.0
        ).clamp(0.0, 1.0)

        if p.variant == "paper":
            dual_program = SimplexProgram(
                size,
                (1 - cosine) * mean_products,
                quadratic=2 * cosine * gramian,
                root_weight=(1 - cosine) * radius,
                root_matrix=gramian,
            )
        else:
            dual_program = SimplexProgram(
                size, (1.5 - cosine) * mean_products, root_weight=cosine * radius, root_matrix=gramian
            )
        dual = minimize_on_simplex(dual_program)
        scale = conflict_averse_scale(gramian, dual, radius)
        return (1.0 / size + scale * dual) / rescale_divisor(p.c, p.rescale)
