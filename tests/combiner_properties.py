"""Checks every combiner must pass, shared by the per-method test files (tests/test_combiner_*.py).

A test file subclasses `CombinerProperties`, names the combiner and states what its maths promises
(the scale convention of docs/combiners.md#notation, how d scales with G); pytest then runs every
check below on it. Helpers for the method-specific tests (random conflicting matrices, a cvxpy
wrapper) live here too.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import cvxpy as cp
import numpy as np
import pytest
import torch

from mtrl.combiners import COMBINERS, Combiner, make_combiner

DTYPES = [torch.float64, torch.float32]
SIZES = [2, 3, 10, 50]
"""The K the exact solvers are checked at against cvxpy."""


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


def simplex_weights(k: int) -> tuple[cp.Variable, list]:
    weights = cp.Variable(k)
    return weights, [weights >= 0, cp.sum(weights) == 1]


class CombinerProperties:
    """The shared property checks; a subclass sets `name` (and what differs from the defaults)."""

    name: ClassVar[str]
    hyper_parameters: ClassVar[dict[str, Any]] = {}
    identical_rows_factor: ClassVar[float] = 1.0
    """d = factor·g when every row is g (docs/combiners.md#notation, "Scale convention")."""
    scale_power: ClassVar[int] = 1
    """d(sG) = s^power·d(G): 1 for every method but Nash-MTL, whose ‖d‖ = √K at any scale."""
    order_dependent: ClassVar[bool] = False
    """True for PCGrad, whose projection order is random: permutations are checked at K = 2."""
    accuracy: ClassVar[float] = 1e-6
    """Relative accuracy of the method's solver (for comparisons between equal problems)."""

    def make(self, **overrides: Any) -> Combiner:
        return make_combiner(self.name, **{**self.hyper_parameters, **overrides})

    def combine(self, matrix: torch.Tensor, seed: int = 0, **overrides: Any) -> torch.Tensor:
        return self.make(**overrides)(matrix, generator=torch.Generator().manual_seed(seed))

    def expected_for_identical_rows(self, row: torch.Tensor, k: int) -> torch.Tensor:
        return self.identical_rows_factor * row

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

    def test_permutation_invariance(self):
        k = 2 if self.order_dependent else 6
        matrix = conflicting(k, 20, 4)
        permutation = torch.tensor([1, 0] if k == 2 else [3, 0, 5, 1, 4, 2])
        assert_close(self.combine(matrix[permutation]), self.combine(matrix), rtol=self.accuracy)

    @pytest.mark.parametrize("k", [1, 4])
    def test_identical_rows(self, k):
        row = conflicting(1, 15, 5)[0]
        d = self.combine(row.expand(k, 15).clone())
        assert_close(d, self.expected_for_identical_rows(row, k), rtol=1e-9)

    def test_two_opposing_rows_cancel(self):
        row = conflicting(1, 15, 6)[0]
        d = self.combine(torch.stack([row, -row]))
        assert d.abs().max() <= 1e-9 * row.abs().max()

    def test_deterministic(self):
        matrix = conflicting(7, 25, 7)
        assert torch.equal(self.combine(matrix, seed=3), self.combine(matrix, seed=3))

    def test_last_weights_give_the_update(self):
        combiner, matrix = self.make(), conflicting(5, 30, 8)
        d = combiner(matrix, generator=torch.Generator().manual_seed(0))
        assert combiner.last_weights.shape == (5,) and combiner.last_weights.dtype == matrix.dtype
        assert_close(combiner.last_weights @ matrix, d, rtol=1e-12)

    def test_hyper_parameters_rebuild_the_same_combiner(self):
        combiner = self.make()
        again = make_combiner(self.name, **combiner.hyper_parameters)
        assert again.hyper_parameters == combiner.hyper_parameters
        matrix = conflicting(4, 10, 9)
        assert torch.equal(self.combine(matrix), again(matrix, generator=torch.Generator().manual_seed(0)))

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

    def test_state_dict_survives_a_weights_only_checkpoint(self, tmp_path):
        combiner, matrix = self.make(), conflicting(4, 10, 10)
        combiner(matrix, generator=torch.Generator().manual_seed(0))
        torch.save(combiner.state_dict(), tmp_path / "combiner.pt")
        restored = self.make()
        restored.load_state_dict(torch.load(tmp_path / "combiner.pt", weights_only=True))
        assert torch.equal(
            restored(matrix, generator=torch.Generator().manual_seed(1)),
            combiner(matrix, generator=torch.Generator().manual_seed(1)),
        )

    @pytest.mark.gpu
    def test_cuda_matches_cpu(self):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        matrix = conflicting(10, 64, 11)
        assert_close(self.combine(matrix.cuda()).cpu(), self.combine(matrix), rtol=1e-6)


def sqrt_k_direction(row: torch.Tensor, k: int) -> torch.Tensor:
    """√K·g/‖g‖: Nash-MTL's update when every row is g."""
    return math.sqrt(k) * row / row.norm()


def as_numpy(matrix: torch.Tensor) -> np.ndarray:
    return matrix.detach().cpu().double().numpy()
