"""UPGrad, unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl.combiners.base import Combiner, HyperParameters, check_number, hyper_parameter

ITERATIONS = 22
"""Interior-point iterations of the K projections (batched): 18–20 reach a KKT error of ~1e-18 on the
test Gramians (K up to 50, whose regularised Gramian has condition number up to ~1e4)."""

_CENTRALITY_FLOOR = 1e-22
"""Smallest duality measure targeted. It must be far below the smallest multiplier of an active bound
(~1e-8 at K = 50): where y_i·z_i → μ, a bound whose multiplier z_i* is below sqrt(μ) looks free, and
with a floor of 1e-14 a third of the rows started the polish from a wrong face."""

_CORRECTIONS = 2
"""Active-set corrections of the face after the first solve on it: with the floor above none was needed on the
test Gramians (one at K = 50 with a floor of 1e-18); they are the safeguard for rows the floor does not resolve."""

_BOUNDARY_FRACTION = 0.99
"""Fraction of the largest feasible step taken: iterates stay strictly inside the orthant."""

_KKT_ROUNDING = 1e-12
"""Largest negative multiplier (relative to the linear term) of a polished point that rounding explains."""


@dataclass(frozen=True)
class UPGradParameters(HyperParameters):
    norm_eps: float = hyper_parameter(
        1e-4, "A is taken as 0 when its trace ‖G‖²_F is below this (TorchJD's norm_eps); >= 0"
    )
    reg_eps: float = hyper_parameter(1e-4, "ridge added to the trace-normalised A (TorchJD's reg_eps); > 0")

    def __post_init__(self) -> None:
        self._store("norm_eps", check_number("norm_eps", self.norm_eps, low=0.0))
        self._store("reg_eps", check_number("reg_eps", self.reg_eps, low=0.0, low_open=True))


class UPGrad(Combiner):
    """Each row g_i projected onto the dual cone {x : Gx ≥ 0}, then averaged (Quinton & Rey, 2024, Eq. 5;
    docs/combiners.md#upgrad).

    The projection of Gᵀu is Gᵀv with v = argmin_v vᵀAv s.t. v ≥ u (their Proposition 1); with u = e_i/K
    for each task i, the weights are the sum of the K solutions. As in TorchJD, A is first divided by
    its trace (and taken as 0 when the trace is below `norm_eps`), and `reg_eps`·I is added, which makes
    the K programs strictly convex. They are solved together (`project_onto_dual_cone`); d is
    non-conflicting (g_iᵀd ≥ 0 for every i, up to the ridge) and d(sG) = s·d(G).
    """

    Parameters = UPGradParameters
    parameters: UPGradParameters

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        trace = gramian.diagonal().sum()
        normalised = torch.where(trace < self.parameters.norm_eps, torch.zeros_like(gramian), gramian / trace)
        regularised = normalised + self.parameters.reg_eps * torch.eye(size, dtype=gramian.dtype, device=gramian.device)
        identity = torch.eye(size, dtype=gramian.dtype, device=gramian.device)
        return project_onto_dual_cone(regularised, identity / size).sum(0)


def project_onto_dual_cone(gramian: Tensor, lower: Tensor) -> Tensor:
    """For each row u of `lower` ([m, K]), v = argmin vᵀMv s.t. v ≥ u, M = `gramian` positive definite.

    With v = u + y, each is the bound-constrained program min ½yᵀMy + (Mu)ᵀy over y ≥ 0, solved for all
    rows at once by a primal-dual interior point method with Mehrotra's predictor-corrector (Nocedal &
    Wright, Numerical Optimization, 2nd ed., Alg. 16.4) for a fixed number of iterations, keeping each
    row's iterate with the smallest KKT error; then Newton's method on the face the solution lies on
    (one linear solve, the program being quadratic) takes it to machine precision, with active-set
    corrections of the face. No host synchronisation: fixed counts and `torch.where` instead of branches.
    """
    linear = lower @ gramian  # rows (Mu)ᵀ; M is symmetric
    y, z = torch.ones_like(lower), torch.ones_like(lower)
    best, best_error = y, torch.full_like(lower[:, 0], torch.inf)
    for _ in range(ITERATIONS):
        error = _kkt_error(gramian, linear, y, z)
        better = error < best_error  # False for NaN
        best, best_error = torch.where(better[:, None], y, best), torch.where(better, error, best_error)
        y, z = _step(gramian, linear, y, z)
    best = torch.where((_kkt_error(gramian, linear, y, z) < best_error)[:, None], y, best)
    return lower + _polish(gramian, linear, best)


def _kkt_error(gramian: Tensor, linear: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Each row's max(|My + q − z|, μ), μ = yᵀz/K the duality measure."""
    residual = y @ gramian + linear - z
    return torch.maximum(residual.abs().amax(1), (y * z).sum(1) / y.shape[1])


