"""`report.md`: the tables of `mtrl report`, with its figures and the runs behind every seed."""

from __future__ import annotations

import math

import numpy as np

from mtrl.report.figures import FEW_SEEDS_NOTE, figure_names, task_order
from mtrl.report.runs import NOT_THE_EXPERIMENT, PROTOCOL_KEYS, format_value, label_keys, protocol
from mtrl.report.stats import AGGREGATES, PROFILE_THRESHOLDS, Interval, mean_and_standard_error
from mtrl.report.summary import MIN_SEEDS, BenchmarkSummary, ExperimentSummary

# The thresholds of the performance profile's table (the figure draws all of PROFILE_THRESHOLDS).
PROFILE_TABLE_THRESHOLDS = (0.0, 0.25, 0.5, 0.75, 0.9)


def _mean_se(values: np.ndarray) -> str:
    mean, se = mean_and_standard_error(values)
    return f"{mean:.3f} ± {'n/a' if math.isnan(se) else f'{se:.3f}'}"


def _ci(interval: Interval, k: int = 0) -> str:
    return f"{interval.point[k]:.3f} [{interval.lower[k]:.3f}, {interval.upper[k]:.3f}]"


def _seeds_text(summaries: list[ExperimentSummary]) -> str:
    counts = sorted({len(s.experiment.seeds) for s in summaries})
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''} per method"
    return f"{counts[0]}–{counts[-1]} seeds per method"


def _protocol_text(summary: ExperimentSummary) -> str:
    values = dict(protocol(summary.experiment))
    text = (
        f"reward {values['env.reward_version']}, {values['env.max_episode_steps']} steps per episode, "
        f"{values['env.num_goals']} goals per task, {len(values['tasks'])} tasks"
    )
    return text + (
        f" ({values['env.toy_tasks']} toy tasks)" if summary.experiment.config.get("env.benchmark") == "toy" else ""
    )


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def _benchmark_section(bench: BenchmarkSummary) -> list[str]:
    summaries = bench.experiments
    names = figure_names(bench)
    protocols = {_protocol_text(s) for s in summaries}
    lines = [f"## {bench.benchmark}", ""]
    if len(protocols) == 1:
        lines += [
            f"{len(summaries)} experiment{'s' if len(summaries) != 1 else ''}, {_seeds_text(summaries)}. "
            f"Protocol: {protocols.pop()}.",
            "",
        ]
    else:
        lines += [
            f"{len(summaries)} experiments, {_seeds_text(summaries)}. **Mixed protocols** (`--mix-protocols`): "
            "their success rates measure different things, so their aggregates are not comparable.",
            "",
            *(f"- {s.name}: {_protocol_text(s)}" for s in summaries),
            "",
        ]
    if any(s.few_seeds for s in summaries):
        lines += [FEW_SEEDS_NOTE + ".", ""]

    lines += _table(
        ["method", "seeds", "final step", "final success", "best success", "IQM final success [95% CI]"],
        ["---", "---:", "---:", "---", "---", "---"],
        [
            [
                s.name,
                str(len(s.experiment.seeds)),
                f"{int(s.experiment.steps[-1]):,}",
                _mean_se(s.final_success),
                _mean_se(s.best_success),
                _ci(s.aggregates, AGGREGATES.index("IQM")),
            ]
            for s in summaries
        ],
    )
    lines += ["", f"![{bench.benchmark}: IQM success over training]({names['iqm']})", ""]
    lines += [f"![{bench.benchmark}: mean success over training]({names['mean']})", ""]

    lines += [
        "### Aggregates of the final success [95% CI]",
        "",
        "Over the seeds × tasks final success values: the median of the per-task means, the IQM, the mean, and "
        "the optimality gap (1 − mean success; lower is better).",
        "",
    ]
    lines += _table(
        ["method", *AGGREGATES],
        ["---"] * (1 + len(AGGREGATES)),
        [[s.name, *(_ci(s.aggregates, k) for k in range(len(AGGREGATES)))] for s in summaries],
    )
    lines += ["", f"![{bench.benchmark}: aggregates of the final success]({names['aggregates']})", ""]

    columns = [int(np.argmin(np.abs(PROFILE_THRESHOLDS - t))) for t in PROFILE_TABLE_THRESHOLDS]
    lines += [
        "### Performance profile of the final success [95% CI]",
        "",
        "The fraction of seeds × tasks whose final success is above each threshold τ (τ = 0: the task was "
        "solved at least once).",
        "",
    ]
    lines += _table(
        ["method", *(f"> {t:g}" for t in PROFILE_TABLE_THRESHOLDS)],
        ["---"] * (1 + len(columns)),
        [[s.name, *(_ci(s.profile, c) for c in columns)] for s in summaries],
    )
    lines += ["", f"![{bench.benchmark}: performance profiles]({names['profile']})", ""]

    if bench.improvements or bench.incomparable:
        lines += [
            "### Probability of improvement at the final step [95% CI]",
            "",
            "P(X > Y): the probability that a seed of X has a higher final success than a seed of Y on a task "
            "(ties count one half), averaged over tasks; 0.5 means neither is better. Each pair is written with "
            "the better one first. Its CI resamples the seeds of X and of Y independently, within each task.",
            "",
        ]
    if bench.improvements:
        lines += _table(
            ["X", "Y", "P(X > Y) [95% CI]"],
            ["---", "---", "---"],
            [[p.better.name, p.worse.name, _ci(p.interval)] for p in bench.improvements],
        )
        lines += ["", f"![{bench.benchmark}: probability of improvement]({names['improvement']})", ""]
    if bench.incomparable:
        pairs = "; ".join(f"{a} and {b}" for a, b in bench.incomparable)
        lines += [f"Not compared (evaluated on different tasks): {pairs}.", ""]

    lines += [
        "### Final success per task (mean ± standard error over seeds)",
        "",
        f"![{bench.benchmark}: final success per task]({names['heatmap']})",
        "",
    ]
    rows = []
    for task in task_order(summaries):
        cells = [task]
        for s in summaries:
            if task in s.experiment.tasks:
                cells.append(_mean_se(s.final_scores[:, s.experiment.tasks.index(task)]))
            else:
                cells.append("–")
        rows.append(cells)
    lines += _table(["task", *(s.name for s in summaries)], ["---"] * (1 + len(summaries)), rows)

    lines += ["", "### Experiments and their runs", ""]
    shown = label_keys([(s.experiment.method, s.experiment.config) for s in summaries])
    for s, keys in zip(summaries, shown, strict=True):
        e = s.experiment
        n_steps = len(e.steps)
        differs = ", ".join(f"`{k}={format_value(e.config[k])}`" for k in keys)
        lines.append(
            f"- {s.name}"
            + (f" ({differs})" if differs else "")
            + f": {n_steps} evaluation step{'s' if n_steps != 1 else ''} common to its seeds"
        )
        for seed, paths in zip(e.seeds, e.paths, strict=True):
            lines.append(f"  - seed {seed}: " + ", ".join(f"`{p}`" for p in paths))
        if len(set(e.last_steps)) > 1:
            lines.append(
                f"  - its seeds stop at different steps ({', '.join(f'{x:,}' for x in e.last_steps)}); "
                f"the statistics stop at step {int(e.steps[-1]):,}"
            )
    lines.append("")
    return lines


