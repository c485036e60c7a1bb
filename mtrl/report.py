"""`mtrl report`: learning curves, a per-task heatmap and markdown tables from run directories.

Runs are grouped by (benchmark, method); the runs of a group are its seeds. Every number comes from the
per-task evaluation success (`eval/success/per_task`) in each run's `metrics.jsonl`, at the evaluation steps
common to all runs of a method, so that every statistic at a step aggregates the same seeds.

The aggregate statistics follow Agarwal et al., "Deep Reinforcement Learning at the Edge of the Statistical
Precipice" (NeurIPS 2021): the interquartile mean (IQM) of the seeds x tasks score matrix, and percentile
confidence intervals from a stratified bootstrap that resamples seeds with replacement within each task.
The bootstrap reproduces the authors' `rliable` library (`rly.get_interval_estimates`, percentile method)
draw for draw. It is written out here for two reasons: `rliable` 1.2 runs only with `arch` < 8, which does
not import under pandas 3, and here the draws come from a generator local to each call rather than from
NumPy's global one.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtrl.config import ConfigError

if TYPE_CHECKING:
    import numpy as np

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUCCESS_KEY = "eval/success/per_task"
REPORT_FILE = "report.md"
CONFIDENCE = 0.95
HEATMAP_TASKS_PER_ROW = 25


@dataclass(frozen=True)
class Run:
    """One run directory: its identity and its per-task evaluation success."""

    path: Path
    benchmark: str
    method: str
    seed: int
    steps: list[int]  # ascending evaluation steps
    success: dict[str, list[float]]  # task -> success at each of `steps`


@dataclass(frozen=True)
class MethodRuns:
    """All runs of one method on one benchmark, aligned on the evaluation steps they share."""

    benchmark: str
    method: str
    seeds: list[int]
    paths: list[list[Path]]  # per seed, its run directories (several when one run covers only some tasks)
    tasks: list[str]
    steps: np.ndarray  # [S] evaluation steps common to all runs
    success: np.ndarray  # [seeds, tasks, S]
    last_steps: list[int]  # per seed, its last evaluation step (to flag seeds that ran longer than others)


@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of its confidence interval (arrays of one shape)."""

    point: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


@dataclass(frozen=True)
class MethodSummary:
    """What the report shows of one method: curves with their bands, and the table's numbers."""

    runs: MethodRuns
    iqm_curve: Interval  # [S]
    mean_curve: Interval  # [S]
    final_iqm: Interval  # [1]
    final_success: np.ndarray  # [seeds] mean over tasks at the last common step
    best_success: np.ndarray  # [seeds] best mean over tasks over the common steps


def interquartile_mean(scores: np.ndarray) -> np.ndarray:
    """IQM over the first two axes (seeds, tasks): one value per index of the remaining axes.

    The mean of the middle half of the seeds x tasks scores, after dropping floor(n/4) scores at each end,
    as `rliable.metrics.aggregate_iqm` (a 25% trimmed mean).
    """
    import numpy as np

    flat = np.sort(scores.reshape(scores.shape[0] * scores.shape[1], -1), axis=0)
    cut = int(0.25 * flat.shape[0])
    return flat[cut : flat.shape[0] - cut].mean(axis=0)


def overall_mean(scores: np.ndarray) -> np.ndarray:
    """Mean over the first two axes (seeds, tasks): one value per index of the remaining axes."""
    return scores.reshape(scores.shape[0] * scores.shape[1], -1).mean(axis=0)


