"""CAGrad (Liu et al., NeurIPS 2021): the exact dual against cvxpy, and the authors' Meta-World recipe
against a literal numpy transcription of the recipe (docs/combiners.md#cagrad)."""

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


class TestCAGrad(CombinerProperties):
    name = "cagrad"
    identical_rows_factor = (1 + 0.4) / (1 + 0.4**2)  # (1 + c)/r with the default rescale = 1


class TestCAGradNoRescale(CombinerProperties):
    name = "cagrad"
    hyper_parameters = {"c": 0.9, "rescale": 0}
    identical_rows_factor = 1.9


def dual_weights(combiner, matrix: torch.Tensor) -> np.ndarray:
    """w* recovered from the effective weights (1/K + λw*)/r, since Σw* = 1."""
    k, c = matrix.shape[0], combiner.c
    divisor = (1.0, 1 + c**2, 1 + c)[combiner.rescale]
    scaled = divisor * as_numpy(combiner.last_weights) - 1 / k
    return scaled / scaled.sum()


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize(("c", "seed"), [(0.4, 0), (0.9, 1)])
def test_exact_solver_matches_cvxpy(k, c, seed):
    matrix = conflicting(k, 3 * k + 5, seed)
    g, g0 = as_numpy(matrix), as_numpy(matrix.mean(0))
    radius = c * np.linalg.norm(g0)
    weights, constraints = simplex_weights(k)
    problem = cp.Problem(cp.Minimize((g @ g0) @ weights + radius * cp.norm(g.T @ weights)), constraints)
    solve(problem)
    reference = g.T @ weights.value
    expected = (g0 + radius / np.linalg.norm(reference) * reference) / (1 + c**2)

    combiner = make_combiner("cagrad", c=c)
    d = combiner(matrix)
    w = dual_weights(combiner, matrix)
    objective = (g @ g0) @ w + radius * np.linalg.norm(g.T @ w)
    assert abs(objective - problem.value) <= 1e-6 * abs(problem.value)
    assert_close(d, torch.from_numpy(expected), rtol=1e-5)


def test_c_zero_is_the_mean():
    matrix = conflicting(6, 20, 2)
    for solver in ("exact", "mtrl"):
        assert_close(make_combiner("cagrad", c=0.0, solver=solver)(matrix), matrix.mean(0), rtol=1e-12)


@pytest.mark.parametrize(("rescale", "divisor"), [(0, 1.0), (1, 1.49), (2, 1.7)])
def test_rescale_divides_the_update(rescale, divisor):
    matrix = conflicting(5, 20, 3)
    unscaled = make_combiner("cagrad", c=0.7, rescale=0)(matrix)
    assert_close(make_combiner("cagrad", c=0.7, rescale=rescale)(matrix), unscaled / divisor, rtol=1e-12)


def test_update_keeps_to_the_ball_and_raises_the_worst_task():
    # Primal (Liu et al., Eq. 2): ‖d − g0‖ ≤ c‖g0‖, and min_i g_iᵀd at least that of g0.
    matrix, c = conflicting(10, 40, 4), 0.5
    d = make_combiner("cagrad", c=c, rescale=0)(matrix)
    g0 = matrix.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-9)
    assert (matrix @ d).min() >= (matrix @ g0).min()


# ----- the authors' recipe, step for step -------------------------------------------------------
def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def recipe_reference(g: np.ndarray, c: float) -> np.ndarray:
    """CAGrad solver="mtrl" (docs/combiners.md#cagrad), transcribed literally."""
    k = g.shape[0]
    a = g @ g.T
    s = np.sqrt(np.diag(a) + 1e-4).mean()
    a_hat = a / s**2
    b = a_hat.mean(axis=1)
    gg = b.mean()
    cc = c * np.sqrt(gg + 1e-4)
    lr = 50.0 if k == 50 else 25.0
    v, buffer = np.zeros(k), None
    best_objective, best_v = np.inf, None
    for evaluation in range(21):
        w = softmax(v)
        objective = w @ b + cc * np.sqrt(w @ a_hat @ w + 1e-4)
        if objective < best_objective:
            best_objective, best_v = objective, v.copy()
        if evaluation < 20:
            by_weight = b + cc * (a_hat @ w) / np.sqrt(w @ a_hat @ w + 1e-4)
            gradient = (np.diag(w) - np.outer(w, w)) @ by_weight  # softmax Jacobian, symmetric
            buffer = gradient if buffer is None else 0.5 * buffer + gradient  # torch.optim.SGD momentum
            v = v - lr * buffer
    w = softmax(best_v)
    lam = cc / (np.sqrt(w @ a_hat @ w + 1e-4) + 1e-4)
    return ((1 / k + lam * w) @ g) / (1 + c**2)


@pytest.mark.parametrize("k", [2, 3, 10, 50])
@pytest.mark.parametrize("c", [0.5, 0.9])
def test_mtrl_recipe_matches_the_reference(k, c):
    matrix = conflicting(k, 3 * k + 5, 10 + k)
    d = make_combiner("cagrad", c=c, solver="mtrl")(matrix)
    assert_close(d, torch.from_numpy(recipe_reference(as_numpy(matrix), c)), rtol=1e-10)


def test_mtrl_recipe_differs_from_the_exact_solution():
    # 20 SGD steps do not solve the dual: the recipe is a different method, not a slower solver.
    matrix = conflicting(10, 35, 5)
    recipe = make_combiner("cagrad", c=0.9, solver="mtrl")(matrix)
    exact = make_combiner("cagrad", c=0.9)(matrix)
    assert (recipe - exact).norm() > 1e-3 * exact.norm()


GOLDEN_MATRIX = torch.tensor(
    [[1.0, -2.0, 0.5, 3.0], [-1.5, 0.5, 2.0, -1.0], [0.5, 1.0, -1.0, 2.0]], dtype=torch.float64
)
GOLDEN = {
    # d for GOLDEN_MATRIX, printed once from this implementation and cross-checked by the references above.
    "exact": [-0.3302264903302937, 0.09254180613822693, 0.807216374908545, 1.011943734105703],
    "mtrl": [-0.3166305919331451, -0.019360086613150418, 0.8200511619128282, 0.8686138967261531],
}


@pytest.mark.parametrize("solver", ["exact", "mtrl"])
def test_golden_values(solver):
    d = make_combiner("cagrad", c=0.5, solver=solver)(GOLDEN_MATRIX)
    assert_close(d, torch.tensor(GOLDEN[solver], dtype=torch.float64), rtol=1e-8)
