"""Nash-MTL (Navon et al., ICML 2022): the fixed point α_i(Aα)_i = 1 against an independent float64 solution,
its warm start, and the degenerate inputs for which no such point exists."""

import math

import cvxpy as cp
import numpy as np
import pytest
import torch

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
    states_equal,
)

ACCURACY = 1e-8
"""Relative accuracy of the combiner's α. It solves the equations with a ridge of 1e-10 on the cosine
matrix (a relative shift of ~1e-10), and its line search compares values of ψ, which rounding stops
resolving ~1e-9 from the solution: the largest error seen on the test matrices is 4e-9."""


class TestNashMTL(CombinerProperties):
    name = "nashmtl"
    scale_power = 0
    stateful = True
    accuracy = ACCURACY

    def expected_for_identical_rows(self, row, k):
        # α_i = 1/(√K‖g‖) solves α_i(Aα)_i = 1 when A = ‖g‖²11ᵀ, so d = Kα_i·g = √K·g/‖g‖.
        return math.sqrt(k) * row / row.norm()

    def check_weights(self, g, weights, seed):
        # The Nash point is unique (the equations are the stationarity conditions of a strictly convex ψ).
        assert weights.min() > 0
        assert_close(torch.from_numpy(weights), torch.from_numpy(reference(g)), rtol=ACCURACY)


def reference(g: np.ndarray) -> np.ndarray:
    """α > 0 with α_i(Aα)_i = 1, in float64 to rounding: the minimiser of ψ(α) = ½‖Gᵀα‖² − Σ log α_i
    (whose stationarity conditions the equations are) by cvxpy, then Newton's method on ∇ψ = Aα − 1/α."""
    k = g.shape[0]
    alpha = cp.Variable(k)
    solve(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(g.T @ alpha) - cp.sum(cp.log(alpha)))))
    gram, x = g @ g.T, alpha.value
    for _ in range(6):
        x = x - np.linalg.solve(gram + np.diag(x**-2.0), gram @ x - 1 / x)
    assert x.min() > 0 and np.abs(x * (gram @ x) - 1).max() <= 1e-13
    return x


@pytest.mark.parametrize("k", SIZES)
def test_solves_the_fixed_point_equations(k):
    matrix = conflicting(k, 3 * k + 5, k)
    combiner = make_combiner("nashmtl")
    d = combiner(matrix)
    alpha = combiner.last_weights
    assert (alpha > 0).all()
    # α_i(Aα)_i − 1 is the relative error of one equation; ~K·ACCURACY given α to ACCURACY.
    torch.testing.assert_close(alpha * (matrix @ d), torch.ones(k, dtype=torch.float64), rtol=1e-7, atol=0)
    assert combiner.last_residual < 1e-7
    assert d.norm().item() == pytest.approx(math.sqrt(k), rel=1e-8)


@pytest.mark.parametrize("k", [2, 10, 50])
def test_matches_the_reference(k):
    matrix = conflicting(k, 3 * k + 5, 20 + k)
    combiner = make_combiner("nashmtl")
    d = combiner(matrix)
    alpha = reference(as_numpy(matrix))
    assert_close(combiner.last_weights, torch.from_numpy(alpha), rtol=ACCURACY)
    # d = Gᵀα sums K rows of conflicting tasks, which partly cancel: α's error grows a few times in d.
    assert_close(d, torch.from_numpy(as_numpy(matrix).T @ alpha), rtol=10 * ACCURACY)


def test_norm_is_sqrt_k_at_any_scale():
    for scale in (1e-3, 1.0, 1e3):
        d = make_combiner("nashmtl")(conflicting(6, 40, 3) * scale)
        assert d.norm().item() == pytest.approx(math.sqrt(6), rel=1e-8)


