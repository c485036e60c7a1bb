"""CAGrad (Liu et al., NeurIPS 2021): the exact dual against an independent float64 solution, the primal's
optimality conditions, and the authors' Meta-World recipe against a literal numpy transcription of it."""

import math

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
    conflict_averse_dual,
    conflicting,
    simplex_minimiser,
)


class TestCAGrad(CombinerProperties):
    name = "cagrad"
    identical_rows_factor = (1 + 0.4) / (1 + 0.4**2)  # (1 + c)/r with the default rescale = 1
    invalid_hyper_parameters = [
        ({"c": -0.1}, "`c` must be >= 0, found -0.1"),
        ({"c": float("nan")}, "`c` must be >= 0, found nan"),
        ({"c": "0.4"}, "`c` must be a number, found '0.4'"),
        ({"rescale": 3}, "`rescale` must be one of 0, 1, 2, found 3"),
        ({"rescale": True}, "`rescale` must be one of 0, 1, 2, found True"),
        ({"solver": "cvxpy"}, "`solver` must be one of 'exact', 'mtrl', found 'cvxpy'"),
    ]

    def check_weights(self, g, weights, seed):
        parameters = self.make().parameters
        c = parameters.c
        assert_solves_the_dual(g, weights, c, (1.0, 1 + c**2, 1 + c)[parameters.rescale])


class TestCAGradNoRescale(TestCAGrad):
    hyper_parameters = {"c": 0.9, "rescale": 0}
    identical_rows_factor = 1.9


def dual_objective(g: np.ndarray, c: float) -> SimplexObjective:
    """F(w) = g_wᵀg0 + c‖g0‖·‖g_w‖ (Liu et al., Eq. 3)."""
    gram = g @ g.T
    return SimplexObjective(g, gram.mean(1), root=c * math.sqrt(gram.mean()))


def assert_solves_the_dual(g: np.ndarray, weights: np.ndarray, c: float, divisor: float) -> None:
    """The effective weights are (1/K + λw*)/r with w* the dual's minimiser and λ = c‖g0‖/‖g_w*‖."""
    dual, scale = conflict_averse_dual(g, weights, divisor)
    assert scale == pytest.approx(c * np.linalg.norm(g.mean(0)) / np.linalg.norm(g.T @ dual), rel=1e-12)
    dual_objective(g, c).assert_minimised_at(dual, SOLVER_ACCURACY)


def reference(g: np.ndarray, c: float, divisor: float = 1.0) -> np.ndarray:
    """d = (g0 + c‖g0‖/‖g_w*‖·g_w*)/r with w* the dual's minimiser in float64."""
    g0 = g.mean(0)
    combined = g.T @ simplex_minimiser(dual_objective(g, c))
    return (g0 + c * np.linalg.norm(g0) / np.linalg.norm(combined) * combined) / divisor


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize(("c", "seed"), [(0.4, 0), (0.9, 1)])
def test_exact_solver_matches_the_reference(k, c, seed):
    matrix = conflicting(k, 3 * k + 5, seed)
    d = make_combiner("cagrad", c=c)(matrix)
    assert_close(d, torch.from_numpy(reference(as_numpy(matrix), c, 1 + c**2)), rtol=SOLVER_ACCURACY)


def test_c_zero_is_the_mean():
    matrix = conflicting(6, 20, 2)
    for solver in ("exact", "mtrl"):
        assert_close(make_combiner("cagrad", c=0.0, solver=solver)(matrix), matrix.mean(0), rtol=1e-12)


@pytest.mark.parametrize(("rescale", "divisor"), [(0, 1.0), (1, 1.49), (2, 1.7)])
def test_rescale_divides_the_update(rescale, divisor):
    matrix = conflicting(5, 20, 3)
    unscaled = make_combiner("cagrad", c=0.7, rescale=0)(matrix)
    assert_close(make_combiner("cagrad", c=0.7, rescale=rescale)(matrix), unscaled / divisor, rtol=1e-12)


def test_update_solves_the_primal():
    # Primal (Liu et al., Eq. 2): d maximises min_i g_iᵀd over the ball ‖d − g0‖ ≤ c‖g0‖. It lies on the
    # sphere, and the tasks with the least gain hold weights w ∈ Δ whose g_w points along d − g0 (KKT).
    matrix, c = conflicting(10, 40, 4), 0.5
    combiner = make_combiner("cagrad", c=c, rescale=0)
    d = combiner(matrix).numpy()
    g = matrix.numpy()
    g0 = g.mean(0)
    assert np.linalg.norm(d - g0) == pytest.approx(c * np.linalg.norm(g0), rel=1e-12)
    dual, _ = conflict_averse_dual(g, as_numpy(combiner.last_weights), 1.0)
    gains = g @ d
    least = dual > 0
    assert dual.min() >= -1e-15 and 1 < least.sum() < 10
    assert gains[least] == pytest.approx(np.full(least.sum(), gains.min()), rel=1e-12)
    combined = g.T @ dual
    assert_close(
        torch.from_numpy(d - g0),
        torch.from_numpy(c * np.linalg.norm(g0) * combined / np.linalg.norm(combined)),
        rtol=1e-12,
    )
    assert gains.min() > (g @ g0).min()


# ----- the authors' recipe, step for step -------------------------------------------------------
def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def recipe_reference(g: np.ndarray, c: float) -> np.ndarray:
    """The authors' Meta-World recipe for the dual (solver="mtrl"), steps 1–4, transcribed literally."""
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
    # The same arithmetic in another order: equal to rounding.
    assert_close(d, torch.from_numpy(recipe_reference(as_numpy(matrix), c)), rtol=1e-12)


def test_mtrl_recipe_differs_from_the_exact_solution():
    # 20 SGD steps do not solve the dual: the recipe is a different method, not a slower solver.
    matrix = conflicting(10, 35, 5)
    recipe = make_combiner("cagrad", c=0.9, solver="mtrl")(matrix)
    exact = make_combiner("cagrad", c=0.9)(matrix)
    assert (recipe - exact).norm() > 1e-3 * exact.norm()


GOLDEN = {
    # d for GOLDEN_MATRIX with c = 0.5 (rescale 1), from `reference` and `recipe_reference`.
    "exact": [-0.33022649033029366, 0.09254180613822707, 0.8072163749085451, 1.011943734105703],
    "mtrl": [-0.3166305919331452, -0.01936008661315043, 0.8200511619128281, 0.8686138967261531],
}


@pytest.mark.parametrize("solver", ["exact", "mtrl"])
def test_golden_values(solver):
    golden = torch.tensor(GOLDEN[solver], dtype=torch.float64)
    g = as_numpy(GOLDEN_MATRIX)
    expected = reference(g, 0.5, 1.25) if solver == "exact" else recipe_reference(g, 0.5)
    # The references compute d to rounding; the combiner to its solver's accuracy.
    assert_close(torch.from_numpy(expected), golden, rtol=1e-15)
    accuracy = SOLVER_ACCURACY if solver == "exact" else 1e-12
    assert_close(make_combiner("cagrad", c=0.5, solver=solver)(GOLDEN_MATRIX), golden, rtol=accuracy)
