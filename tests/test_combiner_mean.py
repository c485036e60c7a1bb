"""`mean`: plain averaging, the MT-SAC baseline."""

import numpy as np
import torch

from mtrl.combiners import make_combiner
from tests.combiner_properties import CombinerProperties, conflicting


class TestMean(CombinerProperties):
    name = "mean"

    def check_weights(self, g, weights, seed):
        assert np.array_equal(weights, np.full(g.shape[0], 1 / g.shape[0]))


def test_needs_no_jacobian():
    assert make_combiner("mean").needs_jacobian is False
    assert make_combiner("cagrad").needs_jacobian is True


def test_is_the_row_mean_with_uniform_weights():
    matrix = conflicting(7, 33, 0)
    combiner = make_combiner("mean")
    assert torch.equal(combiner(matrix), matrix.mean(0))
    assert torch.equal(combiner.last_weights, torch.full((7,), 1 / 7, dtype=torch.float64))


def test_golden_values():
    matrix = torch.tensor([[1.0, -2.0, 3.0], [4.0, 0.0, -1.0]])
    assert torch.equal(make_combiner("mean")(matrix), torch.tensor([2.5, -1.0, 1.0]))