def _step(gramian: Tensor, linear: Tensor, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """One predictor-corrector iteration for every row (Nocedal & Wright, Alg. 16.4)."""
    residual = y @ gramian + linear - z
    factor = torch.linalg.cholesky_ex(gramian + torch.diag_embed(z / y)).L

    def direction(target: Tensor) -> tuple[Tensor, Tensor]:
        # M dy − dz = −r and Z dy + Y dz = target give (M + Z/Y) dy = −r + target/Y.
        dy = torch.cholesky_solve((target / y - residual)[:, :, None], factor)[:, :, 0]
        return dy, (target - z * dy) / y

    def longest(dy: Tensor, dz: Tensor, limit: float) -> Tensor:
        """The largest step ≤ limit keeping y, z ≥ 0, per row."""
        shrink = torch.maximum((-dy / y).amax(1), (-dz / z).amax(1))
        return (1 / torch.clamp(shrink, min=1 / limit))[:, None]

    # Predictor: the affine direction (target −y∘z) measures how much centring σ is needed.
    gap = (y * z).sum(1, keepdim=True)
    affine_y, affine_z = direction(-y * z)
    length = longest(affine_y, affine_z, 1.0)
    sigma = (((y + length * affine_y) * (z + length * affine_z)).sum(1, keepdim=True) / gap) ** 3
    # Corrector: target σμ, less the predictor's second-order term.
    centre = (sigma * gap / y.shape[1]).clamp(min=_CENTRALITY_FLOOR)
    dy, dz = direction(centre - y * z - affine_y * affine_z)
    length = _BOUNDARY_FRACTION * longest(dy, dz, 1 / _BOUNDARY_FRACTION)
    return y + length * dy, z + length * dz


def _polish(gramian: Tensor, linear: Tensor, point: Tensor) -> Tensor:
    """The interior point solution refined on its face: y_F solves M_FF y_F = −q_F, y = 0 elsewhere.

    The face F = {y_i > z_i} comes from the interior point; where a multiplier is itself tiny the guess
    can be wrong, so it is corrected (entries that went negative leave F, bounds whose multiplier
    My + q is negative join it) and solved again, twice. The refined point is kept where it is feasible and
    meets the KKT conditions to rounding, or else is no worse than the interior point.
    """
    multipliers = point @ gramian + linear
    free = point > multipliers
    polished = _solve_on_face(gramian, linear, free)
    for _ in range(_CORRECTIONS):
        multipliers = polished @ gramian + linear
        free = (free & (polished > 0)) | (~free & (multipliers < 0))
        polished = _solve_on_face(gramian, linear, free)
    multipliers = polished @ gramian + linear

    def value(y: Tensor) -> Tensor:
        return 0.5 * ((y @ gramian) * y).sum(1) + (linear * y).sum(1)

    violation = torch.where(free, torch.zeros_like(multipliers), (-multipliers).clamp(min=0)).amax(1)
    optimal = violation <= _KKT_ROUNDING * linear.abs().amax(1)
    feasible = (polished >= 0).all(1)
    keep = feasible & (optimal | (value(polished) <= value(point.clamp(min=0))))  # False for NaN
    return torch.where(keep[:, None], polished, point.clamp(min=0))


def _solve_on_face(gramian: Tensor, linear: Tensor, free: Tensor) -> Tensor:
    inside = free.to(gramian.dtype)
    mask = inside[:, :, None] * inside[:, None, :]
    matrix = gramian * mask + torch.diag_embed(1 - inside)  # identity rows for the bounds held at 0
    return torch.linalg.solve_ex(matrix, -(linear * inside)[:, :, None]).result[:, :, 0]