def stratified_bootstrap(
    scores: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    reps: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> Interval:
    """`statistic(scores)` with a percentile confidence interval from a stratified bootstrap.

    `scores` is [seeds, tasks, ...]. Each resample keeps every task (and every further index, e.g. the
    evaluation step) and draws that many seeds with replacement for each of them independently, as rliable's
    `StratifiedBootstrap`. The draws are the ones rliable makes after `np.random.seed(seed)`, so the result
    equals `rly.get_interval_estimates({m: scores}, statistic, reps=reps)` run right after that call.
    """
    import numpy as np

    # A legacy RandomState on purpose: the same stream as rliable's draws, yet local to this call.
    rng = np.random.RandomState(seed)
    n, rest = scores.shape[0], scores.shape[1:]
    strata = tuple(np.arange(d).reshape([1] * (1 + k) + [d] + [1] * (len(rest) - k - 1)) for k, d in enumerate(rest))
    samples = np.stack([statistic(scores[(rng.choice(n, scores.shape), *strata)]) for _ in range(reps)])
    alpha = (1.0 - confidence) / 2
    lower, upper = np.percentile(samples, [100 * alpha, 100 * (1.0 - alpha)], axis=0)
    return Interval(statistic(scores), lower, upper)


def mean_and_standard_error(values: np.ndarray) -> tuple[float, float]:
    """Mean over seeds and its standard error (sample standard deviation / sqrt(n)); nan for one seed."""
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan
    return mean, float(values.std(ddof=1) / math.sqrt(len(values)))


def summarize(runs: MethodRuns, reps: int, seed: int) -> MethodSummary:
    """The curves with their bands and the table's numbers of one method."""
    import numpy as np

    # Both curves from one bootstrap: two calls under the same seed would draw the same resamples anyway,
    # and drawing them is most of the cost.
    n_steps = len(runs.steps)
    curves = stratified_bootstrap(
        runs.success, lambda x: np.concatenate([interquartile_mean(x), overall_mean(x)]), reps, seed
    )
    per_seed_mean = runs.success.mean(axis=1)  # [seeds, S]
    return MethodSummary(
        runs=runs,
        iqm_curve=Interval(curves.point[:n_steps], curves.lower[:n_steps], curves.upper[:n_steps]),
        mean_curve=Interval(curves.point[n_steps:], curves.lower[n_steps:], curves.upper[n_steps:]),
        final_iqm=stratified_bootstrap(runs.success[:, :, -1], interquartile_mean, reps, seed),
        final_success=per_seed_mean[:, -1],
        best_success=per_seed_mean.max(axis=1),
    )


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories among `paths`: each path is a run directory or a folder searched recursively.

    A run directory holds `config.yaml` or `metrics.jsonl` (it must hold both); the search does not
    descend into one.
    """
    found: list[Path] = []
    for root in paths:
        if not root.is_dir():
            raise ConfigError(f"{root}: no such directory")
        found.extend(_walk(root))
    unique = list(dict.fromkeys(found))
    if not unique:
        names = ", ".join(str(p) for p in paths)
        raise ConfigError(f"no run directories (holding {CONFIG_FILE} and {METRICS_FILE}) found in {names}")
    return unique


def _walk(directory: Path) -> list[Path]:
    has_config, has_metrics = (directory / CONFIG_FILE).is_file(), (directory / METRICS_FILE).is_file()
    if has_config or has_metrics:
        if not (has_config and has_metrics):
            missing = METRICS_FILE if has_config else CONFIG_FILE
            raise ConfigError(f"{directory}: no {missing} (a run directory holds {CONFIG_FILE} and {METRICS_FILE})")
        return [directory]
    return [run for child in sorted(directory.iterdir()) if child.is_dir() for run in _walk(child)]


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def method_name(config: dict) -> str | None:
    """A top-level `method` if the config names one, else `adatask` or the combiner; `-<architecture>`
    appended unless the architecture is `conditioned` (so runs group by method and architecture)."""
    name = config.get("method")
    if name is None:
        name = "adatask" if _get(config, "optimizer.name") == "adatask" else _get(config, "combiner.name")
    if name is None:
        return None
    # agent.variant: runs saved before agent.architecture replaced it
    architecture = _get(config, "agent.architecture") or _get(config, "agent.variant")
    return str(name) if architecture in (None, "conditioned") else f"{name}-{architecture}"


def benchmark_name(config: dict) -> str | None:
    """`env.benchmark`; for MT1, with its task (different MT1 tasks are different benchmarks)."""
    benchmark = _get(config, "env.benchmark")
    tasks = _get(config, "env.tasks")
    if benchmark == "MT1" and isinstance(tasks, list) and len(tasks) == 1:
        return f"MT1 {tasks[0]}"
    return None if benchmark is None else str(benchmark)


def load_run(path: Path) -> Run:
    import yaml

    config_path, metrics_path = path / CONFIG_FILE, path / METRICS_FILE
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: not a mapping of config keys")
    benchmark, method, seed = benchmark_name(config), method_name(config), config.get("seed")
    if benchmark is None:
        raise ConfigError(f"{config_path}: no env.benchmark")
    if method is None:
        raise ConfigError(f"{config_path}: no method, optimizer.name or combiner.name to name the method by")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{config_path}: seed must be an integer, found {seed!r}")

    by_step: dict[int, dict[str, float]] = {}
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short when the run was killed
            continue
        if not isinstance(record, dict) or record.get("kind") != "eval":
            continue
        per_task, step = record.get(SUCCESS_KEY), record.get("step")
        if not isinstance(per_task, dict) or not per_task or not isinstance(step, int):
            raise ConfigError(f"{metrics_path}: an eval record without a step or {SUCCESS_KEY}: {line[:80]}")
        for task, value in per_task.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{metrics_path}: step {step}: success of {task} is {value!r}, not a number")
        by_step[step] = per_task
    if not by_step:
        raise ConfigError(f"{metrics_path}: no evaluation records (kind 'eval' with {SUCCESS_KEY})")
    steps = sorted(by_step)
    tasks = list(by_step[steps[0]])
    for step in steps:
        if set(by_step[step]) != set(tasks):
            raise ConfigError(f"{metrics_path}: step {step} reports other tasks than step {steps[0]}")
    success = {task: [float(by_step[step][task]) for step in steps] for task in tasks}
    return Run(path, benchmark, method, seed, steps, success)


def group_runs(runs: list[Run]) -> dict[str, list[MethodRuns]]:
    """Runs by benchmark, then by method (sorted names); runs of one method with one seed are merged.

    Merging lets a baseline trained as one run per task count as one seed; the runs must then report
    disjoint tasks. Each method keeps the evaluation steps common to all its runs.
    """
    import numpy as np

    by_key: dict[tuple[str, str], dict[int, list[Run]]] = {}
    for run in runs:
        by_key.setdefault((run.benchmark, run.method), {}).setdefault(run.seed, []).append(run)

    grouped: dict[str, list[MethodRuns]] = {}
    for (benchmark, method), by_seed in sorted(by_key.items()):
        label = f"method {method} on {benchmark}"
        seeds = sorted(by_seed)
        merged = [_merge_seed(by_seed[s], label) for s in seeds]
        tasks = list(merged[0][0])
        for s, (series, _) in zip(seeds, merged, strict=True):
            if set(series) != set(tasks):
                differ = sorted(set(series) ^ set(tasks))
                raise ConfigError(f"{label}: seed {s} and seed {seeds[0]} report different tasks ({', '.join(differ)})")
        common = sorted(set.intersection(*(set(steps) for _, steps in merged)))
        if not common:
            raise ConfigError(f"{label}: no evaluation step is common to all its runs (seeds {seeds})")
        success = np.array([[[series[t][step] for step in common] for t in tasks] for series, _ in merged])
        grouped.setdefault(benchmark, []).append(
            MethodRuns(
                benchmark=benchmark,
                method=method,
                seeds=seeds,
                paths=[[r.path for r in by_seed[s]] for s in seeds],
                tasks=tasks,
                steps=np.array(common),
                success=success,
                last_steps=[max(steps) for _, steps in merged],
            )
        )
    return grouped


def _merge_seed(runs: list[Run], label: str) -> tuple[dict[str, dict[int, float]], list[int]]:
    """Per-task success by step of one seed's runs, and the steps all those runs evaluated."""
    series: dict[str, dict[int, float]] = {}
    owner: dict[str, Path] = {}
    for run in runs:
        for task, values in run.success.items():
            if task in series:
                raise ConfigError(
                    f"{owner[task]} and {run.path} are both seed {run.seed} of {label} and both report {task}; "
                    "pass only one of them"
                )
            series[task] = dict(zip(run.steps, values, strict=True))
            owner[task] = run.path
    common = sorted(set.intersection(*(set(run.steps) for run in runs)))
    return series, common


def _fmt_mean_se(values: np.ndarray) -> str:
    mean, se = mean_and_standard_error(values)
    return f"{mean:.3f} ± {'n/a' if math.isnan(se) else f'{se:.3f}'}"


def _seeds_text(summaries: list[MethodSummary]) -> str:
    counts = sorted({len(s.runs.seeds) for s in summaries})
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''} per method"
    return f"{counts[0]}–{counts[-1]} seeds per method"


