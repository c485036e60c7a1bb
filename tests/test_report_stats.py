"""The statistics of `mtrl report` against float64 loops, scipy, and rliable where rliable runs.

rliable 1.2 runs with pandas < 3 and arch < 8 (the `rliable` extra); the comparisons with it skip elsewhere.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mtrl.report.stats import (
    AGGREGATES,
    PROFILE_THRESHOLDS,
    aggregate_panel,
    independent_bootstrap,
    interquartile_mean,
    median_of_task_means,
    optimality_gap,
    overall_mean,
    probability_of_improvement,
    score_distribution,
    stratified_bootstrap,
)

SHAPES = [(1, 1), (1, 5), (2, 3), (3, 10), (4, 4), (5, 10), (7, 3)]


def success_rates(rng: np.random.Generator, shape: tuple[int, ...], episodes: int = 10) -> np.ndarray:
    """Success rates as Meta-World gives them: multiples of 1/episodes, with many ties."""
    return rng.integers(0, episodes + 1, size=shape) / episodes


def loop_median_of_task_means(scores: np.ndarray) -> float:
    runs, tasks = scores.shape
    means = sorted(sum(float(scores[r, t]) for r in range(runs)) / runs for t in range(tasks))
    mid = len(means) // 2
    return means[mid] if len(means) % 2 else (means[mid - 1] + means[mid]) / 2


def loop_optimality_gap(scores: np.ndarray) -> float:
    values = [min(float(v), 1.0) for v in scores.ravel()]
    return 1.0 - sum(values) / len(values)


def loop_profile(scores: np.ndarray, thresholds: np.ndarray) -> list[float]:
    values = [float(v) for v in scores.ravel()]
    return [sum(v > t for v in values) / len(values) for t in thresholds]


def loop_improvement(x: np.ndarray, y: np.ndarray) -> float:
    per_task = []
    for t in range(x.shape[1]):
        wins = 0.0
        for a, b in itertools.product(x[:, t], y[:, t]):
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
        per_task.append(wins / (x.shape[0] * y.shape[0]))
    return sum(per_task) / len(per_task)


@pytest.mark.parametrize("shape", SHAPES)
def test_aggregates_equal_scipy_and_loops(shape):
    scores = success_rates(np.random.default_rng(sum(shape)), shape)
    assert interquartile_mean(scores)[0] == pytest.approx(scipy_stats.trim_mean(scores, 0.25, axis=None), abs=1e-15)
    assert overall_mean(scores)[0] == pytest.approx(float(np.mean([scores[:, t].mean() for t in range(shape[1])])))
    assert median_of_task_means(scores)[0] == pytest.approx(loop_median_of_task_means(scores), abs=1e-15)
    assert optimality_gap(scores)[0] == pytest.approx(loop_optimality_gap(scores), abs=1e-15)
    panel = aggregate_panel(scores)
    assert AGGREGATES == ("median", "IQM", "mean", "optimality gap")
    np.testing.assert_allclose(
        panel,
        [
            loop_median_of_task_means(scores),
            scipy_stats.trim_mean(scores, 0.25, axis=None),
            scores.mean(),
            loop_optimality_gap(scores),
        ],
        atol=1e-15,
    )


def test_optimality_gap_counts_scores_above_the_target_as_the_target():
    scores = np.array([[0.5, 1.0], [2.0, 0.0]])
    assert optimality_gap(scores)[0] == pytest.approx(1 - (0.5 + 1 + 1 + 0) / 4)
    assert optimality_gap(scores, target=0.5)[0] == pytest.approx(0.5 - (0.5 + 0.5 + 0.5 + 0) / 4)


def test_aggregates_per_step_are_the_aggregates_of_each_step():
    curves = success_rates(np.random.default_rng(3), (4, 5, 6))
    for statistic in (interquartile_mean, overall_mean, median_of_task_means, optimality_gap):
        np.testing.assert_allclose(statistic(curves), [statistic(curves[:, :, s])[0] for s in range(6)])


@pytest.mark.parametrize("shape", SHAPES)
def test_performance_profile_equals_a_loop(shape):
    scores = success_rates(np.random.default_rng(10 + sum(shape)), shape)
    np.testing.assert_allclose(score_distribution(scores), loop_profile(scores, PROFILE_THRESHOLDS), atol=0)
    # on the thresholds themselves: strictly above
    exact = np.array([[0.0, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(score_distribution(exact, np.array([0.0, 0.5, 1.0])), [0.75, 0.25, 0.0])
    assert PROFILE_THRESHOLDS[0] == 0.0 and PROFILE_THRESHOLDS[-1] == 1.0


@pytest.mark.parametrize("runs_x, runs_y, tasks", [(1, 1, 1), (3, 3, 10), (5, 2, 4), (2, 7, 3)])
def test_probability_of_improvement_equals_mann_whitney_and_a_loop(runs_x, runs_y, tasks):
    rng = np.random.default_rng(runs_x * 100 + runs_y * 10 + tasks)
    x, y = success_rates(rng, (runs_x, tasks), 4), success_rates(rng, (runs_y, tasks), 4)  # many ties
    expected = np.mean(
        [
            scipy_stats.mannwhitneyu(x[:, t], y[:, t], alternative="greater").statistic / (runs_x * runs_y)
            for t in range(tasks)
        ]
    )
    assert probability_of_improvement(x, y) == pytest.approx(expected, abs=1e-15)
    assert probability_of_improvement(x, y) == pytest.approx(loop_improvement(x, y), abs=1e-15)
    assert probability_of_improvement(x, y) + probability_of_improvement(y, x) == pytest.approx(1.0)
    assert probability_of_improvement(x, x) == pytest.approx(0.5)


def test_probability_of_improvement_extremes():
    low, high = np.zeros((3, 4)), np.ones((2, 4))
    assert probability_of_improvement(high, low) == 1.0 and probability_of_improvement(low, high) == 0.0
    # per task: task 0 X always wins, task 1 always ties -> (1 + 0.5) / 2
    assert probability_of_improvement(np.array([[1.0, 0.5]]), np.array([[0.0, 0.5]])) == 0.75


def test_stratified_bootstrap_of_the_panel_and_profile_equals_a_loop():
    scores = success_rates(np.random.default_rng(5), (4, 6))
    reps, seed = 300, 17
    rng = np.random.RandomState(seed)
    samples_panel = []
    for _ in range(reps):
        draw = rng.choice(4, size=(4, 6))
        resample = np.array([[scores[draw[r, t], t] for t in range(6)] for r in range(4)])
        samples_panel.append(aggregate_panel(resample))
    lower, upper = np.percentile(samples_panel, [2.5, 97.5], axis=0)
    ours = stratified_bootstrap(scores, aggregate_panel, reps, seed)
    np.testing.assert_allclose(ours.point, aggregate_panel(scores))
    np.testing.assert_allclose(ours.lower, lower)
    np.testing.assert_allclose(ours.upper, upper)
    profile = stratified_bootstrap(scores, score_distribution, reps=50, seed=2)
    assert profile.point.shape == PROFILE_THRESHOLDS.shape
    assert np.all(profile.lower <= profile.point + 1e-12) and np.all(profile.point <= profile.upper + 1e-12)
    assert np.all(np.diff(profile.point) <= 0)  # a profile never rises with the threshold


def test_independent_bootstrap_resamples_each_method_within_each_task():
    rng = np.random.default_rng(8)
    x, y = success_rates(rng, (3, 5)), success_rates(rng, (4, 5))
    reps, seed = 400, 9
    draws = np.random.RandomState(seed)
    samples = []
    for _ in range(reps):
        ix = draws.choice(3, size=(3, 5))  # x's runs first, then y's: rliable's order
        iy = draws.choice(4, size=(4, 5))
        rx = np.array([[x[ix[r, t], t] for t in range(5)] for r in range(3)])
        ry = np.array([[y[iy[r, t], t] for t in range(5)] for r in range(4)])
        samples.append(loop_improvement(rx, ry))
    ours = independent_bootstrap(x, y, probability_of_improvement, reps, seed)
    assert ours.point[0] == pytest.approx(loop_improvement(x, y))
    np.testing.assert_allclose([ours.lower[0], ours.upper[0]], np.percentile(samples, [2.5, 97.5]), atol=1e-12)
    # Seeds of one method that agree on every task, and another that always loses: nothing varies.
    flat = independent_bootstrap(np.ones((3, 2)), np.zeros((2, 2)), probability_of_improvement, 50, 0)
    assert (flat.point[0], flat.lower[0], flat.upper[0]) == (1.0, 1.0, 1.0)


def _rliable():
    try:
        from rliable import library as rly
        from rliable import metrics

        rly.get_interval_estimates({"m": np.zeros((2, 2))}, lambda x: np.array([metrics.aggregate_mean(x)]), reps=2)
    except Exception as err:  # rliable 1.2 breaks on import with pandas 3 and on use with arch 8
        pytest.skip(f"rliable does not run in this environment ({type(err).__name__}: {err})".splitlines()[0])
    return rly, metrics


@pytest.fixture
def global_numpy_seed():
    """rliable draws from NumPy's global generator: seed it per call, and leave it as it was."""
    state = np.random.get_state()
    yield np.random.seed
    np.random.set_state(state)


