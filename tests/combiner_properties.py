"""Checks every combiner must pass, shared by the per-method test files (tests/test_combiner_*.py).

A test file subclasses `CombinerProperties`, names the combiner and states what its maths promises
(the scale convention, how d scales with G, whether it draws from the generator, whether it keeps
state) and how its weights are certified (`check_weights`: the method's own optimality or defining
conditions, checked in numpy from G alone); pytest then runs every check below on it.

The independent references the method tests compare with live here too. `simplex_minimiser`
solves the convex programs on the simplex that the duals are, in float64 and to float64 precision:
cvxpy (Clarabel) finds the face of the simplex the minimiser lies on, then Newton's method on the
KKT equations of that face removes cvxpy's ~1e-7 error, and the KKT conditions are asserted.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Any, ClassVar

import cvxpy as cp
import numpy as np
import pytest
import torch

from mtrl.combiners import COMBINERS, Combiner, make_combiner

DTYPES = [torch.float64, torch.float32]
SIZES = [2, 3, 10, 50]
"""The K the exact solvers are checked at against the references."""

GOLDEN_MATRIX = torch.tensor(
    [[1.0, -2.0, 0.5, 3.0], [-1.5, 0.5, 2.0, -1.0], [0.5, 1.0, -1.0, 2.0]], dtype=torch.float64
)
"""The small matrix every method's golden values are given for."""

KKT_TOLERANCE = 1e-12
"""Relative Frank–Wolfe gap below which a point counts as the minimiser of a program on the simplex
(`SimplexObjective.assert_minimised_at`): rounding alone leaves a few 1e-15."""

SOLVER_ACCURACY = 1e-12
"""Relative accuracy of the combiners' exact solvers, for comparisons with the references: their Newton
polish ends at the minimiser to rounding (~1e-15 on the test matrices, whose A spans ~4 decades)."""


