"""Nash-MTL, multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mtrl.combiners.base import Combiner, HyperParameters

ITERATIONS = 25
"""Damped Newton steps: about 10 from a cold start, 3–5 warm, ~20 in the degenerate case."""

RIDGE = 1e-10
"""δ in the regularised equations (Â + δI)β = 1/β (Â = A normalised to unit mean diagonal)."""

_HALVINGS = 7
"""The line search tries the longest feasible step and 6 halvings of it, and 0."""


class NashMTL(Combiner):
    """α > 0 with (Aα)_i = 1/α_i for every i, d = Gᵀα (Navon et al., 2022, Eq. 4; docs/combiners.md#nash-mtl).

    Then g_iᵀd = 1/α_i and ‖d‖ = √K at any gradient scale; no max-norm clipping is applied.
    The equations are the stationarity conditions of the strictly convex ψ(α) = ½αᵀAα − Σ log α_i,
    minimised by damped Newton steps with a batched line search, warm-started from the previous
    update's solution (`state_dict`); a call or an update that is not finite leaves that warm start
    as it was, "none yet" included (`weights`, `restore_where`). The equations are solved for the cosine matrix Ã = DAD,
    D = diag(1/‖g_i‖): if Ãβ = 1/β then α = Dβ, so every task's scale drops out of the solve.
    A ridge δ = 1e-10 is added to Ã: the regularised equations always have exactly one solution,
    within a relative O(δβ²) of the Nash point. Without it none exists when 0 ∈ conv{g_i} (two
    opposing rows, a zero row, G = 0: no direction helps every task); the ridge then gives large,
    finite weights on the tasks that cannot be served, and d = 0 for G = 0 and for exactly opposing
    rows. `last_residual` holds max_i |α_i(Aα)_i − 1|, which exposes those cases.
    """

    def __init__(self, parameters: HyperParameters | None = None) -> None:
        super().__init__(parameters)
        self.last_residual: Tensor | None = None
        self._start: Tensor | None = None

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        norms = gramian.diagonal().clamp(min=0).sqrt()
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))  # a zero row stays zero in Ã
        cosines = gramian / torch.outer(norms, norms)
        cold = cold_start(cosines)
        previous = self._start
        if previous is None or previous.shape != (size,):
            previous = torch.full_like(cold, torch.nan)  # no warm start yet
        previous = previous.to(cosines)
        # "No warm start yet" is a non-finite start (so no host read decides it): it starts cold.
        solution = nash_point(cosines, torch.where(torch.isfinite(previous).all(), previous, cold))
        self.last_residual = (solution * (cosines @ solution) - 1).abs().amax()
        # A non-finite Gramian (an update the trainer skips) leaves the warm start as it was.
        self._start = torch.where(torch.isfinite(solution).all(), solution, previous)
        return solution / norms

    def snapshot(self) -> Tensor | None:
        return self._start

    def restore_where(self, snapshot: Tensor | None, skipped: Tensor) -> None:
        if self._start is None:
            return
        if snapshot is None or snapshot.shape != self._start.shape:
            snapshot = torch.full_like(self._start, torch.nan)  # no warm start yet
        self._start = torch.where(skipped, snapshot.to(self._start), self._start)

    def state_dict(self) -> dict[str, Any]:
        """{"warm_start": β of the last finite solve}, or {} before the first (older checkpoints may
        hold a NaN warm start: it means the same)."""
        if self._start is None or not torch.isfinite(self._start).all():
            return {}
        return {"warm_start": self._start.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unexpected = set(state) - {"warm_start"}
        if unexpected:
            raise ValueError(f"unexpected NashMTL state keys {sorted(unexpected)}; expected 'warm_start'")
        self._start = state.get("warm_start")


def cold_start(cosines: Tensor) -> Tensor:
    """β_i = 1/sqrt(K·mean|Ã|): exact when all rows are parallel (1/√K) and when they are orthogonal (1)."""
    size = cosines.shape[0]
    level = (cosines.abs().mean() * size).clamp(min=RIDGE)
    return cosines.new_full((size,), 1.0) / level.sqrt()


def nash_point(cosines: Tensor, start: Tensor) -> Tensor:
    """β > 0 with ((Ã + δI)β)_i = 1/β_i, by damped Newton on ψ(β) = ½βᵀ(Ã + δI)β − Σ log β_i."""
    regularised = cosines + RIDGE * torch.eye(cosines.shape[0], dtype=cosines.dtype, device=cosines.device)
    fractions = torch.cat(
        [0.5 ** torch.arange(_HALVINGS, dtype=cosines.dtype, device=cosines.device), cosines.new_zeros(1)]
    )
    beta = start
    for _ in range(ITERATIONS):
        gradient = regularised @ beta - 1 / beta
        hessian = regularised + torch.diag(beta**-2)
        step = -torch.cholesky_solve(gradient[:, None], torch.linalg.cholesky_ex(hessian).L)[:, 0]
        # Largest step keeping β > 0, then the best of a few fractions of it (0 included: ψ never rises).
        longest = 1 / torch.clamp((-step / beta).amax() / 0.99, min=1.0)
        candidates = beta + (longest * fractions)[:, None] * step
        values = 0.5 * ((candidates @ regularised) * candidates).sum(1) - candidates.log().sum(1)
        best = torch.nan_to_num(values, nan=torch.inf).argmin()
        beta = candidates.index_select(0, best.view(1)).squeeze(0)  # no host read of the index
    return beta