def test_panel_equals_rliable(global_numpy_seed):
    rly, metrics = _rliable()
    scores = success_rates(np.random.default_rng(0), (5, 10), 50)

    def panel(x: np.ndarray) -> np.ndarray:
        return np.array(
            [
                metrics.aggregate_median(x),
                metrics.aggregate_iqm(x),
                metrics.aggregate_mean(x),
                metrics.aggregate_optimality_gap(x),
            ]
        )

    global_numpy_seed(4)
    points, cis = rly.get_interval_estimates({"m": scores}, panel, reps=500)
    ours = stratified_bootstrap(scores, aggregate_panel, reps=500, seed=4)
    np.testing.assert_allclose(ours.point, points["m"], atol=1e-14)
    np.testing.assert_allclose(np.stack([ours.lower, ours.upper]), cis["m"], atol=1e-14)


def test_performance_profile_equals_rliable(global_numpy_seed):
    rly, _ = _rliable()
    scores = success_rates(np.random.default_rng(1), (3, 10), 50)
    global_numpy_seed(6)
    profiles, cis = rly.create_performance_profile({"m": scores}, PROFILE_THRESHOLDS, reps=300)
    ours = stratified_bootstrap(scores, score_distribution, reps=300, seed=6)
    np.testing.assert_allclose(ours.point, profiles["m"], atol=1e-14)
    np.testing.assert_allclose(np.stack([ours.lower, ours.upper]), cis["m"], atol=1e-14)


def test_probability_of_improvement_equals_rliable(global_numpy_seed):
    rly, metrics = _rliable()
    rng = np.random.default_rng(2)
    x, y = success_rates(rng, (4, 10), 5), success_rates(rng, (3, 10), 5)
    global_numpy_seed(8)
    points, cis = rly.get_interval_estimates({"x,y": [x, y]}, metrics.probability_of_improvement, reps=300)
    ours = independent_bootstrap(x, y, probability_of_improvement, reps=300, seed=8)
    assert ours.point[0] == pytest.approx(float(points["x,y"]), abs=1e-14)
    np.testing.assert_allclose([ours.lower[0], ours.upper[0]], np.ravel(cis["x,y"]), atol=1e-14)