def render_markdown(benchmarks: list[BenchmarkSummary], reps: int, seed: int) -> str:
    n_runs = sum(len(p) for b in benchmarks for s in b.experiments for p in s.experiment.paths)
    ignored = ", ".join(f"`{k}`" for k in NOT_THE_EXPERIMENT)
    protocol_keys = ", ".join(f"`{k}`" for k in PROTOCOL_KEYS)
    lines = [
        "# Results",
        "",
        f"Generated by `mtrl report` from {n_runs} run{'s' if n_runs != 1 else ''}. Success is the evaluation "
        "success rate per task (the share of evaluation episodes that succeeded). For each experiment, every "
        "statistic uses the evaluation steps common to all its seeds; *final* is the last of them.",
        "",
        "- **Experiments**: runs whose resolved configs are equal except for the seed are the seeds of one "
        f"experiment. Keys that do not change what is trained or measured are left out: {ignored}. An "
        "experiment is named by its method and the config keys in which it differs from the others.",
        f"- **Protocol**: {protocol_keys} and the tasks. Experiments of different protocols share a benchmark "
        "only with `--mix-protocols`.",
        "- **final / best success**: per seed, the success averaged over tasks at the final step / at its best "
        "common step; shown as mean ± standard error over seeds.",
        "- **IQM**: interquartile mean of the seeds × tasks final success values (the mean of their middle 50%).",
        f"- **95% CIs and bands**: percentile intervals from {reps} stratified bootstrap resamples (seeds drawn "
        f'with replacement within each task; bootstrap seed {seed}), as in rliable (Agarwal et al., "Deep '
        'Reinforcement Learning at the Edge of the Statistical Precipice", NeurIPS 2021).',
        f"- **†**: fewer than {MIN_SEEDS} seeds. A bootstrap over one or two seeds gives no meaningful interval: "
        "its figures draw no band.",
        "",
    ]
    for bench in benchmarks:
        lines += _benchmark_section(bench)
    return "\n".join(lines)
