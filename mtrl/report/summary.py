"""What `mtrl report` shows of each experiment and of each pair of experiments on a benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtrl.report.runs import Experiment
from mtrl.report.stats import (
    Interval,
    aggregate_panel,
    independent_bootstrap,
    interquartile_mean,
    overall_mean,
    probability_of_improvement,
    score_distribution,
    stratified_bootstrap,
)

# Below this many seeds a bootstrap interval says little (with 1 seed it is a point, with 2 it is the
# range of two values): such experiments are marked in every table and figure.
MIN_SEEDS = 3
FEW_SEEDS_MARK = "†"


@dataclass(frozen=True)
class ExperimentSummary:
    """The curves with their bands and the final-step statistics of one experiment."""

    experiment: Experiment
    iqm_curve: Interval  # [S]
    mean_curve: Interval  # [S]
    aggregates: Interval  # [4] median, IQM, mean, optimality gap of the final per-task success (AGGREGATES)
    profile: Interval  # [len(PROFILE_THRESHOLDS)] fraction of seeds x tasks above each threshold, final step
    final_success: np.ndarray  # [seeds] mean over tasks at the last common step
    best_success: np.ndarray  # [seeds] best mean over tasks over the common steps

    @property
    def few_seeds(self) -> bool:
        return len(self.experiment.seeds) < MIN_SEEDS

    @property
    def name(self) -> str:
        """The experiment's label, marked when it has too few seeds for its intervals to mean much."""
        return f"{self.experiment.label}{FEW_SEEDS_MARK if self.few_seeds else ''}"

    @property
    def final_scores(self) -> np.ndarray:
        return self.experiment.success[:, :, -1]


@dataclass(frozen=True)
class Improvement:
    """P(better > worse) at the final step, oriented so that the point estimate is at least 1/2."""

    better: ExperimentSummary
    worse: ExperimentSummary
    interval: Interval  # [1]


@dataclass(frozen=True)
class BenchmarkSummary:
    benchmark: str
    experiments: list[ExperimentSummary]
    improvements: list[Improvement]  # every pair of experiments evaluated on the same tasks
    incomparable: list[tuple[str, str]]  # pairs (labels) evaluated on different tasks: no P(X > Y)

    @property
    def same_tasks(self) -> bool:
        return len({tuple(sorted(s.experiment.tasks)) for s in self.experiments}) == 1


def summarize(experiment: Experiment, reps: int, seed: int) -> ExperimentSummary:
    """The curves with their bands and the final-step statistics of one experiment."""
    # Both curves from one bootstrap: two calls under the same seed would draw the same resamples anyway,
    # and drawing them is most of the cost.
    n_steps = len(experiment.steps)
    curves = stratified_bootstrap(
        experiment.success, lambda x: np.concatenate([interquartile_mean(x), overall_mean(x)]), reps, seed
    )
    final = experiment.success[:, :, -1]
    per_seed_mean = experiment.success.mean(axis=1)  # [seeds, S]
    return ExperimentSummary(
        experiment=experiment,
        iqm_curve=Interval(curves.point[:n_steps], curves.lower[:n_steps], curves.upper[:n_steps]),
        mean_curve=Interval(curves.point[n_steps:], curves.lower[n_steps:], curves.upper[n_steps:]),
        aggregates=stratified_bootstrap(final, aggregate_panel, reps, seed),
        profile=stratified_bootstrap(final, score_distribution, reps, seed),
        final_success=per_seed_mean[:, -1],
        best_success=per_seed_mean.max(axis=1),
    )


def _aligned_final(summary: ExperimentSummary, tasks: list[str]) -> np.ndarray:
    experiment = summary.experiment
    return summary.final_scores[:, [experiment.tasks.index(t) for t in tasks]]


def improvement(a: ExperimentSummary, b: ExperimentSummary, reps: int, seed: int) -> Improvement:
    """P(X > Y) with its stratified-bootstrap interval, X the experiment with the higher point estimate."""
    tasks = a.experiment.tasks
    scores_a, scores_b = _aligned_final(a, tasks), _aligned_final(b, tasks)
    if probability_of_improvement(scores_a, scores_b) >= 0.5:
        better, worse, x, y = a, b, scores_a, scores_b
    else:
        better, worse, x, y = b, a, scores_b, scores_a
    return Improvement(better, worse, independent_bootstrap(x, y, probability_of_improvement, reps, seed))


def summarize_benchmark(benchmark: str, experiments: list[Experiment], reps: int, seed: int) -> BenchmarkSummary:
    summaries = [summarize(e, reps, seed) for e in experiments]
    improvements, incomparable = [], []
    for i, a in enumerate(summaries):
        for b in summaries[i + 1 :]:
            if set(a.experiment.tasks) == set(b.experiment.tasks):
                improvements.append(improvement(a, b, reps, seed))
            else:
                incomparable.append((a.name, b.name))
    return BenchmarkSummary(benchmark, summaries, improvements, incomparable)