def test_the_state_is_the_last_solution_and_a_warm_start_finds_the_same_point():
    # The state is β = (‖g_i‖α_i)_i, the solution for the cosine matrix; restored, it warm-starts the
    # next solve exactly as in the combiner that made it. Warm or cold, the point is the same.
    first, second = conflicting(8, 30, 4), conflicting(8, 30, 5)
    warm = make_combiner("nashmtl")
    warm(first)
    state = warm.state_dict()
    assert set(state) == {"warm_start"} and state["warm_start"].shape == (8,)
    assert_close(state["warm_start"], warm.last_weights * first.norm(dim=1), rtol=1e-15)
    saved = state["warm_start"].clone()
    restored = make_combiner("nashmtl")
    restored.load_state_dict(state)
    assert states_equal(restored.state_dict(), state)
    cold = make_combiner("nashmtl")(second)
    assert torch.equal(restored(second), warm(second))
    assert_close(warm.last_weights @ second, cold, rtol=ACCURACY)
    # A saved state is a copy: later calls move the combiner's state, not the saved one.
    assert torch.equal(state["warm_start"], saved) and not torch.equal(warm.state_dict()["warm_start"], saved)


def test_a_non_finite_matrix_leaves_the_warm_start_as_it_was():
    # The trainer skips an update whose gradients are not finite; the next one must solve as if it
    # had not been tried (a NaN warm start would make every later solution NaN).
    first, second = conflicting(6, 30, 8), conflicting(6, 30, 9)
    combiner, clean = make_combiner("nashmtl"), make_combiner("nashmtl")
    combiner(first), clean(first)
    poisoned = first.clone()
    poisoned[2, 3] = float("nan")
    assert not torch.isfinite(combiner(poisoned)).all()
    assert torch.equal(combiner.state_dict()["warm_start"], clean.state_dict()["warm_start"])
    assert torch.equal(combiner(second), clean(second))


def test_a_combiner_that_never_ran_has_an_empty_state():
    assert make_combiner("nashmtl").state_dict() == {}


def test_a_new_task_count_starts_cold():
    combiner = make_combiner("nashmtl")
    combiner(conflicting(8, 30, 6))
    d = combiner(conflicting(5, 30, 7))
    assert combiner.last_residual < 1e-7 and d.norm().item() == pytest.approx(math.sqrt(5), rel=1e-8)
    assert_close(combiner.last_weights, torch.from_numpy(reference(as_numpy(conflicting(5, 30, 7)))), rtol=ACCURACY)


def test_without_a_nash_point_the_update_stays_finite():
    # A zero row (no direction serves that task) and a hull containing 0: no solution exists; the
    # regularised solution is finite, serves the others, and `last_residual` shows the failure.
    g = conflicting(3, 12, 8)
    combiner = make_combiner("nashmtl")
    d = combiner(torch.cat([g, torch.zeros(1, 12, dtype=torch.float64)]))
    assert torch.isfinite(d).all() and combiner.last_residual > 0.5
    assert d.norm().item() == pytest.approx(math.sqrt(3), rel=1e-6)
    d = combiner(torch.cat([g[:1], -g[:1], g[1:2]]))
    assert torch.isfinite(d).all() and combiner.last_residual > 0.5


def test_bad_state_is_refused():
    with pytest.raises(ValueError) as info:
        make_combiner("nashmtl").load_state_dict({"alpha": torch.ones(3)})
    assert str(info.value) == "unexpected NashMTL state keys ['alpha']; expected 'warm_start'"
    with pytest.raises(ValueError) as info:
        make_combiner("cagrad").load_state_dict({"alpha": torch.ones(3)})
    assert str(info.value) == "CAGrad is stateless, found state keys ['alpha']"


def test_takes_no_hyper_parameters():
    with pytest.raises(ValueError) as info:
        make_combiner("nashmtl", max_norm=1.0)
    assert str(info.value) == "unknown hyper-parameter 'max_norm' for combiner 'nashmtl'; accepted: none"


GOLDEN = [-0.45729855434488537, 0.31580415935889655, 0.9654437415808171, 1.326297156359815]
"""d for GOLDEN_MATRIX, from `reference`."""


def test_golden_values():
    golden = torch.tensor(GOLDEN, dtype=torch.float64)
    g = as_numpy(GOLDEN_MATRIX)
    assert_close(torch.from_numpy(g.T @ reference(g)), golden, rtol=1e-15)
    assert_close(make_combiner("nashmtl")(GOLDEN_MATRIX, generator=seeded(0)), golden, rtol=ACCURACY)
