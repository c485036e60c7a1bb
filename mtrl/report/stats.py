"""The statistics of `mtrl report`, after Agarwal et al., "Deep Reinforcement Learning at the Edge of the
Statistical Precipice" (NeurIPS 2021), written with numpy alone.

Scores are arrays [runs, tasks, ...]: the success of each seed on each task (and, for curves, at each
evaluation step). The aggregates (`interquartile_mean`, `overall_mean`, `median_of_task_means`,
`optimality_gap`) reduce the first two axes. Confidence intervals come from a stratified bootstrap that
resamples runs with replacement within each task (`stratified_bootstrap`), or each method's runs
independently for statistics of two methods (`independent_bootstrap`); the interval is the percentile one.

The draws are those of the authors' `rliable` library (`rly.get_interval_estimates`,
`rly.create_performance_profile`) after `np.random.seed(seed)`, so the numbers equal rliable's. They are
written out here because `rliable` 1.2 needs `arch` < 8 and pandas < 3 (the optional extra
`mtrl[rliable]` pins a set that runs), and so that the draws come from a generator local to each call
rather than from NumPy's global one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
# Thresholds of the performance profiles: success rates are in [0, 1].
PROFILE_THRESHOLDS = np.linspace(0.0, 1.0, 101)
# The panel of aggregates, in the order of `aggregate_panel`'s output (Agarwal et al., Fig. 1 and 6).
AGGREGATES = ("median", "IQM", "mean", "optimality gap")


@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of its confidence interval (arrays of one shape)."""

    point: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def _runs_by_tasks(scores: np.ndarray) -> np.ndarray:
    return scores.reshape(scores.shape[0] * scores.shape[1], -1)


def interquartile_mean(scores: np.ndarray) -> np.ndarray:
    """IQM over the first two axes (runs, tasks): one value per index of the remaining axes.

    The mean of the middle half of the runs x tasks scores, after dropping floor(n/4) scores at each end,
    as `rliable.metrics.aggregate_iqm` (scipy's 25% `trim_mean`).
    """
    flat = np.sort(_runs_by_tasks(scores), axis=0)
    cut = int(0.25 * flat.shape[0])
    return flat[cut : flat.shape[0] - cut].mean(axis=0)


def overall_mean(scores: np.ndarray) -> np.ndarray:
    """Mean over the first two axes (runs, tasks); equals the mean over tasks of the per-task means."""
    return _runs_by_tasks(scores).mean(axis=0)


def median_of_task_means(scores: np.ndarray) -> np.ndarray:
    """Median over tasks of each task's mean over runs (`rliable.metrics.aggregate_median`)."""
    return np.median(scores.mean(axis=0).reshape(scores.shape[1], -1), axis=0)


def optimality_gap(scores: np.ndarray, target: float = 1.0) -> np.ndarray:
    """How far the scores fall short of `target` on average, scores above it counting as `target`.

    `target - mean(min(score, target))` (Agarwal et al., Sec. 4.3; `rliable.metrics.aggregate_optimality_gap`):
    lower is better, and for success rates with target 1 it is 1 minus the mean success.
    """
    return target - _runs_by_tasks(np.minimum(scores, target)).mean(axis=0)


def aggregate_panel(scores: np.ndarray) -> np.ndarray:
    """[median, IQM, mean, optimality gap] of scores [runs, tasks] (the order of `AGGREGATES`)."""
    return np.array(
        [
            median_of_task_means(scores)[0],
            interquartile_mean(scores)[0],
            overall_mean(scores)[0],
            optimality_gap(scores)[0],
        ]
    )


def score_distribution(scores: np.ndarray, thresholds: np.ndarray = PROFILE_THRESHOLDS) -> np.ndarray:
    """Performance profile: for each threshold, the fraction of runs x tasks scores strictly above it.

    Agarwal et al., Sec. 4.2, Eq. 2 (`rly.create_performance_profile` with its default score distributions).
    """
    flat = scores.reshape(-1)
    return (flat[:, None] > np.asarray(thresholds)[None, :]).mean(axis=0)


def probability_of_improvement(scores_x: np.ndarray, scores_y: np.ndarray) -> float:
    """P(X > Y): the probability that a run of X beats a run of Y on a task, averaged over tasks.

    Agarwal et al., Sec. 4.3: per task the Mann-Whitney U statistic over all pairs of runs, ties counting
    one half, divided by the number of pairs (`rliable.metrics.probability_of_improvement`). Both are
    [runs, tasks] with the same tasks in the same order; the numbers of runs may differ.
    """
    x, y = scores_x[:, None, :], scores_y[None, :, :]
    return float(((x > y).mean(axis=(0, 1)) + 0.5 * (x == y).mean(axis=(0, 1))).mean())


def _percentile_interval(point: np.ndarray, samples: np.ndarray, confidence: float) -> Interval:
    alpha = (1.0 - confidence) / 2
    lower, upper = np.percentile(samples, [100 * alpha, 100 * (1.0 - alpha)], axis=0)
    return Interval(np.asarray(point), lower, upper)


def _strata(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Index arrays that keep every axis after the first in place (each task is its own stratum)."""
    rest = shape[1:]
    return tuple(np.arange(d).reshape([1] * (1 + k) + [d] + [1] * (len(rest) - k - 1)) for k, d in enumerate(rest))


def stratified_bootstrap(
    scores: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    reps: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> Interval:
    """`statistic(scores)` with a percentile confidence interval from a stratified bootstrap.

    `scores` is [runs, tasks, ...]. Each resample keeps every task (and every further index, e.g. the
    evaluation step) and draws that many runs with replacement for each of them independently, as rliable's
    `StratifiedBootstrap`. The draws are the ones rliable makes after `np.random.seed(seed)`, so the result
    equals `rly.get_interval_estimates({m: scores}, statistic, reps=reps)` run right after that call.
    """
    # A legacy RandomState on purpose: the same stream as rliable's draws, yet local to this call.
    rng = np.random.RandomState(seed)
    strata = _strata(scores.shape)
    samples = np.stack([statistic(scores[(rng.choice(scores.shape[0], scores.shape), *strata)]) for _ in range(reps)])
    return _percentile_interval(statistic(scores), samples, confidence)


def independent_bootstrap(
    scores_x: np.ndarray,
    scores_y: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    reps: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> Interval:
    """`statistic(scores_x, scores_y)` with a percentile interval from resampling each input's runs
    within each task, independently of the other (rliable's `StratifiedIndependentBootstrap`, which
    `rly.get_interval_estimates({name: [x, y]}, statistic)` uses; same draws after `np.random.seed(seed)`)."""
    rng = np.random.RandomState(seed)
    strata_x, strata_y = _strata(scores_x.shape), _strata(scores_y.shape)
    samples = np.empty(reps)
    for r in range(reps):
        # x's indices first, then y's: the order of rliable's draws.
        resampled_x = scores_x[(rng.choice(scores_x.shape[0], scores_x.shape), *strata_x)]
        resampled_y = scores_y[(rng.choice(scores_y.shape[0], scores_y.shape), *strata_y)]
        samples[r] = statistic(resampled_x, resampled_y)
    return _percentile_interval(np.array([statistic(scores_x, scores_y)]), samples[:, None], confidence)


def mean_and_standard_error(values: np.ndarray) -> tuple[float, float]:
    """Mean over seeds and its standard error (sample standard deviation / sqrt(n)); nan for one seed."""
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan
    return mean, float(values.std(ddof=1) / math.sqrt(len(values)))
