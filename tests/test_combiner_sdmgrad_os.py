"""SDMGrad-OS: the task draw (`select_tasks`) and SDMGrad on the drawn rows, with the authors' recipe at
learning rate 50 for every K, against an independent float64 transcription of the whole update."""

import numpy as np
import pytest
import torch

from mtrl.combiners import make_combiner
from tests.combiner_properties import (
    SOLVER_ACCURACY,
    CombinerProperties,
    as_numpy,
    assert_close,
    conflicting,
    seeded,
)
from tests.test_combiner_sdmgrad import assert_solves_the_dual, recipe_reference, reference


class TestSDMGradOS(CombinerProperties):
    name = "sdmgrad_os"
    invalid_hyper_parameters = [
        ({"n": 0}, "`n` must be >= 1, found 0"),
        ({"n": 2.5}, "`n` must be an integer, found 2.5"),
        ({"n": True}, "`n` must be an integer, found True"),
        ({"lam": -0.5}, "`lam` must be >= 0, found -0.5"),
        ({"solver": "cvxpy"}, "`solver` must be one of 'exact', 'mtrl', found 'cvxpy'"),
    ]

    def check_weights(self, g, weights, seed):
        # Given its rows, the update is SDMGrad's on them.
        assert_solves_the_dual(g, weights, self.make().parameters.lam)


def sampled_reference(
    matrices: list[np.ndarray], lam: float, n: int, solver: str, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(drawn tasks, d) for a run of updates, one matrix each, transcribed from the method's definition.

    Each update draws every task independently with probability min(1, n/K), from one uniform number
    per task taken from the run's generator, and draws again while no task is drawn. SDMGrad then runs
    on the drawn rows as they are (g0 is their mean; nothing is rescaled), the recipe at lr 50."""
    generator = seeded(seed)
    updates = []
    for g in matrices:
        k = g.shape[0]
        drawn = np.zeros(k, dtype=bool)
        while not drawn.any():
            drawn = (torch.rand(k, generator=generator) < min(1.0, n / k)).numpy()
        rows = g[drawn]
        d = reference(rows, lam) if solver == "exact" else recipe_reference(rows, lam, lr=50.0)
        updates.append((np.flatnonzero(drawn), d))
    return updates


@pytest.mark.parametrize("solver", ["exact", "mtrl"])
@pytest.mark.parametrize(("k", "n"), [(10, 4), (50, 8)])
def test_a_run_of_updates_matches_the_reference(solver, k, n):
    # The trainer's order: draw the tasks, compute only their gradients, combine them.
    matrices = [conflicting(k, 2 * k + 5, 60 + update) for update in range(5)]
    expected = sampled_reference([as_numpy(matrix) for matrix in matrices], 0.6, n, solver, seed=7)
    combiner, generator = make_combiner("sdmgrad_os", n=n, solver=solver), seeded(7)
    for matrix, (tasks, d) in zip(matrices, expected, strict=True):
        drawn = combiner.select_tasks(k, generator)
        assert torch.equal(drawn, torch.from_numpy(tasks))
        # Exact: the combiner's solver accuracy. Recipe: the same arithmetic, equal to rounding.
        accuracy = SOLVER_ACCURACY if solver == "exact" else 1e-12
        assert_close(combiner(matrix[drawn], generator=generator), torch.from_numpy(d), rtol=accuracy)
    sizes = {len(tasks) for tasks, _ in expected}
    assert len(sizes) > 1 and max(sizes) < k and len({tuple(tasks) for tasks, _ in expected}) == 5


def draws(k: int, n: int, seed: int, count: int) -> list[torch.Tensor]:
    combiner, generator = make_combiner("sdmgrad_os", n=n), seeded(seed)
    return [combiner.select_tasks(k, generator) for _ in range(count)]


def test_draws_are_sorted_unique_nonempty_task_indices():
    for tasks in draws(10, 4, 0, 200):
        assert tasks.dtype == torch.int64 and tasks.ndim == 1 and len(tasks) >= 1
        assert torch.equal(tasks, tasks.unique(sorted=True)) and tasks.min() >= 0 and tasks.max() < 10


def test_draws_are_deterministic_per_seed_and_differ_across_seeds_and_draws():
    first, again, other = draws(10, 4, 1, 50), draws(10, 4, 1, 50), draws(10, 4, 2, 50)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert len({tuple(tasks.tolist()) for tasks in first}) > 25


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


@pytest.mark.parametrize("k", [3, 10, 50])
def test_mtrl_recipe_uses_learning_rate_50_for_every_k(k):
    matrix = conflicting(k, 3 * k + 5, 30 + k)
    d = make_combiner("sdmgrad_os", solver="mtrl")(matrix)
    assert_close(d, torch.from_numpy(recipe_reference(as_numpy(matrix), 0.6, lr=50.0)), rtol=1e-12)


def test_mtrl_recipe_differs_from_sdmgrad_below_50_tasks():
    matrix = conflicting(10, 35, 1)
    os_update = make_combiner("sdmgrad_os", solver="mtrl")(matrix)
    assert (os_update - make_combiner("sdmgrad", solver="mtrl")(matrix)).norm() > 1e-3 * os_update.norm()


@pytest.mark.parametrize("num_tasks", [0, 2.5, True])
def test_drawing_from_an_impossible_number_of_tasks_is_refused(num_tasks):
    with pytest.raises(ValueError, match="`num_tasks` must be"):
        make_combiner("sdmgrad_os").select_tasks(num_tasks, torch.Generator().manual_seed(0))
