"""FairGrad, fair resource allocation in multi-task learning (Ban & Ji, ICML 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl.combiners.base import Combiner, HyperParameters, check_number, hyper_parameter

ITERATIONS = 30
"""Damped Newton steps from the cold start: 15 reach rounding on the test Gramians (K up to 50, task-gradient
norms over two decades, α from 0.5 to 10); the rest is margin. At very large α (1e4) with conflicting
tasks, the weights of the tasks that cannot be served head for underflow and the iteration stalls far
from a solution (`last_residual` ~1)."""

RIDGE = 1e-12
"""δ in the regularised equations (Ã + δI)γ = c∘γ^(−1/α) (Ã the cosine matrix): a relative error of
~δ·cond(Ã) in w, 5e-10 at most on the test matrices."""

_HALVINGS = 7
"""The line search tries the longest feasible step and 6 halvings of it, and 0."""

_QUADRATIC_PHASE = 1e-12
"""Newton decrement² below which the full Newton step is taken without comparing values of ψ: there ψ
changes by less than rounding can resolve, and Newton's method converges quadratically anyway."""


@dataclass(frozen=True)
class FairGradParameters(HyperParameters):
    alpha: float = hyper_parameter(
        2.0, "α of the α-fair utility; > 0 (1: Nash-MTL's proportional fairness, large: max-min fairness)"
    )

    def __post_init__(self) -> None:
        self._store("alpha", check_number("alpha", self.alpha, low=0.0, low_open=True))


class FairGrad(Combiner):
    """w > 0 with (Aw)_i = w_i^(−1/α) for every i, d = Gᵀw (Ban & Ji, 2024, Eq. 4; docs/combiners.md#fairgrad).

    The update maximises the α-fair utility Σ_i (g_iᵀd)^(1−α)/(1−α) of the tasks' gains over a ball;
    its optimality conditions are these equations, with g_iᵀd = w_i^(−1/α). They are the stationarity
    conditions of the strictly convex ψ(w) = ½wᵀAw − Σ_i h(w_i), with h' = w^(−1/α) (h = log at α = 1,
    where FairGrad is Nash-MTL), minimised by damped Newton steps with a batched line search from a
    cold start (no state). Each task's scale is factored out first, as for Nash-MTL: with
    D = diag(1/‖g_i‖), the cosine matrix Ã = DAD and w = Dγ, the equations become Ãγ = c∘γ^(−1/α) with
    c_i = ‖g_i‖^(1/α − 1), again stationarity conditions of a strictly convex function. A ridge
    δ = 1e-12 is added to Ã, so that a solution always exists (none does when no direction helps every
    task); `last_residual` = max_i |w_i^(1/α)(Aw)_i − 1| exposes those cases. d(sG) = s^((1−α)/(1+α))·d(G).
    """

    Parameters = FairGradParameters
    parameters: FairGradParameters

    def __init__(self, parameters: HyperParameters | None = None) -> None:
        super().__init__(parameters)
        self.last_residual: Tensor | None = None

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        alpha = self.parameters.alpha
        norms = gramian.diagonal().clamp(min=0).sqrt()
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # a zero row stays zero in Ã
        cosines = gramian / torch.outer(norms, norms)
        weights = fair_point(cosines, norms ** (1 / alpha - 1), alpha) / norms
        self.last_residual = (weights ** (1 / alpha) * (gramian @ weights) - 1).abs().amax()
        return weights


def fair_point(cosines: Tensor, gains: Tensor, alpha: float) -> Tensor:
    """γ > 0 with ((Ã + δI)γ)_i = c_i·γ_i^(−1/α), by damped Newton on ψ(γ) = ½γᵀ(Ã + δI)γ − Σ c_i h(γ_i).

    `cosines` is Ã, `gains` is c; h(γ) = γ^(1−1/α)/(1−1/α), whose derivative is γ^(−1/α) (log γ at α = 1).
    """
    size = cosines.shape[0]
    regularised = cosines + RIDGE * torch.eye(size, dtype=cosines.dtype, device=cosines.device)
    fractions = torch.cat(
        [0.5 ** torch.arange(_HALVINGS, dtype=cosines.dtype, device=cosines.device), cosines.new_zeros(1)]
    )
    exponent = 1 - 1 / alpha

    def utility(points: Tensor) -> Tensor:
        return (gains * (points.log() if alpha == 1 else points**exponent / exponent)).sum(-1)

    # Exact for K parallel rows of equal norm and for orthogonal rows.
    level = (cosines.abs().mean() * size).clamp(min=RIDGE)
    gamma = (gains / level) ** (alpha / (alpha + 1))
    for _ in range(ITERATIONS):
        gradient = regularised @ gamma - gains * gamma ** (-1 / alpha)
        hessian = regularised + torch.diag(gains * gamma ** (-1 / alpha - 1) / alpha)
        step = -torch.cholesky_solve(gradient[:, None], torch.linalg.cholesky_ex(hessian).L)[:, 0]
        # Largest step keeping γ > 0, then the best of a few fractions of it (0 included: ψ never rises).
        longest = 1 / torch.clamp((-step / gamma).amax() / 0.99, min=1.0)
        candidates = gamma + (longest * fractions)[:, None] * step
        values = 0.5 * ((candidates @ regularised) * candidates).sum(1) - utility(candidates)
        best = torch.nan_to_num(values, nan=torch.inf).argmin()
        # Near the solution ψ's changes drown in rounding: take the full Newton step there.
        quadratic = (-(gradient @ step) <= _QUADRATIC_PHASE) & (longest == 1)
        best = torch.where(quadratic, torch.zeros_like(best), best)
        gamma = candidates.index_select(0, best.view(1)).squeeze(0)  # no host read of the index
    return gamma
