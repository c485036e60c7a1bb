"""ConicGrad (Hassanpour et al., 2025): the update against the primal solved by cvxpy, the limits,
and the cases where no direction in the cone helps every task (docs/combiners.md#conicgrad)."""

import cvxpy as cp
import numpy as np
import pytest
import torch

from mtrl.combiners import make_combiner
from tests.combiner_properties import SIZES, CombinerProperties, as_numpy, assert_close, conflicting, solve


class TestConicGrad(CombinerProperties):
    name = "conicgrad"


class TestConicGradWideCone(CombinerProperties):
    name = "conicgrad"
    hyper_parameters = {"c": 0.1}


def primal(matrix: torch.Tensor, c: float) -> tuple[float, np.ndarray]:
    """max_d min_i g_iᵀd s.t. ‖d‖ ≤ 1, g0ᵀd ≥ c‖g0‖‖d‖, straight from the definition: (value, ‖g0‖·d*)."""
    g = as_numpy(matrix)
    g0 = g.mean(0)
    direction, value = cp.Variable(g.shape[1]), cp.Variable()
    constraints = [
        g @ direction >= value,
        cp.norm(direction) <= 1,
        c * np.linalg.norm(g0) * cp.norm(direction) <= g0 @ direction,
    ]
    problem = cp.Problem(cp.Maximize(value), constraints)
    solve(problem)
    return problem.value, np.linalg.norm(g0) * direction.value


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize(("c", "seed"), [(0.5, 0), (0.9, 1), (0.2, 2)])
def test_update_matches_the_primal_solved_by_cvxpy(k, c, seed):
    matrix = conflicting(k, 3 * k + 5, seed)
    value, expected = primal(matrix, c)
    d = make_combiner("conicgrad", c=c)(matrix)
    g0_norm = matrix.mean(0).norm().item()
    if value <= 0:
        assert_close(d, matrix.mean(0), rtol=1e-12)
        return
    # the dual objective σ* equals the primal value of our direction d/‖g0‖
    assert abs((matrix @ d).min().item() / g0_norm - value) <= 1e-5 * value
    assert_close(d, torch.from_numpy(expected), rtol=1e-5)


def test_update_stays_in_the_cone_with_the_length_of_g0():
    matrix, c = conflicting(10, 40, 3), 0.6
    d = make_combiner("conicgrad", c=c)(matrix)
    g0 = matrix.mean(0)
    assert d.norm().item() == pytest.approx(g0.norm().item(), rel=1e-9)
    assert d @ g0 >= c * d.norm() * g0.norm() * (1 - 1e-9)


def test_c_one_is_the_mean():
    matrix = conflicting(6, 20, 4)
    assert_close(make_combiner("conicgrad", c=1.0)(matrix), matrix.mean(0), rtol=1e-12)


def test_c_near_one_approaches_the_mean():
    matrix = conflicting(6, 20, 4)
    assert_close(make_combiner("conicgrad", c=0.9999)(matrix), matrix.mean(0), rtol=0.03)


def test_no_common_ascent_in_the_cone_returns_g0():
    # Tasks 1 and 2 pull apart and slightly against g0 = (0, 0.27, 0): along any d within 60° of g0
    # one of them loses, min(g1ᵀd, g2ᵀd) = −|d₁| − 0.1·d₂ < 0.
    g = torch.tensor([[1.0, -0.1, 0.0], [-1.0, -0.1, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    value, _ = primal(g, 0.5)
    assert value <= 1e-9
    assert_close(make_combiner("conicgrad", c=0.5)(g), g.mean(0), rtol=1e-12)


def test_direction_inside_the_cone_is_the_min_norm_direction():
    # Mildly conflicting tasks: the min-norm point of their hull lies inside a wide cone (η* = 0),
    # so d = ‖g0‖·ĝ_w with w the MGDA weights.
    matrix = conflicting(4, 20, 5).abs()
    mgda = make_combiner("mgda")(matrix)
    d = make_combiner("conicgrad", c=0.1)(matrix)
    assert_close(d, matrix.mean(0).norm() * mgda / mgda.norm(), rtol=1e-8)


GOLDEN_MATRIX = torch.tensor(
    [[1.0, -2.0, 0.5, 3.0], [-1.5, 0.5, 2.0, -1.0], [0.5, 1.0, -1.0, 2.0]], dtype=torch.float64
)
GOLDEN = [-0.4956222255713429, 0.6009476479328705, 0.728158872343546, 0.9584157480689632]
"""d for GOLDEN_MATRIX with c = 0.5, printed once from this implementation and checked against cvxpy."""


def test_golden_values():
    assert_close(make_combiner("conicgrad", c=0.5)(GOLDEN_MATRIX), torch.tensor(GOLDEN, dtype=torch.float64), rtol=1e-8)
    _, expected = primal(GOLDEN_MATRIX, 0.5)
    assert_close(torch.tensor(GOLDEN, dtype=torch.float64), torch.from_numpy(expected), rtol=1e-5)
