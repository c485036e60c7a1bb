"""SDMGrad-OS: the task draw (`select_tasks`) and SDMGrad on the drawn rows, with the authors'
recipe at learning rate 50 for every K (docs/combiners.md#sdmgrad-os)."""

import pytest
import torch

from mtrl.combiners import make_combiner
from tests.combiner_properties import CombinerProperties, as_numpy, assert_close, conflicting
from tests.test_combiner_sdmgrad import recipe_reference


class TestSDMGradOS(CombinerProperties):
    name = "sdmgrad_os"


def draws(k: int, n: int, seed: int, count: int) -> list[torch.Tensor]:
    combiner, generator = make_combiner("sdmgrad_os", n=n), torch.Generator().manual_seed(seed)
    return [combiner.select_tasks(k, generator) for _ in range(count)]


def test_draws_are_sorted_unique_nonempty_task_indices():
    for tasks in draws(10, 4, 0, 200):
        assert tasks.dtype == torch.int64 and tasks.ndim == 1 and len(tasks) >= 1
        assert torch.equal(tasks, tasks.unique(sorted=True)) and tasks.min() >= 0 and tasks.max() < 10


def test_draws_are_deterministic_per_seed_and_differ_across_seeds():
    first, again, other = draws(10, 4, 1, 50), draws(10, 4, 1, 50), draws(10, 4, 2, 50)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(("k", "n"), [(10, 4), (50, 8)])
def test_each_task_is_drawn_with_probability_n_over_k(k, n):
    counts = torch.zeros(k)
    for tasks in draws(k, n, 3, 4000):
        counts[tasks] += 1
    # Redrawing empty draws raises the rate by a factor 1/(1 − (1 − n/K)^K): at most 0.6% here.
    assert (counts / 4000 - n / k).abs().max() < 0.035


def test_rare_draws_are_redrawn_never_empty():
    sizes = torch.tensor([len(tasks) for tasks in draws(50, 1, 4, 2000)], dtype=torch.float64)
    assert sizes.min() >= 1
    # E[size | size ≥ 1] = 1/(1 − 0.98^50) for Binomial(50, 1/50)
    assert sizes.mean().item() == pytest.approx(1 / (1 - 0.98**50), rel=0.05)


def test_n_at_least_k_draws_every_task():
    for tasks in draws(4, 8, 5, 10):
        assert torch.equal(tasks, torch.arange(4))


def test_combines_the_given_rows_like_sdmgrad():
    matrix = conflicting(7, 30, 6)
    assert torch.equal(make_combiner("sdmgrad_os")(matrix), make_combiner("sdmgrad")(matrix))


@pytest.mark.parametrize("k", [3, 10, 50])
def test_mtrl_recipe_uses_learning_rate_50_for_every_k(k):
    matrix = conflicting(k, 3 * k + 5, 30 + k)
    d = make_combiner("sdmgrad_os", solver="mtrl")(matrix)
    assert_close(d, torch.from_numpy(recipe_reference(as_numpy(matrix), 0.6, lr=50.0)), rtol=1e-10)


def test_mtrl_recipe_differs_from_sdmgrad_below_50_tasks():
    matrix = conflicting(10, 35, 1)
    os_update = make_combiner("sdmgrad_os", solver="mtrl")(matrix)
    assert (os_update - make_combiner("sdmgrad", solver="mtrl")(matrix)).norm() > 1e-3 * os_update.norm()