def _slug(benchmark: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", benchmark)


def _figure_names(benchmark: str) -> dict[str, str]:
    slug = _slug(benchmark)
    return {
        "iqm": f"{slug}_curve_iqm.png",
        "mean": f"{slug}_curve_mean.png",
        "heatmap": f"{slug}_per_task_final.png",
    }


def _task_order(summaries: list[MethodSummary]) -> list[str]:
    return list(dict.fromkeys(t for s in summaries for t in s.runs.tasks))


def render_markdown(by_benchmark: dict[str, list[MethodSummary]], reps: int, seed: int) -> str:
    n_runs = sum(len(p) for ss in by_benchmark.values() for s in ss for p in s.runs.paths)
    lines = [
        "# Results",
        "",
        f"Generated by `mtrl report` from {n_runs} run{'s' if n_runs != 1 else ''}. Success is the evaluation "
        "success rate per task (the share of evaluation episodes that succeeded). For each method, every statistic "
        "uses the evaluation steps common to all its seeds; *final* is the last of them.",
        "",
        "- **final / best success**: per seed, the success averaged over tasks at the final step / at its best "
        "common step; shown as mean ± standard error over seeds.",
        "- **IQM**: interquartile mean of the seeds × tasks final success values (the mean of their middle 50%). "
        f"The 95% CI is a percentile interval from {reps} stratified bootstrap resamples (seeds drawn with "
        f"replacement within each task; bootstrap seed {seed}), as in rliable (Agarwal et al., 2021).",
        "",
    ]
    for benchmark, summaries in by_benchmark.items():
        names = _figure_names(benchmark)
        task_sets = {tuple(sorted(s.runs.tasks)) for s in summaries}
        caveat = " The methods cover different tasks here, so their aggregates are not comparable." * (
            len(task_sets) > 1
        )
        lines += [
            f"## {benchmark}",
            "",
            f"{_seeds_text(summaries)}.{caveat}",
            "",
            "| method | seeds | final step | final success | best success | IQM final success [95% CI] |",
            "|---|---:|---:|---|---|---|",
        ]
        for s in summaries:
            iqm = s.final_iqm
            lines.append(
                f"| {s.runs.method} | {len(s.runs.seeds)} | {int(s.runs.steps[-1]):,} | "
                f"{_fmt_mean_se(s.final_success)} | {_fmt_mean_se(s.best_success)} | "
                f"{iqm.point[0]:.3f} [{iqm.lower[0]:.3f}, {iqm.upper[0]:.3f}] |"
            )
        lines += [
            "",
            f"![{benchmark}: IQM success over training]({names['iqm']})",
            "",
            f"![{benchmark}: mean success over training]({names['mean']})",
            "",
            f"![{benchmark}: final success per task]({names['heatmap']})",
            "",
            "### Final success per task (mean ± standard error over seeds)",
            "",
            "| task | " + " | ".join(s.runs.method for s in summaries) + " |",
            "|---|" + "---|" * len(summaries),
        ]
        for task in _task_order(summaries):
            cells = []
            for s in summaries:
                if task in s.runs.tasks:
                    cells.append(_fmt_mean_se(s.runs.success[:, s.runs.tasks.index(task), -1]))
                else:
                    cells.append("–")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines += ["", "### Runs", ""]
        for s in summaries:
            r = s.runs
            n_steps = len(r.steps)
            lines.append(f"- {r.method} ({n_steps} evaluation step{'s' if n_steps != 1 else ''} common to its seeds):")
            for seed_, paths in zip(r.seeds, r.paths, strict=True):
                lines.append(f"  - seed {seed_}: " + ", ".join(f"`{p}`" for p in paths))
            if len(set(r.last_steps)) > 1:
                lines.append(
                    f"  - its seeds stop at different steps ({', '.join(f'{x:,}' for x in r.last_steps)}); "
                    f"the statistics stop at step {int(r.steps[-1]):,}"
                )
        lines.append("")
    return "\n".join(lines)


def _method_colors(by_benchmark: dict[str, list[MethodSummary]]) -> dict[str, Any]:
    """One colour per method, the same in every figure."""
    from matplotlib import colormaps

    methods = sorted({s.runs.method for ss in by_benchmark.values() for s in ss})
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def plot_curves(summaries: list[MethodSummary], which: str, colors: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    for s in summaries:
        curve = s.iqm_curve if which == "iqm" else s.mean_curve
        color = colors[s.runs.method]
        n = len(s.runs.seeds)
        ax.plot(
            s.runs.steps,
            curve.point,
            color=color,
            marker="o" if len(s.runs.steps) <= 30 else None,
            markersize=3,
            label=f"{s.runs.method} ({n} seed{'s' if n != 1 else ''})",
        )
        ax.fill_between(s.runs.steps, curve.lower, curve.upper, color=color, alpha=0.2, linewidth=0)
    statistic = "IQM" if which == "iqm" else "mean"
    ax.set_xlabel("environment steps per task")
    ax.set_ylabel(f"success rate ({statistic} over tasks and seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{summaries[0].runs.benchmark}: {statistic} success, 95% bootstrap CI ({_seeds_text(summaries)})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.savefig(path, dpi=150, bbox_inches="tight")


def plot_heatmap(summaries: list[MethodSummary], path: Path) -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    tasks = _task_order(summaries)
    values = np.full((len(summaries), len(tasks)), np.nan)
    for i, s in enumerate(summaries):
        for j, task in enumerate(tasks):
            if task in s.runs.tasks:
                values[i, j] = s.runs.success[:, s.runs.tasks.index(task), -1].mean()
    # Long task lists wrap onto stacked panels, so that MT50's cells stay legible.
    rows = [
        list(range(start, min(start + HEATMAP_TASKS_PER_ROW, len(tasks))))
        for start in range(0, len(tasks), HEATMAP_TASKS_PER_ROW)
    ]
    width = len(rows[0])
    fig = Figure(
        figsize=(max(6.0, 0.6 * width + 3.0), len(rows) * max(2.8, 0.45 * len(summaries) + 2.2)), layout="constrained"
    )
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    for ax, columns in zip(axes, rows, strict=True):
        panel = values[:, columns]
        image = ax.imshow(np.ma.masked_invalid(panel), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), v in np.ndenumerate(panel):
            text, color = ("–", "black") if np.isnan(v) else (f"{v:.2f}", "black" if v > 0.6 else "white")
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
        ax.set_xlim(-0.5, width - 0.5)  # equal cell widths in a shorter last panel
        ax.set_xticks(range(len(columns)), [tasks[c] for c in columns], rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(summaries)), [s.runs.method for s in summaries])
        ax.set_ylabel("method")
    axes[-1].set_xlabel("task")
    fig.colorbar(image, ax=list(axes), label="final success rate (mean over seeds)", fraction=0.03, pad=0.01)
    fig.suptitle(f"{summaries[0].runs.benchmark}: final success per task ({_seeds_text(summaries)})")
    fig.savefig(path, dpi=150, bbox_inches="tight")


def build_report(paths: list[Path], reps: int, seed: int) -> dict[str, list[MethodSummary]]:
    """Load, group and summarize every run under `paths`; raises ConfigError on bad input."""
    if reps < 1:
        raise ConfigError(f"--reps must be >= 1, found {reps}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), found {seed}")
    runs = [load_run(p) for p in find_run_dirs(paths)]
    return {b: [summarize(m, reps, seed) for m in ms] for b, ms in group_runs(runs).items()}


def write_report(by_benchmark: dict[str, list[MethodSummary]], out: Path, reps: int, seed: int) -> Path:
    """The figures of each benchmark, then `report.md`, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    colors = _method_colors(by_benchmark)
    for benchmark, summaries in by_benchmark.items():
        names = _figure_names(benchmark)
        plot_curves(summaries, "iqm", colors, out / names["iqm"])
        plot_curves(summaries, "mean", colors, out / names["mean"])
        plot_heatmap(summaries, out / names["heatmap"])
    report = out / REPORT_FILE
    report.write_text(render_markdown(by_benchmark, reps, seed))
    return report


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="learning curves, per-task heatmap and markdown tables from run directories",
        description="Summarize runs for a paper: per benchmark, learning curves (IQM and mean success with 95% "
        "stratified-bootstrap bands), a heatmap of final success per task, and report.md with a table per "
        "method (seeds, final and best success as mean ± s.e., IQM with 95% CI) and a per-task table. Runs "
        "are grouped by benchmark and method; the runs of a group are its seeds.",
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


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a directory")
    by_benchmark = build_report(args.runs, args.reps, args.seed)
    report = write_report(by_benchmark, args.out, args.reps, args.seed)
    print(f"wrote {report} and {3 * len(by_benchmark)} figures")
    return 0