def conflicting(k: int, n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A shared direction plus task-specific parts, with norms spread over ~2 decades and a third
    of the tasks pulling against the shared direction: the conflicts the combiners exist for."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(n, generator=generator, dtype=torch.float64)
    rows = 0.6 * common + torch.randn(k, n, generator=generator, dtype=torch.float64)
    rows[: max(1, k // 3)] *= -0.5
    scales = torch.exp(torch.randn(k, 1, generator=generator, dtype=torch.float64))
    return (rows * scales).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Equal up to `rtol` relative to the largest entry of `expected` (entries near 0 included)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def as_numpy(matrix: torch.Tensor) -> np.ndarray:
    return matrix.detach().cpu().double().numpy()


def solve(problem: cp.Problem) -> None:
    """Solve with Clarabel at tight tolerances (its defaults leave ~1e-4 in the solution)."""
    try:
        with warnings.catch_warnings():
            # At these tolerances Clarabel often stops at "almost solved", which is what we want.
            warnings.filterwarnings("ignore", "Solution may be inaccurate")
            problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, max_iter=500)
    except cp.SolverError:
        problem.solve(solver=cp.CLARABEL)
    assert problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE), problem.status


class SimplexObjective:
    """f(w) = pᵀw + κ·‖Rᵀw‖ + q·‖Rᵀw‖² on Δ (R's rows: vectors such as the g_i), with its derivatives.

    Every exact dual in the combiner docstrings has this form: MGDA (q = ½), SDMGrad (p = λA1/K, q = ½),
    CAGrad (p = A1/K, κ = c‖g0‖), both IMGrad variants, and ConicGrad's on the cone's surface."""

    def __init__(self, rows: np.ndarray, linear: np.ndarray, root: float = 0.0, square: float = 0.0) -> None:
        self.rows, self.linear, self.root, self.square = rows, linear, root, square
        self.gram = rows @ rows.T

    def gradient(self, w: np.ndarray) -> np.ndarray:
        pulled = self.gram @ w
        result = self.linear + 2 * self.square * pulled
        if self.root:
            result = result + self.root * pulled / math.sqrt(w @ pulled)
        return result

    def hessian(self, w: np.ndarray) -> np.ndarray:
        result = 2 * self.square * self.gram
        if self.root:
            pulled = self.gram @ w
            norm = math.sqrt(w @ pulled)
            result = result + self.root * (self.gram / norm - np.outer(pulled, pulled) / norm**3)
        return result

    def cvxpy(self, w: cp.Variable) -> cp.Expression:
        combined = self.rows.T @ w
        return self.linear @ w + self.root * cp.norm(combined) + self.square * cp.sum_squares(combined)

    def scale(self) -> float:
        """The size of ∂f/∂w_i for w ∈ Δ: each term's largest, as for a vertex (nonzero unless f = 0)."""
        largest = self.gram.diagonal().max()
        return float(np.abs(self.linear).max() + self.root * math.sqrt(largest) + 2 * self.square * largest) or 1.0

    def assert_minimised_at(self, w: np.ndarray, tolerance: float = KKT_TOLERANCE) -> None:
        """w minimises f over Δ: w ∈ Δ, and the Frank–Wolfe gap ∇f(w)ᵀw − min_i ∂f/∂w_i (which bounds
        f(w) − min f and is 0 exactly at the minimiser: the KKT conditions) is at most `tolerance`·scale."""
        assert w.min() >= -1e-15 and abs(w.sum() - 1) <= 1e-13, w
        gradient = self.gradient(w)
        gap = (gradient @ w - gradient.min()) / self.scale()
        assert gap <= tolerance, f"Frank-Wolfe gap {gap:.3g} > {tolerance:g}: not the minimiser"


def simplex_minimiser(objective: SimplexObjective, start: np.ndarray | None = None) -> np.ndarray:
    """argmin_{w∈Δ} f(w) in float64, to float64 precision (KKT-checked).

    cvxpy's solution (~1e-7 accurate) gives a first guess of the face {w_i > 0}; on a face F the
    minimiser solves ∇f(w)_F = ν1, Σw_F = 1, which Newton's method solves to rounding. Weights a
    little above 0 can hide in cvxpy's error, so the face is corrected as in an active-set method:
    a task whose ∂f/∂w_i is below ν joins it, one whose weight turns negative leaves it. `start`: cvxpy's
    solution when the caller already has it."""
    k = objective.linear.shape[0]
    if start is None:
        w = cp.Variable(k)
        solve(cp.Problem(cp.Minimize(objective.cvxpy(w)), [w >= 0, cp.sum(w) == 1]))
        start = w.value
    start = np.clip(start, 0, None)
    face = start > 1e-6 * start.max()
    for _ in range(k):
        point = np.where(face, start, 0.0)
        point /= point.sum()
        size = int(face.sum())
        border = np.ones((size, 1))
        for _ in range(6):
            matrix = np.block([[objective.hessian(point)[np.ix_(face, face)], border], [border.T, np.zeros((1, 1))]])
            right = np.concatenate([-objective.gradient(point)[face], [1 - point.sum()]])
            point[face] += np.linalg.solve(matrix, right)[:size]
        gradient = objective.gradient(point)
        reduced = (gradient - gradient[face].mean()) / objective.scale()
        if point.min() < 0:
            face[np.argmin(point)] = False
        elif reduced.min() < -KKT_TOLERANCE:
            face[np.argmin(reduced)] = True
        else:
            break
    objective.assert_minimised_at(point)
    return point


def mgda_reference(g: np.ndarray) -> np.ndarray:
    """MGDA's w* = argmin_{w∈Δ} ‖g_w‖² (min-norm point of the hull of the rows), to float64 precision."""
    return simplex_minimiser(SimplexObjective(g, np.zeros(g.shape[0]), square=0.5))


def conflict_averse_dual(g: np.ndarray, weights: np.ndarray, divisor: float) -> tuple[np.ndarray, float]:
    """(w*, λ) from CAGrad-style effective weights (1/K + λw*)/r, using Σw* = 1."""
    scaled = divisor * weights - 1 / g.shape[0]
    return scaled / scaled.sum(), float(scaled.sum())


def exact_gram(matrix: torch.Tensor) -> list[list[Fraction]]:
    """A = G Gᵀ in rational arithmetic (every float is a fraction): KKT conditions checked with no rounding."""
    rows = [[Fraction(entry) for entry in row] for row in matrix.tolist()]
    return [[sum((p * q for p, q in zip(row, other, strict=True)), Fraction(0)) for other in rows] for row in rows]


def states_equal(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CombinerProperties:
    """The shared property checks; a subclass sets `name` (and what differs from the defaults)."""

    name: ClassVar[str]
    hyper_parameters: ClassVar[dict[str, Any]] = {}
    invalid_hyper_parameters: ClassVar[list[tuple[dict[str, Any], str]]] = []
    """(hyper-parameters, the exact error message) for values out of range or of the wrong type;
    every hyper-parameter of the method must appear in at least one."""
    identical_rows_factor: ClassVar[float] = 1.0
    """d = factor·g when every row is g (the scale convention in the combiner docstrings)."""
    scale_power: ClassVar[int] = 1
    """d(sG) = s^power·d(G): 1 for every method but Nash-MTL, whose ‖d‖ = √K at any scale."""
    draws_from_generator: ClassVar[bool] = False
    """True for PCGrad, whose projection order comes from the generator; the others must not touch it."""
    stateful: ClassVar[bool] = False
    """True when the update depends on earlier calls (Nash-MTL's warm start), carried by `state_dict`."""
    accuracy: ClassVar[float] = SOLVER_ACCURACY
    """Relative accuracy of the method's solver (for comparisons between equal problems)."""

    def make(self, **overrides: Any) -> Combiner:
        return make_combiner(self.name, **{**self.hyper_parameters, **overrides})

    def combine(self, matrix: torch.Tensor, seed: int = 0, **overrides: Any) -> torch.Tensor:
        return self.make(**overrides)(matrix, generator=seeded(seed))

    def expected_for_identical_rows(self, row: torch.Tensor, k: int) -> torch.Tensor:
        return self.identical_rows_factor * row

    def check_weights(self, g: np.ndarray, weights: np.ndarray, seed: int) -> None:
        """Assert that `weights` (last_weights after a call on G = g with generator seed `seed`) are the
        method's: its optimality or defining conditions, checked in numpy from g alone."""
        raise NotImplementedError(f"{type(self).__name__} must say how its weights are certified")

    def test_registered(self):
        assert isinstance(self.make(), COMBINERS[self.name])

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_output_shape_dtype_device_and_finite(self, dtype):
        matrix = conflicting(5, 30, 0, dtype)
        d = self.combine(matrix)
        assert d.shape == (30,) and d.dtype == dtype and d.device == matrix.device
        assert torch.isfinite(d).all()

    def test_float32_matches_float64(self):
        matrix = conflicting(6, 40, 1)
        assert_close(self.combine(matrix.float()).double(), self.combine(matrix), rtol=1e-4)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_zero_matrix_gives_zero(self, dtype):
        d = self.combine(torch.zeros(4, 12, dtype=dtype))
        assert torch.equal(d, torch.zeros(12, dtype=dtype))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("scale", [1e-20, 1e20])
    def test_tiny_and_huge_inputs(self, dtype, scale):
        # float32 cannot even hold the Gramian of these; the combiner must rescale, not overflow.
        matrix = conflicting(4, 12, 2, dtype)
        d = self.combine(matrix * scale)
        assert torch.isfinite(d).all()
        assert_close(d, self.combine(matrix) * scale**self.scale_power, rtol=1e-4)

    def test_scaling(self):
        matrix = conflicting(5, 20, 3)
        assert_close(self.combine(7.5 * matrix), self.combine(matrix) * 7.5**self.scale_power, rtol=self.accuracy)

    def test_permutation_equivariance(self):
        # Permuting the tasks permutes the weights and leaves d unchanged. PCGrad's orders come from the
        # generator, so here it is checked at K = 2 (one order); tests/test_combiner_pcgrad.py does K > 2.
        k = 2 if self.draws_from_generator else 6
        matrix = conflicting(k, 20, 4)
        permutation = torch.tensor([1, 0] if k == 2 else [3, 0, 5, 1, 4, 2])
        combiner, permuted = self.make(), self.make()
        d = combiner(matrix, generator=seeded(0))
        assert_close(permuted(matrix[permutation], generator=seeded(0)), d, rtol=self.accuracy)
        assert_close(permuted.last_weights, combiner.last_weights[permutation], rtol=self.accuracy)

    @pytest.mark.parametrize("k", [1, 4])
    def test_identical_rows(self, k):
        row = conflicting(1, 15, 5)[0]
        d = self.combine(row.expand(k, 15).clone())
        assert_close(d, self.expected_for_identical_rows(row, k), rtol=1e-9)

    def test_two_opposing_rows_cancel(self):
        row = conflicting(1, 15, 6)[0]
        d = self.combine(torch.stack([row, -row]))
        assert d.abs().max() <= 1e-9 * row.abs().max()

    @pytest.mark.parametrize("k", [2, 9])
    def test_weights_meet_the_methods_conditions(self, k):
        matrix = conflicting(k, 3 * k + 5, 8 + k)
        combiner = self.make()
        combiner(matrix, generator=seeded(k))
        assert combiner.last_weights.shape == (k,) and combiner.last_weights.dtype == matrix.dtype
        self.check_weights(as_numpy(matrix), as_numpy(combiner.last_weights), seed=k)

    def test_generator_use(self):
        # PCGrad's update depends on the seed: the same seed gives the same update, and each call draws
        # afresh. Every other method ignores the generator and leaves it untouched. No method touches
        # torch's global generator when it is given one.
        matrix = conflicting(7, 25, 7)
        global_state = torch.random.get_rng_state()
        update = self.combine(matrix, seed=3)
        generator = seeded(0)
        generator_state = generator.get_state()
        combiner = self.make()
        first = combiner(matrix, generator=generator)
        if self.draws_from_generator:
            assert torch.equal(self.combine(matrix, seed=3), update)
            assert not torch.equal(generator.get_state(), generator_state)
            second = combiner(matrix, generator=generator)
            assert not torch.equal(first, second) and not torch.equal(first, update)
        else:
            assert torch.equal(generator.get_state(), generator_state)
            assert torch.equal(first, update) and torch.equal(self.make()(matrix), update)
        assert torch.equal(torch.random.get_rng_state(), global_state)

    def test_hyper_parameters_rebuild_the_same_combiner(self):
        combiner = self.make()
        again = make_combiner(self.name, **combiner.hyper_parameters)
        assert again.hyper_parameters == combiner.hyper_parameters
        matrix = conflicting(4, 10, 9)
        assert torch.equal(self.combine(matrix), again(matrix, generator=seeded(0)))

    def test_invalid_hyper_parameters_name_themselves_and_the_value(self):
        named = set()
        for hyper_parameters, message in self.invalid_hyper_parameters:
            with pytest.raises(ValueError) as info:
                self.make(**hyper_parameters)
            assert str(info.value) == message
            named.update(hyper_parameters)
        assert named == set(self.make().hyper_parameters)

    def test_unknown_hyper_parameter_is_refused(self):
        with pytest.raises(ValueError, match="'bogus'") as info:
            make_combiner(self.name, bogus=1)
        for accepted in self.make().hyper_parameters:
            assert accepted in str(info.value)

    @pytest.mark.parametrize(
        ("matrix", "message"),
        [
            (torch.zeros(5), "2-D"),
            (torch.zeros(0, 5), "at least one task"),
            (torch.zeros(3, 5, dtype=torch.int64), "floating point"),
        ],
    )
    def test_bad_matrix_is_refused(self, matrix, message):
        with pytest.raises(ValueError, match=message):
            self.make()(matrix)

    def test_state_round_trip_through_a_weights_only_checkpoint(self, tmp_path):
        # A combiner restored from a checkpoint continues bit for bit like the one that never stopped.
        # Stateful methods hold what the next update needs, and one that starts afresh differs;
        # stateless ones hold nothing and their update does not depend on earlier calls.
        earlier, later = conflicting(6, 20, 40), conflicting(6, 20, 41)
        uninterrupted = self.make()
        uninterrupted(earlier, generator=seeded(0))
        torch.save(uninterrupted.state_dict(), tmp_path / "combiner.pt")
        state = torch.load(tmp_path / "combiner.pt", weights_only=True)
        assert bool(state) == self.stateful
        restored, fresh = self.make(), self.make()
        restored.load_state_dict(state)
        assert states_equal(restored.state_dict(), uninterrupted.state_dict())
        expected = uninterrupted(later, generator=seeded(1))
        assert torch.equal(restored(later, generator=seeded(1)), expected)
        assert states_equal(restored.state_dict(), uninterrupted.state_dict())
        assert torch.equal(fresh(later, generator=seeded(1)), expected) != self.stateful
        if not self.stateful:
            with pytest.raises(ValueError, match="stateless"):
                restored.load_state_dict({"warm_start": torch.ones(6)})

    @pytest.mark.gpu
    def test_cuda_matches_cpu(self):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        matrix = conflicting(10, 64, 11)
        assert_close(self.combine(matrix.cuda()).cpu(), self.combine(matrix), rtol=1e-6)
