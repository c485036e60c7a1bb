"""PCGrad (Yu et al., NeurIPS 2020): projections against the original gradients in a random order
drawn from the caller's generator, against the projections run on the n-vectors themselves."""

import itertools

import numpy as np
import pytest
import torch

from mtrl.combiners import make_combiner
from tests.combiner_properties import CombinerProperties, as_numpy, assert_close, conflicting, seeded


class TestPCGrad(CombinerProperties):
    name = "pcgrad"
    draws_from_generator = True

    def check_weights(self, g, weights, seed):
        # d = Gᵀw is the projections run on the n-vectors in the orders drawn from the seed; G has full
        # row rank, so w is the one set of coefficients giving that d.
        coefficients = np.linalg.lstsq(g.T, reference(g, drawn_orders(g.shape[0], seed)))[0]
        assert_close(torch.from_numpy(weights), torch.from_numpy(coefficients), rtol=1e-12)


def reference(g: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """PCGrad on the n-vectors: g_i ← g_i − (g_iᵀg_j/‖g_j‖²)g_j if g_iᵀg_j < 0, j over orders[i]."""
    projected = []
    for i, order in enumerate(orders):
        current = g[i].copy()
        for j in order:
            product = current @ g[j]
            if product < 0:
                current = current - product / (g[j] @ g[j]) * g[j]
        projected.append(current)
    return np.mean(projected, axis=0)


def drawn_orders(k: int, seed: int) -> list[list[int]]:
    """The orders PCGrad draws: K×K uniform keys from the generator, task i visiting the others by
    increasing key (its own key is ignored)."""
    keys = torch.rand(k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [[j for j in keys[i].argsort().tolist() if j != i] for i in range(k)]


def test_matches_the_reference_with_the_drawn_orders():
    matrix = conflicting(10, 40, 0)
    for seed in range(3):
        expected = reference(as_numpy(matrix), drawn_orders(10, seed))
        assert_close(make_combiner("pcgrad")(matrix, seeded(seed)), torch.from_numpy(expected), rtol=1e-12)


def test_permuting_the_tasks_permutes_their_orders():
    # Row p of the permuted matrix is task permutation[p]; it visits the others in the order drawn for row
    # p, mapped back. With the generator accounted for so, the update is the same.
    matrix, permutation, seed = conflicting(6, 20, 4), [3, 0, 5, 1, 4, 2], 5
    orders: list[list[int]] = [[] for _ in permutation]
    for row, order in enumerate(drawn_orders(6, seed)):
        orders[permutation[row]] = [permutation[other] for other in order]
    expected = torch.from_numpy(reference(as_numpy(matrix), orders))
    assert_close(make_combiner("pcgrad")(matrix[permutation], seeded(seed)), expected, rtol=1e-12)
    assert not torch.allclose(make_combiner("pcgrad")(matrix, seeded(seed)), expected)


def test_result_is_one_of_the_orders_and_the_order_is_random():
    matrix = conflicting(3, 12, 1)
    outcomes = [
        reference(as_numpy(matrix), [list(a), list(b), list(c)])
        for a, b, c in itertools.product(
            itertools.permutations([1, 2]), itertools.permutations([0, 2]), itertools.permutations([0, 1])
        )
    ]
    seen = set()
    for seed in range(40):
        d = as_numpy(make_combiner("pcgrad")(matrix, seeded(seed)))
        matches = [index for index, outcome in enumerate(outcomes) if np.allclose(d, outcome, rtol=1e-12, atol=1e-12)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 1


def test_without_a_generator_uses_torch_default_generator():
    matrix = conflicting(6, 20, 2)
    torch.manual_seed(5)
    first = make_combiner("pcgrad")(matrix)
    torch.manual_seed(5)
    assert torch.equal(make_combiner("pcgrad")(matrix), first)


def test_without_conflicts_is_the_mean():
    matrix = conflicting(5, 20, 3).abs()
    assert_close(make_combiner("pcgrad")(matrix), matrix.mean(0), rtol=1e-14)


def test_golden_values():
    # g1 = (1, 0), g2 = (−1, 1): g1' = g1 + ½g2 = (½, ½), g2' = g2 + g1 = (0, 1), d = (¼, ¾).
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    assert_close(make_combiner("pcgrad")(matrix), torch.tensor([0.25, 0.75], dtype=torch.float64), rtol=1e-15)


def test_weights_without_keys_are_refused():
    gramian = torch.eye(3, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"^PCGrad needs its random keys: call it with a generator, or with `draws` from `draw`$"
    ):
        make_combiner("pcgrad").weights(gramian)
