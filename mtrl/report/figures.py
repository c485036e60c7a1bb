"""The figures of `mtrl report`, one function per figure, each returning a matplotlib Figure.

Legibility rules, kept by every figure:
- every experiment has one style in all figures: a colour (Okabe & Ito's colour-blind-safe palette first), a
  line style and a marker, so that no two experiments share all three;
- bands are light (`BAND_ALPHA`), so that overlapping ones stay readable;
- markers are hollow and spread along the curve, so that curves that coincide all stay visible;
- experiments with fewer than `MIN_SEEDS` seeds carry `FEW_SEEDS_MARK` and get no band: their intervals say
  little.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mtrl.report.stats import AGGREGATES, PROFILE_THRESHOLDS
from mtrl.report.summary import FEW_SEEDS_MARK, MIN_SEEDS, BenchmarkSummary, ExperimentSummary

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
BAND_ALPHA = 0.12
MARKERS_PER_CURVE = 8
HEATMAP_TASKS_PER_ROW = 25
DPI = 150
FEW_SEEDS_NOTE = f"{FEW_SEEDS_MARK} fewer than {MIN_SEEDS} seeds: no confidence band, its interval means little"
FEW_SEEDS_SHORT_NOTE = f"{FEW_SEEDS_MARK} fewer than {MIN_SEEDS} seeds"


@dataclass(frozen=True)
class Style:
    color: str
    linestyle: str
    marker: str


def styles(labels: list[str]) -> dict[str, Style]:
    """One style per label; the i-th colour, line style and marker cycle with different periods."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = list(OKABE_ITO)
    if len(labels) > len(palette):
        palette += [to_hex(c) for c in colormaps["tab20"].colors]
    return {
        label: Style(
            color=palette[i % len(palette)],
            linestyle=LINE_STYLES[(i + i // len(palette)) % len(LINE_STYLES)],
            marker=MARKERS[i % len(MARKERS)],
        )
        for i, label in enumerate(labels)
    }


def _seeds_text(summaries: list[ExperimentSummary]) -> str:
    counts = sorted({len(s.experiment.seeds) for s in summaries})
    if len(counts) == 1:
        return f"{counts[0]} seed{'s' if counts[0] != 1 else ''} per method"
    return f"{counts[0]}–{counts[-1]} seeds per method"


def _legend_label(s: ExperimentSummary) -> str:
    n = len(s.experiment.seeds)
    return f"{s.name} ({n} seed{'s' if n != 1 else ''})"


def _note_few_seeds(fig: Figure, summaries: list[ExperimentSummary], note: str = FEW_SEEDS_NOTE) -> None:
    if any(s.few_seeds for s in summaries):
        fig.text(0.01, 0.0, note, ha="left", va="top", fontsize=8, color="0.3")


def _spread_markers(index: int, count: int, points: int) -> tuple[int, int]:
    """(start, period) of the markers of the index-th of `count` curves: the curves mark different points."""
    period = max(1, points // MARKERS_PER_CURVE)
    return (index * period // max(count, 1)) % period, period


def _line(ax, x: np.ndarray, y: np.ndarray, style: Style, index: int, count: int, label: str) -> None:
    ax.plot(
        x,
        y,
        color=style.color,
        linestyle=style.linestyle,
        linewidth=1.6,
        marker=style.marker,
        markersize=5,
        markerfacecolor="none",
        markeredgewidth=1.2,
        markevery=_spread_markers(index, count, len(x)),
        label=label,
    )


def curve_figure(bench: BenchmarkSummary, statistic: str, style_of: dict[str, Style]) -> Figure:
    """Success over training (`statistic`: "iqm" or "mean") of every experiment, with 95% bands."""
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(8.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, s in enumerate(bench.experiments):
        curve = s.iqm_curve if statistic == "iqm" else s.mean_curve
        style = style_of[s.experiment.label]
        _line(ax, s.experiment.steps, curve.point, style, i, len(bench.experiments), _legend_label(s))
        if not s.few_seeds:
            ax.fill_between(s.experiment.steps, curve.lower, curve.upper, color=style.color, alpha=BAND_ALPHA, lw=0)
    name = "IQM" if statistic == "iqm" else "mean"
    ax.set_xlabel("environment steps per task")
    ax.set_ylabel(f"success rate ({name} over tasks and seeds)")
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{bench.benchmark}: {name} success, 95% bootstrap CI ({_seeds_text(bench.experiments)})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _note_few_seeds(fig, bench.experiments)
    return fig


def profile_figure(bench: BenchmarkSummary, style_of: dict[str, Style]) -> Figure:
    """Performance profiles at the final step: the fraction of seeds x tasks above each success threshold."""
    fig = Figure(figsize=(8.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, s in enumerate(bench.experiments):
        style = style_of[s.experiment.label]
        _line(ax, PROFILE_THRESHOLDS, s.profile.point, style, i, len(bench.experiments), _legend_label(s))
        if not s.few_seeds:
            ax.fill_between(
                PROFILE_THRESHOLDS, s.profile.lower, s.profile.upper, color=style.color, alpha=BAND_ALPHA, lw=0
            )
    ax.set_xlabel("success threshold τ")
    ax.set_ylabel("fraction of seeds × tasks with success > τ")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{bench.benchmark}: performance profiles at the final step, 95% bootstrap CI")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _note_few_seeds(fig, bench.experiments)
    return fig


def aggregates_figure(bench: BenchmarkSummary, style_of: dict[str, Style]) -> Figure:
    """Median, IQM, mean and optimality gap of the final success, each with its 95% CI (one panel each)."""
    from matplotlib.ticker import MaxNLocator

    summaries = bench.experiments
    height = 0.35 * len(summaries) + 1.3
    fig = Figure(figsize=(10.0, height), layout="constrained")
    axes = fig.subplots(1, len(AGGREGATES), sharey=True)
    rows = np.arange(len(summaries))[::-1]  # the first experiment on top
    for k, (ax, title) in enumerate(zip(axes, AGGREGATES, strict=True)):
        for row, s in zip(rows, summaries, strict=True):
            style = style_of[s.experiment.label]
            point, lower, upper = s.aggregates.point[k], s.aggregates.lower[k], s.aggregates.upper[k]
            if not s.few_seeds:
                ax.barh(row, upper - lower, left=lower, height=0.6, color=style.color, alpha=0.35, lw=0)
            ax.plot([point, point], [row - 0.3, row + 0.3], color=style.color, linewidth=2.2)
        ax.set_title(title + (" (lower is better)" if title == "optimality gap" else ""), fontsize=10)
        # Zoomed on the intervals, as rliable's panel: on [0, 1] they would shrink to ticks.
        ax.margins(x=0.2)
        lo, hi = ax.get_xlim()
        ax.set_xlim(max(lo, -0.02), min(hi, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("success rate" if title != "optimality gap" else "1 − mean success")
    axes[0].set_yticks(rows, [s.name for s in summaries])
    axes[0].set_ylim(-0.6, len(summaries) - 0.4)
    fig.suptitle(f"{bench.benchmark}: final success, 95% stratified-bootstrap CIs ({_seeds_text(summaries)})")
    _note_few_seeds(fig, summaries)
    return fig


def improvement_figure(bench: BenchmarkSummary, style_of: dict[str, Style]) -> Figure:
    """P(X > Y) for every pair of experiments, with its 95% CI; 1/2 means neither is better."""
    pairs = bench.improvements
    fig = Figure(figsize=(8.0, 0.32 * len(pairs) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    rows = np.arange(len(pairs))[::-1]
    for row, pair in zip(rows, pairs, strict=True):
        style = style_of[pair.better.experiment.label]
        few = pair.better.few_seeds or pair.worse.few_seeds
        point, lower, upper = pair.interval.point[0], pair.interval.lower[0], pair.interval.upper[0]
        if not few:
            ax.barh(row, upper - lower, left=lower, height=0.6, color=style.color, alpha=0.35, lw=0)
        # not clipped: a certain improvement sits on the axis' edge at 1
        ax.plot([point, point], [row - 0.3, row + 0.3], color=style.color, linewidth=2.2, clip_on=False)
    ax.axvline(0.5, color="0.4", linestyle="--", linewidth=1)
    ax.set_yticks(rows, [f"{p.better.name} > {p.worse.name}" for p in pairs])
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    ax.set_xlim(0, 1.01)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("probability of improvement P(X > Y) at the final step")
    ax.set_title(f"{bench.benchmark}: probability of improvement, 95% bootstrap CI")
    _note_few_seeds(fig, [p.better for p in pairs] + [p.worse for p in pairs])
    return fig


def heatmap_figure(bench: BenchmarkSummary) -> Figure:
    """Experiments x tasks: final success (mean over seeds), values written in the cells."""
    from matplotlib import colormaps

    summaries = bench.experiments
    tasks = task_order(summaries)
    values = np.full((len(summaries), len(tasks)), np.nan)
    for i, s in enumerate(summaries):
        for j, task in enumerate(tasks):
            if task in s.experiment.tasks:
                values[i, j] = s.final_scores[:, s.experiment.tasks.index(task)].mean()
    # Long task lists wrap onto stacked panels, so that MT50's cells stay legible.
    rows = [
        list(range(start, min(start + HEATMAP_TASKS_PER_ROW, len(tasks))))
        for start in range(0, len(tasks), HEATMAP_TASKS_PER_ROW)
    ]
    width = len(rows[0])
    label_room = 0.055 * max(len(t) for t in tasks)  # inches under each panel for the task names at 45°
    panel_height = 0.3 * len(summaries) + label_room + 0.2
    fig = Figure(
        figsize=(0.5 * width + 0.07 * max(len(s.name) for s in summaries) + 1.6, len(rows) * panel_height + 0.5)
    )
    fig.set_layout_engine("constrained", h_pad=0.02, w_pad=0.02)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    for ax, columns in zip(axes, rows, strict=True):
        panel = values[:, columns]
        image = ax.imshow(np.ma.masked_invalid(panel), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for (i, j), v in np.ndenumerate(panel):
            text, color = ("–", "black") if np.isnan(v) else (f"{v:.2f}", "black" if v > 0.6 else "white")
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
        ax.set_xlim(-0.5, width - 0.5)  # equal cell widths in a shorter last panel
        ax.set_xticks(range(len(columns)), [tasks[c] for c in columns], rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(summaries)), [s.name for s in summaries])
        ax.tick_params(length=0)
    colorbar = fig.colorbar(image, ax=list(axes), fraction=0.04, pad=0.01, aspect=12)
    colorbar.set_label("final success", fontsize=8)  # short: the bar is only as tall as the rows
    colorbar.ax.tick_params(labelsize=8)
    fig.suptitle(f"{bench.benchmark}: final success per task, mean over seeds ({_seeds_text(summaries)})", fontsize=10)
    _note_few_seeds(fig, summaries, FEW_SEEDS_SHORT_NOTE)
    return fig


def task_order(summaries: list[ExperimentSummary]) -> list[str]:
    return list(dict.fromkeys(t for s in summaries for t in s.experiment.tasks))


def slug(benchmark: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", benchmark)


def figure_names(bench: BenchmarkSummary) -> dict[str, str]:
    """The PNG file names of a benchmark's figures, by kind; no improvement figure for a single experiment."""
    prefix = slug(bench.benchmark)
    names = {
        "iqm": f"{prefix}_curve_iqm.png",
        "mean": f"{prefix}_curve_mean.png",
        "aggregates": f"{prefix}_aggregates.png",
        "profile": f"{prefix}_performance_profile.png",
        "heatmap": f"{prefix}_per_task_final.png",
    }
    if bench.improvements:
        names["improvement"] = f"{prefix}_probability_of_improvement.png"
    return names


def benchmark_figures(bench: BenchmarkSummary, style_of: dict[str, Style]) -> dict[str, Figure]:
    """Every figure of one benchmark, by the kinds of `figure_names`."""
    figures = {
        "iqm": curve_figure(bench, "iqm", style_of),
        "mean": curve_figure(bench, "mean", style_of),
        "aggregates": aggregates_figure(bench, style_of),
        "profile": profile_figure(bench, style_of),
        "heatmap": heatmap_figure(bench),
    }
    if bench.improvements:
        figures["improvement"] = improvement_figure(bench, style_of)
    return figures


def write_figures(bench: BenchmarkSummary, style_of: dict[str, Style], out: Path) -> list[Path]:
    names = figure_names(bench)
    paths = []
    for kind, fig in benchmark_figures(bench, style_of).items():
        path = out / names[kind]
        fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.05)
        paths.append(path)
    return paths
