"""ConicGrad (Hassanpour et al., 2025): the update against an independent float64 solution of the primal
(cross-checked by cvxpy), its optimality conditions, the limits, and the cases where no direction in the
cone helps every task."""

import math

import cvxpy as cp
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
    mgda_reference,
    simplex_minimiser,
    solve,
)


class TestConicGrad(CombinerProperties):
    name = "conicgrad"
    invalid_hyper_parameters = [
        ({"c": 0.0}, "`c` must be in (0, 1], found 0.0"),
        ({"c": 1.3}, "`c` must be in (0, 1], found 1.3"),
        ({"c": float("nan")}, "`c` must be in (0, 1], found nan"),
        ({"c": "0.5"}, "`c` must be a number, found '0.5'"),
    ]

    def check_weights(self, g, weights, seed):
        assert_solves_the_primal(g, g.T @ weights, self.make().parameters.c)


class TestConicGradWideCone(TestConicGrad):
    hyper_parameters = {"c": 0.1}


def assert_solves_the_primal(g: np.ndarray, d: np.ndarray, c: float) -> None:
    """d = ‖g0‖·d*, d* maximising min_i g_iᵀd over {‖d‖ ≤ 1, g0ᵀd ≥ c‖g0‖‖d‖}, by its KKT conditions.

    The test matrices admit a direction in the cone that helps every task, so d* is a unit vector.
    It is optimal iff g_w = a·d* + b·(c‖g0‖d* − g0) for some w ∈ Δ held by the tasks of least gain,
    a ≥ 0, and b ≥ 0 only if d* lies on the cone's surface (the gradients of the active constraints)."""
    g0 = g.mean(0)
    length = np.linalg.norm(g0)
    unit = d / length
    assert np.linalg.norm(unit) == pytest.approx(1.0, rel=1e-12)
    cosine = g0 @ unit / length
    assert cosine >= c * (1 - 1e-12)
    gains = g @ unit
    assert gains.min() > 0
    least = gains - gains.min() <= 1e-8 * np.abs(gains).max()
    columns = [g[least].T, -unit[:, None]]
    if cosine - c <= 1e-8:
        columns.append(-(c * length * unit - g0)[:, None])
    system = np.block([[np.hstack(columns)], [np.ones(least.sum()), np.zeros(len(columns) - 1)]])
    right = np.concatenate([np.zeros(len(d)), [1.0]])
    multipliers = np.linalg.lstsq(system, right)[0]
    assert np.abs(system @ multipliers - right).max() <= SOLVER_ACCURACY * np.abs(system).max()
    assert multipliers.min() >= -SOLVER_ACCURACY


def reference(g: np.ndarray, c: float) -> np.ndarray:
    """‖g0‖·d* from MGDA's program, or from a CAGrad-like dual on the cone's surface, in float64.

    Without the cone, d* = g_m/‖g_m‖ (g_m MGDA's min-norm point): the answer whenever it lies in the cone.
    Otherwise the cone is active: d* = cĝ0 + s·u with s = sqrt(1 − c²), u ⊥ g0 a unit vector. The disc
    {cĝ0 + s·u: ‖u‖ ≤ 1} lies in the feasible set and holds d*, so d* maximises min_i (a_i + s·h_iᵀu)
    over ‖u‖ ≤ 1, with a_i = c·g_iᵀĝ0 and h_i = g_i − (g_iᵀĝ0)ĝ0: by minimax, u = h_v/‖h_v‖ with
    v = argmin_{v∈Δ} vᵀa + s‖h_v‖, and the optimal value is that minimum (≤ 0: no direction helps, d = g0)."""
    g0 = g.mean(0)
    length = np.linalg.norm(g0)
    axis = g0 / length
    min_norm = g.T @ mgda_reference(g)
    if np.linalg.norm(min_norm) <= 1e-12 * np.abs(g).max():
        return g0  # 0 is in the hull of the g_i: no direction helps every task
    if min_norm @ axis >= c * np.linalg.norm(min_norm):
        return length * min_norm / np.linalg.norm(min_norm)
    side = math.sqrt(1 - c**2)
    parallel = g @ axis
    orthogonal = g - np.outer(parallel, axis)
    objective = SimplexObjective(orthogonal, c * parallel, root=side)
    v = cp.Variable(g.shape[0])
    problem = cp.Problem(cp.Minimize(objective.cvxpy(v)), [v >= 0, cp.sum(v) == 1])
    solve(problem)
    if problem.value <= 1e-9 * np.abs(parallel).max():
        return g0
    combined = orthogonal.T @ simplex_minimiser(objective, start=v.value)
    return length * (c * axis + side * combined / np.linalg.norm(combined))


