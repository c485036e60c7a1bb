"""MGDA (Sener & Koltun, NeurIPS 2018): the min-norm point of the hull of the task gradients, against
an independent float64 solution of the same program."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from mtrl.combiners import make_combiner
from tests.combiner_properties import (
    GOLDEN_MATRIX,
    SIZES,
    SOLVER_ACCURACY,
    CombinerProperties,
    SimplexObjective,
    as_numpy,
    assert_close,
    conflicting,
    exact_gram,
    mgda_reference,
)


class TestMGDA(CombinerProperties):
    name = "mgda"

    def check_weights(self, g, weights, seed):
        # w* = argmin_{w∈Δ} ½‖g_w‖², whose gradient in w_i is g_iᵀg_w.
        SimplexObjective(g, np.zeros(len(weights)), square=0.5).assert_minimised_at(weights, SOLVER_ACCURACY)


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_reference(k, seed):
    matrix = conflicting(k, 3 * k + 5, seed)
    g = as_numpy(matrix)
    combiner = make_combiner("mgda")
    d = combiner(matrix)
    w = mgda_reference(g)
    assert_close(combiner.last_weights, torch.from_numpy(w), rtol=SOLVER_ACCURACY)
    assert_close(d, torch.from_numpy(g.T @ w), rtol=SOLVER_ACCURACY)


@pytest.mark.parametrize("seed", [31, 58])
def test_tasks_whose_bound_multiplier_is_tiny(seed):
    # On these matrices a few tasks have weight 0 at the optimum but a bound multiplier near 0 (or a tiny
    # weight): the interior point method ends with both ~1e-6 and misjudges which weights vanish. The solver
    # once returned such weights uncorrected, d off by 9e-5 (seed 31) and 1.4e-5 (seed 58).
    matrix = conflicting(50, 155, seed)
    g = as_numpy(matrix)
    combiner = make_combiner("mgda")
    d = combiner(matrix)
    w = mgda_reference(g)
    assert_close(combiner.last_weights, torch.from_numpy(w), rtol=SOLVER_ACCURACY)
    assert_close(d, torch.from_numpy(g.T @ w), rtol=SOLVER_ACCURACY)


def test_min_norm_point_is_a_common_descent_direction():
    # Optimality on the simplex: g_iᵀd ≥ ‖d‖² for every task, with equality where w_i > 0.
    matrix = conflicting(12, 60, 2)
    combiner = make_combiner("mgda")
    d = combiner(matrix)
    products, squared = matrix @ d, d @ d
    assert (products >= squared * (1 - 1e-12)).all()
    active = combiner.last_weights > 0
    assert 1 < int(active.sum()) < 12
    torch.testing.assert_close(products[active], squared.expand(int(active.sum())), rtol=1e-12, atol=0)


def test_zero_in_the_hull_gives_zero():
    # g1, g2 and their negative mean span a hull containing 0.
    g = conflicting(2, 10, 3)
    d = make_combiner("mgda")(torch.cat([g, -g.mean(0, keepdim=True)]))
    assert d.norm() <= 1e-12 * g.norm()


GOLDEN_WEIGHTS = [Fraction(155, 1462), Fraction(676, 1462), Fraction(631, 1462)]
"""w* for GOLDEN_MATRIX, solved by hand on the face w > 0: A w = ν1, Σw = 1, in rational arithmetic."""
GOLDEN = [-1087 / 2924, 659 / 1462, 1597 / 2924, 1051 / 1462]
"""d = Gᵀw* for GOLDEN_MATRIX, from GOLDEN_WEIGHTS in rational arithmetic."""


def test_golden_values():
    # The golden weights meet the KKT conditions exactly: all positive, Σw = 1, (Aw)_i equal for all i.
    gram = exact_gram(GOLDEN_MATRIX)
    gradient = {sum(a * w for a, w in zip(row, GOLDEN_WEIGHTS, strict=True)) for row in gram}
    assert min(GOLDEN_WEIGHTS) > 0 and sum(GOLDEN_WEIGHTS) == 1 and len(gradient) == 1
    weights = np.array([float(w) for w in GOLDEN_WEIGHTS])
    golden = torch.tensor(GOLDEN, dtype=torch.float64)
    assert_close(torch.from_numpy(as_numpy(GOLDEN_MATRIX).T @ weights), golden, rtol=1e-15)
    # The float64 reference finds them to rounding; the combiner to its solver's accuracy.
    assert_close(torch.from_numpy(mgda_reference(as_numpy(GOLDEN_MATRIX))), torch.from_numpy(weights), rtol=1e-15)
    assert_close(make_combiner("mgda")(GOLDEN_MATRIX), golden, rtol=SOLVER_ACCURACY)
