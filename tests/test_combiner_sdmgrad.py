"""SDMGrad (Xiao, Ban & Ji, NeurIPS 2023): the exact QP against an independent float64 solution, its
limits, and the authors' Meta-World recipe against a literal numpy transcription of it."""

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
    simplex_minimiser,
)


class TestSDMGrad(CombinerProperties):
    name = "sdmgrad"
    invalid_hyper_parameters = [
        ({"lam": -1}, "`lam` must be >= 0, found -1"),
        ({"lam": float("nan")}, "`lam` must be >= 0, found nan"),
        ({"lam": "0.6"}, "`lam` must be a number, found '0.6'"),
        ({"solver": "sgd"}, "`solver` must be one of 'exact', 'mtrl', found 'sgd'"),
    ]

    def check_weights(self, g, weights, seed):
        assert_solves_the_dual(g, weights, self.make().parameters.lam)


class TestSDMGradSmallLambda(TestSDMGrad):
    hyper_parameters = {"lam": 0.05}


def dual_objective(g: np.ndarray, lam: float) -> SimplexObjective:
    """½‖g_w + λg0‖² less its constant ½λ²‖g0‖²: ½‖g_w‖² + λ·g_wᵀg0."""
    return SimplexObjective(g, lam * (g @ g.mean(0)), square=0.5)


def assert_solves_the_dual(g: np.ndarray, weights: np.ndarray, lam: float) -> None:
    """The effective weights are (w* + λ/K)/(1 + λ) with w* the dual's minimiser."""
    dual = (1 + lam) * weights - lam / g.shape[0]
    dual_objective(g, lam).assert_minimised_at(dual, SOLVER_ACCURACY)


def reference(g: np.ndarray, lam: float) -> np.ndarray:
    """d = (g_w* + λg0)/(1 + λ) with w* the dual's minimiser in float64."""
    return (g.T @ simplex_minimiser(dual_objective(g, lam)) + lam * g.mean(0)) / (1 + lam)


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize(("lam", "seed"), [(0.6, 0), (0.1, 1)])
def test_exact_solver_matches_the_reference(k, lam, seed):
    matrix = conflicting(k, 3 * k + 5, seed)
    d = make_combiner("sdmgrad", lam=lam)(matrix)
    assert_close(d, torch.from_numpy(reference(as_numpy(matrix), lam)), rtol=SOLVER_ACCURACY)


def test_large_lambda_is_the_mean():
    matrix = conflicting(8, 30, 2)
    assert_close(make_combiner("sdmgrad", lam=1e7)(matrix), matrix.mean(0), rtol=1e-6)


def test_small_lambda_is_mgda():
    matrix = conflicting(8, 30, 3)
    assert_close(make_combiner("sdmgrad", lam=1e-9)(matrix), make_combiner("mgda")(matrix), rtol=1e-6)


# ----- the authors' recipe, step for step -------------------------------------------------------
def project_onto_simplex(v: np.ndarray) -> np.ndarray:
    """The authors' euclidean_proj_simplex (sort-based, Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, len(v) + 1) > cumulative - 1)[0][-1]
    return np.clip(v - (cumulative[rho] - 1) / (rho + 1.0), 0, None)


def recipe_reference(g: np.ndarray, lam: float, lr: float) -> np.ndarray:
    """The authors' Meta-World recipe for the dual (solver="mtrl"), transcribed literally."""
    k = g.shape[0]
    a = g @ g.T
    s = np.sqrt(np.diag(a) + 1e-4).mean()
    a_hat = a / s**2
    b = a_hat.mean(axis=1)
    gg = b.mean()
    w, buffer = np.full(k, 1 / k), None
    best_objective, best_w = np.inf, None
    for evaluation in range(21):
        objective = w @ a_hat @ w + 2 * lam * w @ b + lam**2 * gg
        if objective < best_objective:
            best_objective, best_w = objective, w.copy()
        if evaluation < 20:
            gradient = 2 * a_hat @ w + 2 * lam * b
            buffer = gradient if buffer is None else 0.5 * buffer + gradient  # torch.optim.SGD momentum
            w = project_onto_simplex(w - lr * buffer)
    return (best_w @ g + lam * g.mean(0)) / (1 + lam)


