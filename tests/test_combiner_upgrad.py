"""UPGrad (Quinton & Rey, 2024) against TorchJD's `UPGrad` as the independent reference: TorchJD's weighting
and Gramian normalisation with its default quadprog projector (the `test` extra installs it) and, always,
with a projector whose K programs cvxpy (Clarabel) solves; its non-conflict and its thresholds."""

import importlib.util

import cvxpy as cp
import numpy as np
import pytest
import torch
from torchjd.aggregation import UPGrad
from torchjd.linalg import DualConeProjector

from mtrl.combiners import make_combiner
from tests.combiner_properties import (
    GOLDEN_MATRIX,
    SIZES,
    CombinerProperties,
    as_numpy,
    assert_close,
    conflicting,
    seeded,
    solve,
)

ACCURACY = 1e-12
"""Both solve the K programs exactly (quadprog by an active-set method, this combiner by an interior point
method polished on the active face); the differences are rounding."""

CVXPY_ACCURACY = 1e-11
"""Clarabel's solutions (~1e-7 accurate at K = 50) are polished to rounding on their active face."""

HAS_QUADPROG = all(importlib.util.find_spec(name) for name in ("qpsolvers", "quadprog"))


def polished(gram: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """cvxpy's v (~1e-7 accurate) made exact: on the face F = {v_i > u_i} the minimiser solves (Mv)_F = 0
    with v = u off F; the face is corrected as in an active-set method until the KKT conditions hold
    (v ≥ u, multipliers Mv ≥ 0, zero on F), which are asserted."""
    free = v - u > 1e-6 * np.abs(v).max()
    for _ in range(len(u) + 1):
        point = u.copy()
        if free.any():
            fixed = ~free
            point[free] = -np.linalg.solve(gram[np.ix_(free, free)], gram[np.ix_(free, fixed)] @ u[fixed])
        multipliers = gram @ point
        scale = np.abs(multipliers).max()
        if (point - u).min() < 0:
            free[np.argmin(np.where(free, point - u, np.inf))] = False
        elif np.where(free, 0.0, multipliers).min() < -1e-13 * scale:
            free[np.argmin(np.where(free, np.inf, multipliers))] = True
        else:
            break
    assert (point - u).min() >= 0 and np.where(free, np.abs(multipliers), 0.0).max() <= 1e-12 * scale
    assert np.where(free, 0.0, multipliers).min() >= -1e-13 * scale
    return point


class ClarabelProjector(DualConeProjector):
    """TorchJD's projector interface with cvxpy for the programs min vᵀMv s.t. v ≥ u (polished to rounding),
    and TorchJD's normalisation of the Gramian (trace, norm_eps, reg_eps) as in its quadprog projector."""

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        self.norm_eps, self.reg_eps = norm_eps, reg_eps

    def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        from torchjd._linalg._gramian import normalize, regularize

        gram = as_numpy(regularize(normalize(G, self.norm_eps), self.reg_eps))
        gram = (gram + gram.T) / 2
        rows = []
        for u in as_numpy(U):
            v = cp.Variable(len(u))
            solve(cp.Problem(cp.Minimize(cp.quad_form(v, cp.psd_wrap(gram))), [v >= u]))
            rows.append(polished(gram, u, v.value))
        return torch.from_numpy(np.stack(rows))


def torchjd_weights(matrix: torch.Tensor, projector: DualConeProjector | None = None) -> torch.Tensor:
    matrix = matrix.double()
    return UPGrad(projector=projector).gramian_weighting(matrix @ matrix.T)


class TestUPGrad(CombinerProperties):
    name = "upgrad"
    invalid_hyper_parameters = [
        ({"norm_eps": -1e-3}, "`norm_eps` must be >= 0, found -0.001"),
        ({"reg_eps": 0.0}, "`reg_eps` must be > 0, found 0.0"),
        ({"reg_eps": "1e-4"}, "`reg_eps` must be a number, found '1e-4'"),
    ]

    def check_weights(self, g, weights, seed):
        expected = torchjd_weights(torch.from_numpy(g), ClarabelProjector())
        assert_close(torch.from_numpy(weights), expected, rtol=CVXPY_ACCURACY)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize("scale", [1e-20, 1e20])
    def test_tiny_and_huge_inputs(self, dtype, scale):
        # With norm_eps = 0 the weights are scale-free at any scale. (With the default, a matrix whose
        # ‖G‖²_F is below 1e-4 counts as zero and gets the mean: test_below_norm_eps_the_update_is_the_mean.)
        matrix = conflicting(4, 12, 2, dtype)
        combiner = make_combiner("upgrad", norm_eps=0.0)
        d = combiner(matrix * scale)
        assert torch.isfinite(d).all()
        assert_close(d, make_combiner("upgrad", norm_eps=0.0)(matrix) * scale, rtol=1e-4)


@pytest.mark.skipif(not HAS_QUADPROG, reason="TorchJD's default projector needs qpsolvers and quadprog")
@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torchjd(k, seed):
    matrix = conflicting(k, 3 * k + 5, 70 + k + seed)
    combiner = make_combiner("upgrad")
    d = combiner(matrix)
    assert_close(combiner.last_weights, torchjd_weights(matrix), rtol=ACCURACY)
    assert_close(d, UPGrad()(matrix), rtol=10 * ACCURACY)


@pytest.mark.parametrize("k", [2, 3, 10, 50])
def test_matches_torchjd_with_a_cvxpy_projector(k):
    matrix = conflicting(k, 3 * k + 5, 80 + k)
    combiner = make_combiner("upgrad")
    d = combiner(matrix)
    weights = torchjd_weights(matrix, ClarabelProjector())
    assert_close(combiner.last_weights, weights, rtol=CVXPY_ACCURACY)
    assert_close(d, weights @ matrix, rtol=CVXPY_ACCURACY)


@pytest.mark.parametrize("reg_eps", [1e-2, 1e-8])
def test_other_thresholds_match_torchjd(reg_eps):
    matrix = conflicting(6, 23, 90)
    combiner = make_combiner("upgrad", reg_eps=reg_eps, norm_eps=1e-3)
    combiner(matrix)
    weights = torchjd_weights(matrix, ClarabelProjector(norm_eps=1e-3, reg_eps=reg_eps))
    assert_close(combiner.last_weights, weights, rtol=CVXPY_ACCURACY)


@pytest.mark.parametrize("k", [3, 10, 50])
def test_the_update_conflicts_with_no_task(k):
    # Each projection lies in the dual cone {x : Gx ≥ 0}, and so does their mean; the ridge reg_eps·I
    # allows a violation of order reg_eps·trace(A)·max v, here made negligible.
    matrix = conflicting(k, 3 * k + 5, 100 + k)
    d = make_combiner("upgrad", reg_eps=1e-12)(matrix)
    gains = matrix @ d
    assert gains.min() >= -1e-9 * gains.abs().max()
    # It differs from the mean, which does conflict with some task on these matrices.
    assert (matrix @ matrix.mean(0)).min() < 0


def test_each_row_that_conflicts_with_no_other_is_kept():
    # Rows in the dual cone already (pairwise non-negative products) are their own projections: d = mean.
    q, _ = torch.linalg.qr(torch.randn(20, 4, generator=seeded(5), dtype=torch.float64))
    matrix = q.T * torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)[:, None]
    assert_close(make_combiner("upgrad")(matrix), matrix.mean(0), rtol=1e-12)


def test_below_norm_eps_the_update_is_the_mean():
    # TorchJD's normalisation: a Gramian whose trace ‖G‖²_F is below norm_eps counts as zero, so the
    # programs give v = u and the weights 1/K.
    matrix = conflicting(5, 20, 6)
    small = matrix / matrix.norm() * 1e-3  # ‖G‖²_F = 1e-6 < 1e-4
    assert_close(make_combiner("upgrad")(small), small.mean(0), rtol=1e-15)
    assert not torch.allclose(make_combiner("upgrad", norm_eps=0.0)(small), small.mean(0))


GOLDEN = [-0.4352999873574057, 0.12024362212778078, 1.108789272511084, 1.4850789510605478]
"""d for GOLDEN_MATRIX, from TorchJD's UPGrad with its quadprog projector."""


def test_golden_values():
    golden = torch.tensor(GOLDEN, dtype=torch.float64)
    assert_close(torchjd_weights(GOLDEN_MATRIX, ClarabelProjector()) @ GOLDEN_MATRIX, golden, rtol=CVXPY_ACCURACY)
    assert_close(make_combiner("upgrad")(GOLDEN_MATRIX), golden, rtol=ACCURACY)
