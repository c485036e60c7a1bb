"""`mtrl report`: rliable's panel of figures and markdown tables from run directories.

Runs are grouped into experiments (`runs`: equal configs but for the seed, labelled by the keys in which
they differ); the runs of an experiment are its seeds. Every number comes from the per-task evaluation
success (`eval/success/per_task`) in each run's `metrics.jsonl`, at the evaluation steps common to all seeds
of an experiment, so that every statistic at a step aggregates the same seeds.

Modules: `runs` (finding, reading and grouping runs), `stats` (the estimators and bootstraps of Agarwal et
al., NeurIPS 2021), `summary` (what is shown of each experiment and pair), `figures`, `markdown`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mtrl.config import ConfigError
from mtrl.report.runs import Experiment, Run, find_run_dirs, group_runs, load_run, method_name
from mtrl.report.stats import (
    Interval,
    interquartile_mean,
    overall_mean,
    stratified_bootstrap,
)
from mtrl.report.summary import BenchmarkSummary, ExperimentSummary, summarize_benchmark

REPORT_FILE = "report.md"

__all__ = [
    "BenchmarkSummary",
    "Experiment",
    "ExperimentSummary",
    "Interval",
    "Run",
    "build_report",
    "find_run_dirs",
    "group_runs",
    "interquartile_mean",
    "load_run",
    "method_name",
    "overall_mean",
    "stratified_bootstrap",
    "write_report",
]


def build_report(paths: list[Path], reps: int, seed: int, mix_protocols: bool = False) -> list[BenchmarkSummary]:
    """Load, group and summarize every run under `paths`; raises ConfigError on bad input."""
    if reps < 1:
        raise ConfigError(f"--reps must be >= 1, found {reps}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), found {seed}")
    runs = [load_run(p) for p in find_run_dirs(paths)]
    grouped = group_runs(runs, mix_protocols=mix_protocols)
    return [summarize_benchmark(benchmark, experiments, reps, seed) for benchmark, experiments in grouped.items()]


def write_report(benchmarks: list[BenchmarkSummary], out: Path, reps: int, seed: int) -> tuple[Path, list[Path]]:
    """The figures of each benchmark, then `report.md`, into `out`; returns report.md and the figures."""
    from mtrl.report.figures import styles, write_figures
    from mtrl.report.markdown import render_markdown

    out.mkdir(parents=True, exist_ok=True)
    # One style per experiment label, the same in every benchmark's figures.
    style_of = styles(sorted({s.experiment.label for b in benchmarks for s in b.experiments}))
    figures = [path for bench in benchmarks for path in write_figures(bench, style_of, out)]
    report = out / REPORT_FILE
    report.write_text(render_markdown(benchmarks, reps, seed))
    return report, figures


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="rliable's figures and markdown tables from run directories",
        description="Summarize runs for a paper: per benchmark, learning curves (IQM and mean success with 95% "
        "stratified-bootstrap bands), the aggregates of the final success (median, IQM, mean, optimality gap "
        "with 95% CIs), performance profiles, the probability of improvement between every pair of "
        "experiments, a heatmap of final success per task, and report.md with their tables. Runs whose "
        "configs differ only in the seed are the seeds of one experiment; experiments are named by the keys "
        "in which they differ (e.g. `cagrad c=0.2`).",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories, or folders searched recursively for them (e.g. a sweep's root)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder for report.md and the PNGs")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument(
        "--mix-protocols",
        action="store_true",
        help="put experiments of different protocols (reward version, episode length, goals per task, tasks) "
        "on one benchmark's axes; refused by default, since their success rates are not comparable",
    )


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a directory")
    benchmarks = build_report(args.runs, args.reps, args.seed, args.mix_protocols)
    report, figures = write_report(benchmarks, args.out, args.reps, args.seed)
    print(f"wrote {report} and {len(figures)} figures")
    return 0
