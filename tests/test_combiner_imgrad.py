"""IMGrad (Zhou et al., 2025): both variants' duals against an independent float64 solution."""

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
    mgda_reference,
    simplex_minimiser,
)


class TestIMGradPaper(CombinerProperties):
    name = "imgrad"
    identical_rows_factor = (1 + 0.8) / (1 + 0.8**2)  # (1 + c)/r with the default rescale = 1
    invalid_hyper_parameters = [
        ({"c": -1.0}, "`c` must be >= 0, found -1.0"),
        ({"c": True}, "`c` must be a number, found True"),
        ({"variant": "both"}, "`variant` must be one of 'paper', 'code', found 'both'"),
        ({"rescale": 5}, "`rescale` must be one of 0, 1, 2, found 5"),
    ]

    def check_weights(self, g, weights, seed):
        parameters = self.make().parameters
        c, rescale = parameters.c, parameters.rescale
        dual, scale = conflict_averse_dual(g, weights, (1.0, 1 + c**2, 1 + c)[rescale])
        assert scale == pytest.approx(c * np.linalg.norm(g.mean(0)) / np.linalg.norm(g.T @ dual), rel=1e-12)
        dual_objective(g, c, parameters.variant).assert_minimised_at(dual, SOLVER_ACCURACY)


class TestIMGradCode(TestIMGradPaper):
    hyper_parameters = {"variant": "code", "rescale": 2}
    identical_rows_factor = 1.0  # (1 + c)/(1 + c)


def dual_objective(g: np.ndarray, c: float, variant: str) -> SimplexObjective:
    """The variant's dual, with cos θ = cos∠(g0, g_m) from MGDA's min-norm point g_m and μ = max(cos θ, 0).

    paper: (1−μ)(g_wᵀg0 + c‖g0‖‖g_w‖) + μ‖g_w‖²;  code: (1.5 − cos θ)·g_wᵀg0 + cos θ·c‖g0‖‖g_w‖."""
    g0 = g.mean(0)
    min_norm = g.T @ mgda_reference(g)
    cosine = max(min_norm @ g0 / (np.linalg.norm(min_norm) * np.linalg.norm(g0)), 0.0)
    radius = c * math.sqrt(g0 @ g0)
    if variant == "paper":
        return SimplexObjective(g, (1 - cosine) * (g @ g0), root=(1 - cosine) * radius, square=cosine)
    return SimplexObjective(g, (1.5 - cosine) * (g @ g0), root=cosine * radius)


def reference(g: np.ndarray, c: float, variant: str, divisor: float) -> np.ndarray:
    """d = (g0 + c‖g0‖/‖g_w*‖·g_w*)/r with w* the variant's dual minimiser in float64."""
    g0 = g.mean(0)
    combined = g.T @ simplex_minimiser(dual_objective(g, c, variant))
    return (g0 + c * np.linalg.norm(g0) / np.linalg.norm(combined) * combined) / divisor


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize(("variant", "seed"), [("paper", 0), ("code", 1)])
def test_matches_the_reference(k, variant, seed):
    matrix = conflicting(k, 3 * k + 5, seed)
    d = make_combiner("imgrad", variant=variant)(matrix)
    assert_close(d, torch.from_numpy(reference(as_numpy(matrix), 0.8, variant, 1 + 0.8**2)), rtol=SOLVER_ACCURACY)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_c_zero_is_the_mean(variant):
    matrix = conflicting(6, 20, 2)
    assert_close(make_combiner("imgrad", c=0.0, variant=variant)(matrix), matrix.mean(0), rtol=1e-12)


def test_variants_differ():
    matrix = conflicting(8, 30, 3)
    paper, code = (make_combiner("imgrad", variant=v)(matrix) for v in ("paper", "code"))
    assert (paper - code).norm() > 1e-3 * paper.norm()


GOLDEN = {
    # d for GOLDEN_MATRIX with c = 0.8 and rescale 1, from `reference`.
    "paper": [-0.27388143615002986, 0.24569166132061548, 0.6615596545559232, 1.2207635277913569],
    "code": [-0.3764862984491773, 0.2854102939458097, 0.7321338150776061, 0.9356470892907728],
}


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_golden_values(variant):
    golden = torch.tensor(GOLDEN[variant], dtype=torch.float64)
    # The reference computes d to rounding; the combiner to its solvers' accuracy.
    assert_close(torch.from_numpy(reference(as_numpy(GOLDEN_MATRIX), 0.8, variant, 1.64)), golden, rtol=1e-15)
    assert_close(make_combiner("imgrad", variant=variant)(GOLDEN_MATRIX), golden, rtol=SOLVER_ACCURACY)
