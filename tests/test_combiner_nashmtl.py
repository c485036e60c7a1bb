"""Nash-MTL (Navon et al., ICML 2022): the fixed point α_i(Aα)_i = 1, its warm start, and the
degenerate inputs for which no such point exists (docs/combiners.md#nash-mtl)."""

import math

import cvxpy as cp
import pytest
import torch

from mtrl.combiners import make_combiner
from tests.combiner_properties import SIZES, CombinerProperties, as_numpy, assert_close, conflicting, solve


class TestNashMTL(CombinerProperties):
    name = "nashmtl"
    scale_power = 0

    def expected_for_identical_rows(self, row, k):
        # α_i = 1/(√K‖g‖) solves α_i(Aα)_i = 1 when A = ‖g‖²11ᵀ, so d = Kα_i·g = √K·g/‖g‖.
        return math.sqrt(k) * row / row.norm()


@pytest.mark.parametrize("k", SIZES)
def test_solves_the_fixed_point_equations(k):
    matrix = conflicting(k, 3 * k + 5, k)
    combiner = make_combiner("nashmtl")
    d = combiner(matrix)
    alpha = combiner.last_weights
    assert (alpha > 0).all()
    torch.testing.assert_close(alpha * (matrix @ d), torch.ones(k, dtype=torch.float64), rtol=1e-7, atol=0)
    assert combiner.last_residual < 1e-7
    assert d.norm().item() == pytest.approx(math.sqrt(k), rel=1e-8)


@pytest.mark.parametrize("k", [2, 10, 50])
def test_matches_cvxpy(k):
    # The equations are the stationarity conditions of min ½‖Gᵀα‖² − Σ log α_i.
    matrix = conflicting(k, 3 * k + 5, 20 + k)
    g = as_numpy(matrix)
    alpha = cp.Variable(k)
    solve(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(g.T @ alpha) - cp.sum(cp.log(alpha)))))
    assert_close(make_combiner("nashmtl")(matrix), torch.from_numpy(g.T @ alpha.value), rtol=1e-5)


def test_norm_is_sqrt_k_at_any_scale():
    for scale in (1e-3, 1.0, 1e3):
        d = make_combiner("nashmtl")(conflicting(6, 40, 3) * scale)
        assert d.norm().item() == pytest.approx(math.sqrt(6), rel=1e-8)


def test_warm_start_gives_the_cold_result_and_round_trips():
    first, second = conflicting(8, 30, 4), conflicting(8, 30, 5)
    warm = make_combiner("nashmtl")
    warm(first)
    state = warm.state_dict()
    assert set(state) == {"warm_start"} and state["warm_start"].shape == (8,)
    restored = make_combiner("nashmtl")
    restored.load_state_dict(state)
    cold = make_combiner("nashmtl")(second)
    assert torch.equal(restored(second), warm(second))
    assert_close(warm.last_weights @ second, cold, rtol=1e-9)


def test_a_new_task_count_starts_cold():
    combiner = make_combiner("nashmtl")
    combiner(conflicting(8, 30, 6))
    d = combiner(conflicting(5, 30, 7))
    assert combiner.last_residual < 1e-7 and d.norm().item() == pytest.approx(math.sqrt(5), rel=1e-8)


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
    with pytest.raises(ValueError, match="unexpected NashMTL state keys"):
        make_combiner("nashmtl").load_state_dict({"alpha": torch.ones(3)})
    with pytest.raises(ValueError, match="stateless"):
        make_combiner("cagrad").load_state_dict({"alpha": torch.ones(3)})


def test_golden_values():
    # Printed once from this implementation; cross-checked against cvxpy as above.
    matrix = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, 0.5, 2.0, -1.0], [0.5, 1.0, -1.0, 2.0]], dtype=torch.float64)
    golden = [-0.457298554258705, 0.31580415928354455, 0.9654437414491253, 1.3262971562460801]
    assert_close(make_combiner("nashmtl")(matrix), torch.tensor(golden, dtype=torch.float64), rtol=1e-8)
