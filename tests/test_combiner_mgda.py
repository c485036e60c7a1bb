"""MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the hull of the task gradients."""

import cvxpy as cp
import numpy as np
import pytest
import torch

from mtrl.combiners import make_combiner
from tests.combiner_properties import (
    SIZES,
    CombinerProperties,
    as_numpy,
    assert_close,
    conflicting,
    simplex_weights,
    solve,
)


class TestMGDA(CombinerProperties):
    name = "mgda"


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_cvxpy(k, seed):
    matrix = conflicting(k, 3 * k + 5, seed)
    g = as_numpy(matrix)
    weights, constraints = simplex_weights(k)
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(g.T @ weights)), constraints)
    solve(problem)
    combiner = make_combiner("mgda")
    d = combiner(matrix)
    w = as_numpy(combiner.last_weights)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert 0.5 * np.sum((g.T @ w) ** 2) <= problem.value * (1 + 1e-6)
    assert_close(d, torch.from_numpy(g.T @ weights.value), rtol=1e-5)


def test_min_norm_point_is_a_common_descent_direction():
    # Optimality on the simplex: g_iᵀd ≥ ‖d‖² for every task, with equality where w_i > 0.
    matrix = conflicting(12, 60, 2)
    combiner = make_combiner("mgda")
    d = combiner(matrix)
    products, squared = matrix @ d, d @ d
    assert (products >= squared * (1 - 1e-9)).all()
    active = combiner.last_weights > 1e-6
    torch.testing.assert_close(products[active], squared.expand(int(active.sum())), rtol=1e-8, atol=0)


def test_zero_in_the_hull_gives_zero():
    # g1, g2 and their negative mean span a hull containing 0.
    g = conflicting(2, 10, 3)
    d = make_combiner("mgda")(torch.cat([g, -g.mean(0, keepdim=True)]))
    assert d.norm() <= 1e-6 * g.norm()


def test_golden_values():
    # Printed once from this implementation; cross-checked against cvxpy.
    matrix = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, 0.5, 2.0, -1.0], [0.5, 1.0, -1.0, 2.0]], dtype=torch.float64)
    golden = [-0.37175102599141197, 0.4507523939792555, 0.5461696306435998, 0.7188782489747134]
    assert_close(make_combiner("mgda")(matrix), torch.tensor(golden, dtype=torch.float64), rtol=1e-8)
