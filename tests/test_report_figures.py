"""What the figures of `mtrl report` draw: their axes, curves, bands, legends and margins.

The figures come from the public functions of `mtrl.report.figures`, which return matplotlib Figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from matplotlib.patches import Rectangle
from PIL import Image

from mtrl.report import find_run_dirs, group_runs, load_run
from mtrl.report.figures import (
    BAND_ALPHA,
    aggregates_figure,
    benchmark_figures,
    curve_figure,
    figure_names,
    heatmap_figure,
    improvement_figure,
    profile_figure,
    styles,
)
from mtrl.report.stats import AGGREGATES, PROFILE_THRESHOLDS
from mtrl.report.summary import BenchmarkSummary, summarize_benchmark

MT10 = [
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
]
STEPS = list(range(0, 200_001, 10_000))  # 21 evaluations


def write_run(path: Path, seed: int, combiner: dict, level: float, noise_seed: int) -> None:
    path.mkdir(parents=True)
    config = {"seed": seed, "env": {"benchmark": "MT10", "tasks": []}, "combiner": combiner}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(noise_seed)
    lines = []
    for step in STEPS:
        success = np.clip(level * step / STEPS[-1] + rng.normal(0, 0.05, len(MT10)), 0, 1).round(2)
        lines.append(
            json.dumps(
                {"step": step, "kind": "eval", "eval/success/per_task": dict(zip(MT10, success.tolist(), strict=True))}
            )
        )
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> BenchmarkSummary:
    """MT10-like: cagrad c=0.4 and c=0.9, mean and mgda drawing the same numbers (coinciding curves), and
    pcgrad with two seeds."""
    root = tmp_path_factory.mktemp("runs")
    for seed in range(3):
        write_run(root / f"cagrad-a-{seed}", seed, {"name": "cagrad", "c": 0.4}, 0.9, 10 + seed)
        write_run(root / f"cagrad-b-{seed}", seed, {"name": "cagrad", "c": 0.9}, 0.5, 20 + seed)
        write_run(root / f"mean-{seed}", seed, {"name": "mean"}, 0.7, 30 + seed)
        write_run(root / f"mgda-{seed}", seed, {"name": "mgda"}, 0.7, 30 + seed)
    for seed in range(2):
        write_run(root / f"pcgrad-{seed}", seed, {"name": "pcgrad"}, 0.8, 40 + seed)
    (experiments,) = group_runs([load_run(p) for p in find_run_dirs([root])]).values()
    return summarize_benchmark("MT10", experiments, reps=30, seed=0)


LABELS = ["cagrad c=0.4", "cagrad c=0.9", "mean", "mgda", "pcgrad"]


def test_every_experiment_gets_its_own_style():
    many = styles([f"m{i}" for i in range(30)])
    assert len({(s.color, s.linestyle, s.marker) for s in many.values()}) == 30
    assert len({s.color for s in list(many.values())[:8]}) == 8  # the first eight differ in colour alone


@pytest.mark.parametrize("kind", ["iqm", "mean", "profile"])
def test_curves_bands_and_legend(bench: BenchmarkSummary, kind: str):
    style_of = styles(LABELS)
    fig = profile_figure(bench, style_of) if kind == "profile" else curve_figure(bench, kind, style_of)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [
        "cagrad c=0.4 (3 seeds)",
        "cagrad c=0.9 (3 seeds)",
        "mean (3 seeds)",
        "mgda (3 seeds)",
        "pcgrad† (2 seeds)",
    ]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in lines]
    # A band for each experiment with at least 3 seeds, light, in its line's colour; none for pcgrad.
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 4
    assert all(band.get_alpha() == BAND_ALPHA <= 0.15 for band in bands)
    assert [to_hex(b.get_facecolor()[0], keep_alpha=False) for b in bands] == [to_hex(x.get_color()) for x in lines[:4]]
    # The note that explains the mark.
    assert any("† fewer than 3 seeds" in t.get_text() for t in fig.texts)
    # Distinct colours, line styles and hollow markers.
    assert len({to_hex(line.get_color()) for line in lines}) == 5
    assert len({line.get_marker() for line in lines}) == 5
    assert all(line.get_markerfacecolor() == "none" for line in lines)
    # mean and mgda coincide: their markers sit at different points and their dashes differ.
    mean, mgda = lines[2], lines[3]
    np.testing.assert_array_equal(mean.get_ydata(), mgda.get_ydata())
    assert mean.get_linestyle() != mgda.get_linestyle()
    x = np.asarray(mean.get_xdata())

    def marked(line) -> set[float]:
        start, period = line.get_markevery()
        return set(x[start::period].tolist())

    assert marked(mean) and marked(mgda) and not marked(mean) & marked(mgda)
    if kind == "profile":
        np.testing.assert_array_equal(x, PROFILE_THRESHOLDS)
    else:
        np.testing.assert_array_equal(x, STEPS)


def test_aggregates_panel(bench: BenchmarkSummary):
    fig = aggregates_figure(bench, styles(LABELS))
    assert [ax.get_title() for ax in fig.axes] == ["median", "IQM", "mean", "optimality gap (lower is better)"]
    assert len(AGGREGATES) == 4
    for k, ax in enumerate(fig.axes):
        bars = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert len(bars) == 4  # no interval bar for pcgrad's two seeds
        points = ax.get_lines()
        assert len(points) == 5
        # each point tick sits at its experiment's point estimate, the bars span its interval
        for s, tick in zip(bench.experiments, points, strict=True):
            assert tick.get_xdata()[0] == pytest.approx(s.aggregates.point[k])
        for s, bar in zip(bench.experiments[:4], bars, strict=True):
            assert bar.get_x() == pytest.approx(s.aggregates.lower[k])
            assert bar.get_x() + bar.get_width() == pytest.approx(s.aggregates.upper[k])
    ticks = sorted(zip(fig.axes[0].get_yticks(), fig.axes[0].get_yticklabels(), strict=True), key=lambda t: -t[0])
    assert [label.get_text() for _, label in ticks] == ["cagrad c=0.4", "cagrad c=0.9", "mean", "mgda", "pcgrad†"]


def test_probability_of_improvement_figure(bench: BenchmarkSummary):
    fig = improvement_figure(bench, styles(LABELS))
    (ax,) = fig.axes
    pairs = [t.get_text() for t in ax.get_yticklabels()]
    assert len(pairs) == len(bench.improvements) == 10  # every pair of 5 experiments
    assert "cagrad c=0.4 > cagrad c=0.9" in pairs
    assert all(p.interval.point[0] >= 0.5 for p in bench.improvements)
    assert len([p for p in ax.patches if isinstance(p, Rectangle)]) == 6  # pairs without pcgrad
    assert any(line.get_xdata()[0] == 0.5 and len(line.get_xdata()) == 2 for line in ax.get_lines())


def test_heatmap_cells(bench: BenchmarkSummary):
    fig = heatmap_figure(bench)
    heat_axes = [ax for ax in fig.axes if ax.get_images()]
    assert len(heat_axes) == 1
    image = heat_axes[0].get_images()[0].get_array()
    assert image.shape == (5, 10)
    assert [t.get_text() for t in heat_axes[0].get_xticklabels()] == MT10
    assert [t.get_text() for t in heat_axes[0].get_yticklabels()] == [s.name for s in bench.experiments]
    assert len(heat_axes[0].texts) == 50
    np.testing.assert_allclose(image[0], bench.experiments[0].final_scores.mean(axis=0))
    assert heat_axes[0].texts[0].get_text() == f"{image[0, 0]:.2f}"


@pytest.mark.parametrize("count", [2, 5])
def test_heatmap_has_no_empty_margins(bench: BenchmarkSummary, tmp_path: Path, count: int):
    summary = BenchmarkSummary("MT10", bench.experiments[:count], [], [])
    fig = heatmap_figure(summary)
    path = tmp_path / "heatmap.png"
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.05)
    # What the PNG holds is the figure: each margin is the 5-pixel pad and under 3% of the image more.
    pixels = np.asarray(Image.open(path).convert("L")) < 250
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    height, width = pixels.shape
    assert max(rows[0], height - 1 - rows[-1]) <= 5 + 0.03 * height
    assert max(cols[0], width - 1 - cols[-1]) <= 5 + 0.03 * width
    # The colour bar and its label stay within the height of the cells (its end tick labels may overhang by
    # half their height, 8 pixels at this dpi): a longer label would stand out above them and leave an empty
    # band over the title.
    (heat,) = [ax for ax in fig.axes if ax.get_images()]
    (colorbar,) = [ax for ax in fig.axes if ax is not heat]
    cells, bar = heat.get_window_extent(), colorbar.get_tightbbox()
    assert fig.dpi == 100
    assert bar.y1 <= cells.y1 + 8 and bar.y0 >= cells.y0 - 8
    # The cells take most of the width.
    assert cells.width / fig.get_tightbbox().width / fig.dpi > 0.7


def test_a_benchmark_has_one_figure_per_name(bench: BenchmarkSummary):
    figures = benchmark_figures(bench, styles(LABELS))
    assert (
        set(figures) == set(figure_names(bench)) == {"iqm", "mean", "aggregates", "profile", "heatmap", "improvement"}
    )
