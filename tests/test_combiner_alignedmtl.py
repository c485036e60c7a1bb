"""Aligned-MTL (Senushkin et al., CVPR 2023) against TorchJD's `AlignedMTL` as the independent reference,
for each scale and K, rank-deficient matrices included; its closed form on orthogonal rows."""

import pytest
import torch
from torchjd.aggregation import AlignedMTL

from mtrl.combiners import make_combiner
from tests.combiner_properties import GOLDEN_MATRIX, SIZES, CombinerProperties, assert_close, conflicting, seeded

ACCURACY = 1e-12
"""Both eigen-decompose the float64 Gramian; the differences are rounding, amplified by 1/sqrt(λ_min)."""

SCALES = ["min", "median", "rmse"]


def reference(matrix: torch.Tensor, scale: str = "min") -> torch.Tensor:
    return AlignedMTL(scale_mode=scale)(matrix)


class TestAlignedMTL(CombinerProperties):
    name = "alignedmtl"
    invalid_hyper_parameters = [
        ({"scale": "max"}, "`scale` must be one of 'min', 'median', 'rmse', found 'max'"),
        ({"scale": 1}, "`scale` must be one of 'min', 'median', 'rmse', found 1"),
    ]

    def check_weights(self, g, weights, seed):
        matrix = torch.from_numpy(g)
        expected = AlignedMTL().gramian_weighting(matrix @ matrix.T)
        assert_close(torch.from_numpy(weights), expected, rtol=1e-10)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("k", SIZES)
def test_matches_torchjd(k, scale):
    matrix = conflicting(k, 3 * k + 5, 50 + k)
    assert_close(make_combiner("alignedmtl", scale=scale)(matrix), reference(matrix, scale), rtol=ACCURACY)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("k", "n"), [(6, 3), (10, 4)])
def test_rank_deficient_matrices_match_torchjd(k, n, scale):
    # More tasks than parameters: K − n eigenvalues are zero (up to rounding) and are dropped by both,
    # and "median" and "rmse" are taken over the kept ones.
    matrix = conflicting(k, n, 60 + k)
    assert_close(make_combiner("alignedmtl", scale=scale)(matrix), reference(matrix, scale), rtol=1e-9)


def test_float32_gradients_match_torchjd_in_float32():
    # TorchJD decomposes in float32 there; this combiner in float64.
    matrix = conflicting(10, 40, 61, torch.float32)
    assert_close(make_combiner("alignedmtl")(matrix), reference(matrix), rtol=1e-4)


@pytest.mark.parametrize("scale", SCALES)
def test_orthogonal_rows_in_closed_form(scale):
    # A = diag(n_i²): B = √λ_s·diag(1/n_i), so each task contributes √λ_s/(K n_i)·g_i, of length √λ_s/K:
    # the aligned principal directions are equally long.
    norms = torch.tensor([0.1, 0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(20, 5, generator=seeded(3), dtype=torch.float64))
    matrix = norms[:, None] * q.T
    level = {"min": 0.1**2, "median": 1.0, "rmse": (norms**2).mean()}[scale]
    combiner = make_combiner("alignedmtl", scale=scale)
    combiner(matrix)
    assert_close(combiner.last_weights, level**0.5 / (5 * norms), rtol=ACCURACY)


def test_the_smallest_direction_sets_the_length():
    # Two nearly parallel tasks: the small singular value, not the gradients' size, sets ‖d‖ with scale "min".
    row, other = conflicting(1, 10, 62)[0], conflicting(1, 10, 63)[0]
    matrix = torch.stack([row, row + 1e-2 * other])
    d_min, d_rmse = make_combiner("alignedmtl")(matrix), make_combiner("alignedmtl", scale="rmse")(matrix)
    assert d_min.norm() < 0.05 * d_rmse.norm()
    assert_close(d_min, reference(matrix), rtol=1e-9)


def test_eigenvalues_below_float32_rounding_are_dropped():
    # λ_min/λ_max ~ 1e-11: above float64's rank tolerance (TorchJD keeps it on float64 input and returns a
    # tiny update), below K·eps_float32 (this combiner drops it, as TorchJD does on float32 input): the
    # update is then that of the rank-one matrix, ≈ the mean of the two rows.
    row, other = conflicting(1, 10, 62)[0], conflicting(1, 10, 63)[0]
    matrix = torch.stack([row, row + 1e-5 * other])
    d = make_combiner("alignedmtl")(matrix)
    assert_close(d, matrix.mean(0), rtol=1e-5)
    assert reference(matrix).norm() < 1e-4 * d.norm()


def test_non_finite_gradients_give_a_non_finite_update_without_raising():
    matrix = conflicting(4, 10, 64)
    matrix[1, 2] = float("nan")
    assert not torch.isfinite(make_combiner("alignedmtl")(matrix)).any()


GOLDEN = [-0.21100572415627433, 0.17577024990795342, 0.4652327200094063, 0.7533751060136236]
"""d for GOLDEN_MATRIX (scale "min"), from TorchJD."""


def test_golden_values():
    golden = torch.tensor(GOLDEN, dtype=torch.float64)
    assert_close(reference(GOLDEN_MATRIX), golden, rtol=1e-14)
    assert_close(make_combiner("alignedmtl")(GOLDEN_MATRIX), golden, rtol=ACCURACY)