def primal(matrix: torch.Tensor, c: float) -> tuple[float, np.ndarray]:
    """The primal solved by cvxpy, straight from its definition: (value, ‖g0‖·d*), to ~1e-6."""
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
def test_update_matches_the_reference(k, c, seed):
    matrix = conflicting(k, 3 * k + 5, seed)
    expected = reference(as_numpy(matrix), c)
    assert_close(make_combiner("conicgrad", c=c)(matrix), torch.from_numpy(expected), rtol=SOLVER_ACCURACY)


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize(("c", "seed"), [(0.5, 0), (0.9, 1), (0.2, 2)])
def test_reference_agrees_with_cvxpy_on_the_primal(k, c, seed):
    # The reference's derivation, checked against the primal as defined (cvxpy is only ~1e-6 accurate).
    matrix = conflicting(k, 3 * k + 5, seed)
    expected = reference(as_numpy(matrix), c)
    value, solved = primal(matrix, c)
    if value <= 1e-9:
        assert_close(torch.from_numpy(expected), matrix.mean(0), rtol=1e-15)
    else:
        assert_close(torch.from_numpy(expected), torch.from_numpy(solved), rtol=1e-5)


def test_update_stays_in_the_cone_with_the_length_of_g0():
    matrix, c = conflicting(10, 40, 3), 0.6
    d = make_combiner("conicgrad", c=c)(matrix)
    g0 = matrix.mean(0)
    assert d.norm().item() == pytest.approx(g0.norm().item(), rel=1e-12)
    assert d @ g0 >= c * d.norm() * g0.norm() * (1 - 1e-12)


def test_c_one_is_the_mean():
    matrix = conflicting(6, 20, 4)
    assert_close(make_combiner("conicgrad", c=1.0)(matrix), matrix.mean(0), rtol=1e-12)


def test_c_near_one_is_the_exact_solution_near_the_mean():
    # c = 0.9999 leaves a cone of half-angle 0.81°: d is g0 turned by that angle, not g0 itself.
    matrix, c = conflicting(6, 20, 4), 0.9999
    d = make_combiner("conicgrad", c=c)(matrix)
    assert_close(d, torch.from_numpy(reference(as_numpy(matrix), c)), rtol=SOLVER_ACCURACY)
    g0 = matrix.mean(0)
    assert (d @ g0 / (d.norm() * g0.norm())).item() == pytest.approx(c, rel=1e-12)


def test_no_common_ascent_in_the_cone_returns_g0():
    # Tasks 1 and 2 pull apart and slightly against g0 = (0, 0.27, 0): along any d within 60° of g0
    # one of them loses, min(g1ᵀd, g2ᵀd) = −|d₁| − 0.1·d₂ < 0.
    g = torch.tensor([[1.0, -0.1, 0.0], [-1.0, -0.1, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    value, _ = primal(g, 0.5)
    assert value <= 1e-9
    assert_close(torch.from_numpy(reference(as_numpy(g), 0.5)), g.mean(0), rtol=1e-15)
    assert_close(make_combiner("conicgrad", c=0.5)(g), g.mean(0), rtol=1e-12)


def test_direction_inside_the_cone_is_the_min_norm_direction():
    # Mildly conflicting tasks: the min-norm point of their hull lies inside a wide cone, so d = ‖g0‖·ĝ_w
    # with w the MGDA weights.
    matrix = conflicting(4, 20, 5).abs()
    mgda = make_combiner("mgda")(matrix)
    d = make_combiner("conicgrad", c=0.1)(matrix)
    assert_close(d, matrix.mean(0).norm() * mgda / mgda.norm(), rtol=SOLVER_ACCURACY)


GOLDEN = [-0.495622225571343, 0.6009476479328704, 0.7281588723435461, 0.9584157480689631]
"""d for GOLDEN_MATRIX with c = 0.5, from `reference`."""


def test_golden_values():
    golden = torch.tensor(GOLDEN, dtype=torch.float64)
    # The reference computes d to rounding; the combiner to its solver's accuracy.
    assert_close(torch.from_numpy(reference(as_numpy(GOLDEN_MATRIX), 0.5)), golden, rtol=1e-15)
    assert_close(make_combiner("conicgrad", c=0.5)(GOLDEN_MATRIX), golden, rtol=SOLVER_ACCURACY)