@pytest.mark.parametrize("k", [2, 3, 10, 50])
@pytest.mark.parametrize("lam", [0.6, 0.1])
def test_mtrl_recipe_matches_the_reference(k, lam):
    matrix = conflicting(k, 3 * k + 5, 20 + k)
    d = make_combiner("sdmgrad", lam=lam, solver="mtrl")(matrix)
    lr = 50.0 if k == 50 else 25.0
    # The same arithmetic in another order: equal to rounding.
    assert_close(d, torch.from_numpy(recipe_reference(as_numpy(matrix), lam, lr)), rtol=1e-12)


def test_mtrl_recipe_keeps_the_uniform_start_at_50_tasks():
    # Known behaviour of the recipe: the uniform start is often the best iterate (lr 50 overshoots), and
    # the recipe then returns g0 exactly, as on this matrix. Faithful, not a bug; the exact solver does not.
    matrix = conflicting(50, 150, 2)
    assert_close(make_combiner("sdmgrad", solver="mtrl")(matrix), matrix.mean(0), rtol=1e-12)
    assert (make_combiner("sdmgrad")(matrix) - matrix.mean(0)).norm() > 0.01 * matrix.mean(0).norm()


RECIPE_MATRIX = torch.tensor(
    [
        [-0.45, 1.56, 3.62, -0.85, 1.82, 1.06],
        [18.19, -12.53, -19.46, 10.69, 1.19, -0.73],
        [-0.02, -0.94, -3.07, -0.93, 0.61, 0.1],
        [0.68, 0.01, -0.46, 0.12, -0.38, -0.24],
        [-0.09, 0.02, -0.29, 0.03, -0.51, 0.02],
    ],
    dtype=torch.float64,
)
"""On GOLDEN_MATRIX the recipe keeps its uniform start (and returns g0); on this one it moves."""


GOLDEN_WEIGHTS = [Fraction(0), Fraction(239, 445), Fraction(206, 445)]
"""w* for GOLDEN_MATRIX and λ = 3/5, solved by hand on the face w_1 = 0 in rational arithmetic."""
GOLDEN = [-511 / 1424, 281 / 712, 811 / 1424, 529 / 712]
"""d = (g_w* + λg0)/(1 + λ) from GOLDEN_WEIGHTS, in rational arithmetic."""
RECIPE_GOLDEN = [1.092, 0.084, 0.788, 0.14825, 1.34225, 0.67825]
"""d for RECIPE_MATRIX by the recipe (λ = 0.6), from `recipe_reference`."""


def test_golden_values():
    # The golden weights meet the KKT conditions exactly: ∂/∂w_i = (Aw + λA1/K)_i equal on the support
    # {2, 3} and larger for task 1, which has weight 0.
    lam, gram = Fraction(3, 5), exact_gram(GOLDEN_MATRIX)
    gradient = [sum((a * (w + lam / 3) for a, w in zip(row, GOLDEN_WEIGHTS, strict=True)), Fraction(0)) for row in gram]
    assert sum(GOLDEN_WEIGHTS) == 1 and min(GOLDEN_WEIGHTS[1:]) > 0 and gradient[1] == gradient[2] < gradient[0]
    weights = np.array([float(w) for w in GOLDEN_WEIGHTS])
    g = as_numpy(GOLDEN_MATRIX)
    golden = torch.tensor(GOLDEN, dtype=torch.float64)
    assert_close(torch.from_numpy((g.T @ weights + 0.6 * g.mean(0)) / 1.6), golden, rtol=1e-15)
    assert_close(torch.from_numpy(reference(g, 0.6)), golden, rtol=1e-15)
    assert_close(make_combiner("sdmgrad")(GOLDEN_MATRIX), golden, rtol=SOLVER_ACCURACY)

    recipe = torch.tensor(RECIPE_GOLDEN, dtype=torch.float64)
    assert_close(torch.from_numpy(recipe_reference(as_numpy(RECIPE_MATRIX), 0.6, lr=25.0)), recipe, rtol=1e-15)
    assert_close(make_combiner("sdmgrad", solver="mtrl")(RECIPE_MATRIX), recipe, rtol=1e-13)
