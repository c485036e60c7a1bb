"""FairGrad (Ban & Ji, ICML 2024): the α-fair weights Aw = w^(−1/α) against an independent scipy solution
of the same system, for several α and Gramians; α = 1 is Nash-MTL; the scale law; TorchJD's FairGrad."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from mtrl.combiners import make_combiner
from tests.combiner_properties import (
    GOLDEN_MATRIX,
    SIZES,
    CombinerProperties,
    as_numpy,
    assert_close,
    conflicting,
    seeded,
)

ACCURACY = 1e-9
"""Relative accuracy of the combiner's w. Its Newton iteration converges to rounding; the ridge δ = 1e-12
on the normalised Gramian moves the solution by a relative O(δ·cond(Â)): at most 5e-10 on the test
matrices, whose Â is close to singular (conflicting tasks)."""

ALPHAS = [0.5, 1.0, 2.0, 5.0]


def reference(g: np.ndarray, alpha: float) -> np.ndarray:
    """w > 0 with Aw = w^(−1/α): scipy's least_squares on the K residuals from w = 1/K with bounds (0, ∞)
    (the authors' solver) at tight tolerances, then Newton's method on the same equations to rounding."""
    gram = g @ g.T
    k = gram.shape[0]

    def residuals(w: np.ndarray) -> np.ndarray:
        return gram @ w - w ** (-1 / alpha)

    w = least_squares(residuals, np.full(k, 1 / k), bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15).x
    for _ in range(5):
        w = w - np.linalg.solve(gram + np.diag(w ** (-1 / alpha - 1) / alpha), residuals(w))
    assert w.min() > 0 and np.abs(w ** (1 / alpha) * (gram @ w) - 1).max() <= 1e-12
    return w


class TestFairGrad(CombinerProperties):
    name = "fairgrad"
    scale_power = (1 - 2.0) / (1 + 2.0)  # gradients ×s ⇒ d ×s^((1−α)/(1+α)), α = 2 by default
    accuracy = ACCURACY
    invalid_hyper_parameters = [
        ({"alpha": 0.0}, "`alpha` must be > 0, found 0.0"),
        ({"alpha": -1}, "`alpha` must be > 0, found -1"),
        ({"alpha": "2"}, "`alpha` must be a number, found '2'"),
        ({"alpha": True}, "`alpha` must be a number, found True"),
    ]

    def expected_for_identical_rows(self, row, k):
        # A = ‖g‖²11ᵀ: w_i = (K‖g‖²)^(−α/(α+1)) solves Aw = w^(−1/α), so d = K·w_i·g.
        alpha = 2.0
        return k * (k * row.dot(row)) ** (-alpha / (alpha + 1)) * row

    def check_weights(self, g, weights, seed):
        assert weights.min() > 0
        assert_close(torch.from_numpy(weights), torch.from_numpy(reference(g, 2.0)), rtol=ACCURACY)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("k", SIZES)
def test_matches_the_reference(k, alpha):
    matrix = conflicting(k, 3 * k + 5, 30 + k)
    combiner = make_combiner("fairgrad", alpha=alpha)
    d = combiner(matrix)
    w = reference(as_numpy(matrix), alpha)
    assert_close(combiner.last_weights, torch.from_numpy(w), rtol=ACCURACY)
    # d = Gᵀw sums K rows of conflicting tasks, which partly cancel: w's error grows a few times in d.
    assert_close(d, torch.from_numpy(as_numpy(matrix).T @ w), rtol=10 * ACCURACY)
    # The defining property: each task's gain g_iᵀd is w_i^(−1/α).
    assert_close(matrix @ d, combiner.last_weights ** (-1 / alpha), rtol=10 * ACCURACY)
    assert combiner.last_residual < 1e-7  # w_i^(1/α)(Aw)_i − 1: an error in w counts (1 + 1/α) times, and more


@pytest.mark.parametrize("seed", range(4))
def test_gramians_of_spread_scales_and_near_parallel_rows(seed):
    # Task norms over 4 decades, and two rows 1e-3 apart in angle: a badly conditioned Gramian.
    generator = seeded(seed)
    matrix = torch.randn(6, 30, generator=generator, dtype=torch.float64)
    matrix[1] = matrix[0] + 1e-3 * torch.randn(30, generator=generator, dtype=torch.float64)
    matrix *= torch.logspace(-2, 2, 6, dtype=torch.float64)[torch.randperm(6, generator=generator)][:, None]
    combiner = make_combiner("fairgrad", alpha=2.0)
    combiner(matrix)
    w = reference(as_numpy(matrix), 2.0)
    assert_close(combiner.last_weights, torch.from_numpy(w), rtol=1e-7)


def test_alpha_one_is_nash_mtl():
    # At α = 1 the equations are Nash-MTL's (Aw)_i = 1/w_i, solved by another code path.
    matrix = conflicting(8, 30, 12)
    fair, nash = make_combiner("fairgrad", alpha=1.0), make_combiner("nashmtl")
    assert_close(fair(matrix), nash(matrix), rtol=1e-8)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_scale_law(alpha):
    matrix = conflicting(5, 20, 13)
    power = (1 - alpha) / (1 + alpha)
    for scale in (1e-3, 10.0):
        d = make_combiner("fairgrad", alpha=alpha)(scale * matrix)
        assert_close(d, make_combiner("fairgrad", alpha=alpha)(matrix) * scale**power, rtol=1e-10)


@pytest.mark.parametrize("alpha", [*ALPHAS, 1e4])
def test_orthogonal_rows_in_closed_form(alpha):
    # A = diag(n_i²): w_i = n_i^(−2α/(α+1)) and each task gains g_iᵀd = n_i^(2/(α+1)); as α → ∞ every task
    # gains the same (max-min fairness), as α → 0 the gains are n_i², plain summation's.
    norms = torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(20, 5, generator=seeded(14), dtype=torch.float64))
    matrix = norms[:, None] * q.T
    combiner = make_combiner("fairgrad", alpha=alpha)
    d = combiner(matrix)
    assert_close(combiner.last_weights, norms ** (-2 * alpha / (alpha + 1)), rtol=ACCURACY)
    assert_close(matrix @ d, norms ** (2 / (alpha + 1)), rtol=ACCURACY)


def test_matches_torchjd():
    # TorchJD's FairGrad runs the authors' solver (scipy least_squares at its default tolerances, ~1e-8).
    from torchjd.aggregation import FairGrad

    for k, alpha in [(3, 2.0), (10, 0.5), (10, 5.0)]:
        matrix = conflicting(k, 3 * k + 5, 40 + k)
        assert_close(make_combiner("fairgrad", alpha=alpha)(matrix), FairGrad(alpha=alpha)(matrix), rtol=1e-6)


def test_without_a_fair_point_the_update_stays_finite():
    # Opposing rows plus another: no direction helps every task; the ridge gives a finite update, and
    # `last_residual` shows that the equations are not met.
    g = conflicting(2, 12, 15)
    combiner = make_combiner("fairgrad")
    d = combiner(torch.cat([g[:1], -g[:1], g[1:2]]))
    assert torch.isfinite(d).all() and combiner.last_residual > 0.5


def test_non_finite_gradients_give_a_non_finite_update():
    # The trainer skips such an update; the combiner must not raise or hide it.
    matrix = conflicting(4, 10, 16)
    matrix[1, 2] = float("nan")
    assert not torch.isfinite(make_combiner("fairgrad")(matrix)).all()


GOLDEN = {
    1.0: [-0.45729855434488537, 0.31580415935889655, 0.9654437415808171, 1.326297156359815],
    2.0: [-0.4156213056893896, 0.3770013924054307, 0.7579680052346622, 1.0082042597983332],
}
"""d for GOLDEN_MATRIX at α = 1 (Nash-MTL's golden row) and α = 2, from `reference`."""


@pytest.mark.parametrize("alpha", sorted(GOLDEN))
def test_golden_values(alpha):
    golden = torch.tensor(GOLDEN[alpha], dtype=torch.float64)
    g = as_numpy(GOLDEN_MATRIX)
    assert_close(torch.from_numpy(g.T @ reference(g, alpha)), golden, rtol=1e-14)
    d = make_combiner("fairgrad", alpha=alpha)(GOLDEN_MATRIX, generator=seeded(0))
    assert_close(d, golden, rtol=ACCURACY)
    assert math.isclose(float(d.norm()), float(golden.norm()), rel_tol=ACCURACY)
