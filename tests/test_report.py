"""`mtrl report` on synthetic run directories with hand-computed numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mtrl.cli import main
from mtrl.report import (
    build_report,
    find_run_dirs,
    group_runs,
    interquartile_mean,
    load_run,
    method_name,
    overall_mean,
    stratified_bootstrap,
)
from mtrl.report.markdown import render_markdown

TASKS = ["t0", "t1", "t2", "t3"]

# Per-task success [seed][task] at steps 100, 200 and 300 of two methods.
CAGRAD = {
    100: [[0.0] * 4] * 3,
    200: [[1.0, 1.0, 1.0, 0.6], [0.2] * 4, [0.5] * 4],  # task means 0.9, 0.2, 0.5
    300: [[0.9, 0.2, 0.6, 0.1], [1.0, 0.4, 0.7, 0.3], [0.8, 0.0, 0.5, 0.3]],  # task means 0.45, 0.6, 0.4
}
MEAN = {
    100: [[0.0] * 4] * 3,
    200: [[0.0] * 4] * 3,
    300: [[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]],  # task means 0.5, 0.25, 0.75
}


def write_run(
    path: Path,
    seed: int,
    evals: dict[int, list[float]],
    *,
    benchmark: str = "MT10",
    tasks: list[str] = TASKS,
    combiner: str = "mean",
    optimizer: str = "adam",
    variant: str = "conditioned",
    method: str | None = None,
    tail: str = "",
) -> Path:
    """A run directory as the trainer leaves it: config.yaml and metrics.jsonl (train and eval records)."""
    path.mkdir(parents=True)
    config = {
        "seed": seed,
        "env": {"benchmark": benchmark, "tasks": []},
        "agent": {"variant": variant},
        "combiner": {"name": combiner},
        "optimizer": {"name": optimizer},
    }
    if method is not None:
        config["method"] = method
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step, values in sorted(evals.items()):
        lines.append(json.dumps({"step": step, "kind": "train", "train/critic_loss": 1.0}))
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "kind": "eval",
                    "eval/mean_success": float(np.mean(values)),
                    "eval/success": float(np.mean(values)),
                    "eval/success/per_task": dict(zip(tasks, values, strict=True)),
                }
            )
        )
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    return path


def by_seed(table: dict[int, list[list[float]]], seed: int) -> dict[int, list[float]]:
    return {step: rows[seed] for step, rows in table.items()}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 methods x 3 seeds x 4 tasks on MT10, with steps outside the grid common to all seeds."""
    root = tmp_path / "sweep"
    for seed in range(3):
        evals = by_seed(CAGRAD, seed)
        if seed == 1:
            evals[250] = [1.0] * 4  # off the other seeds' grid: must not count as best or final
        write_run(root / f"cagrad-{seed}", seed, evals, combiner="cagrad", tail='{"step": 400, "kind": "ev')
    for seed in range(3):
        evals = by_seed(MEAN, seed)
        if seed == 2:
            evals[400] = [1.0] * 4  # this seed ran longer: the others' last step is the final one
        write_run(root / "nested" / f"mean-{seed}", seed, evals)
    return root


def report_lines(out: Path) -> list[str]:
    return (out / "report.md").read_text().splitlines()


def test_table_numbers(sweep: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert main(["report", str(sweep), "--out", str(out), "--reps", "200"]) == 0
    lines = report_lines(out)
    # final: per-seed task means 0.45, 0.6, 0.4 -> 0.4833, s.d. 0.10408, s.e. 0.06009
    # best: max over steps 100, 200, 300 of the task means: 0.9, 0.6, 0.5 -> 0.6667, s.e. 0.12019
    # IQM: the 12 final values sorted 0 .1 .2 .3 .3 .4 .5 .6 .7 .8 .9 1; the middle six average 2.8 / 6
    cagrad = next(line for line in lines if line.startswith("| cagrad |"))
    assert cagrad.startswith("| cagrad | 3 | 300 | 0.483 ± 0.060 | 0.667 ± 0.120 | 0.467 [")
    # final 0.5, 0.25, 0.75 -> 0.5, s.d. 0.25, s.e. 0.14434; best equals final; IQM of six 0s and six 1s is 0.5
    mean = next(line for line in lines if line.startswith("| mean |"))
    assert mean.startswith("| mean | 3 | 300 | 0.500 ± 0.144 | 0.500 ± 0.144 | 0.500 [")
    # per task, final values over seeds: t0 of cagrad 0.9, 1.0, 0.8 -> 0.900 ± 0.058; of mean 1, 1, 1
    assert "| t0 | 0.900 ± 0.058 | 1.000 ± 0.000 |" in lines
    assert "| t2 | 0.600 ± 0.058 | 0.333 ± 0.333 |" in lines
    assert "  - its seeds stop at different steps (300, 300, 400); the statistics stop at step 300" in lines
    assert "## MT10" in lines


def test_grouping_and_common_steps(sweep: Path):
    assert [p.name for p in find_run_dirs([sweep])] == [f"cagrad-{s}" for s in range(3)] + [
        f"mean-{s}" for s in range(3)
    ]
    grouped = group_runs([load_run(p) for p in find_run_dirs([sweep, sweep / "nested" / "mean-0"])])
    assert list(grouped) == ["MT10"]
    cagrad, mean = grouped["MT10"]
    assert (cagrad.method, cagrad.seeds, cagrad.tasks) == ("cagrad", [0, 1, 2], TASKS)
    assert (mean.method, mean.seeds) == ("mean", [0, 1, 2])  # a run dir given twice counts once
    np.testing.assert_array_equal(cagrad.steps, [100, 200, 300])
    np.testing.assert_array_equal(mean.steps, [100, 200, 300])
    assert mean.last_steps == [300, 300, 400]
    assert cagrad.success.shape == (3, 4, 3)
    np.testing.assert_array_equal(cagrad.success[:, :, -1], CAGRAD[300])
    np.testing.assert_array_equal(mean.success[:, :, 1], MEAN[200])


def test_method_names():
    base = {"combiner": {"name": "cagrad"}, "optimizer": {"name": "adam"}, "agent": {"variant": "conditioned"}}
    assert method_name(base) == "cagrad"
    assert method_name({**base, "optimizer": {"name": "adatask"}}) == "adatask"
    assert method_name({**base, "agent": {"variant": "multihead"}}) == "cagrad-multihead"
    assert method_name({**base, "method": "sac_single_task"}) == "sac_single_task"


def test_benchmarks_and_single_task_runs_merge_into_seeds(tmp_path: Path):
    final = [0.9, 0.2, 0.6, 0.1]
    for seed in range(2):
        for i, task in enumerate(TASKS):  # a baseline trained as one run per task
            evals = {100: [0.0], 200: [final[i] - 0.1 * seed]}
            write_run(tmp_path / f"st-{task}-{seed}", seed, evals, tasks=[task], method="sac_single_task")
        write_run(tmp_path / f"mh-{seed}", seed, {100: [0.5] * 4}, variant="multihead")
    write_run(tmp_path / "mt1", 0, {50: [1.0]}, benchmark="MT1", tasks=["reach-v3"])
    runs = [load_run(p) for p in find_run_dirs([tmp_path])]
    grouped = group_runs(runs)
    assert list(grouped) == ["MT1", "MT10"]
    assert [m.method for m in grouped["MT10"]] == ["mean-multihead", "sac_single_task"]
    single = grouped["MT10"][1]
    assert single.seeds == [0, 1] and set(single.tasks) == set(TASKS)
    np.testing.assert_allclose(
        single.success[:, [single.tasks.index(t) for t in TASKS], -1], [final, np.subtract(final, 0.1)]
    )

    out = tmp_path / "out"
    assert main(["report", str(tmp_path), "--out", str(out), "--reps", "50"]) == 0
    names = {p.name for p in out.iterdir()}
    panel = {"curve_iqm", "curve_mean", "aggregates", "performance_profile", "per_task_final"}
    assert {f"MT1_{kind}.png" for kind in panel} <= names  # one experiment: nothing to compare it with
    assert {f"MT10_{kind}.png" for kind in panel | {"probability_of_improvement"}} <= names
    # per seed: task means 0.45 and 0.35 -> 0.400 ± 0.050
    assert any(line.startswith("| sac_single_task† | 2 | 200 | 0.400 ± 0.050 |") for line in report_lines(out))
    # one seed: marked as too few for its interval to mean anything
    assert "| mean† | 1 | 50 | 1.000 ± n/a | 1.000 ± n/a | 1.000 [1.000, 1.000] |" in report_lines(out)


def test_pngs_are_images_and_report_is_reproducible(sweep: Path, tmp_path: Path):
    outs = [tmp_path / "a"]
    assert main(["report", str(sweep), "--out", str(outs[0]), "--reps", "100", "--seed", "3"]) == 0
    again = render_markdown(build_report([sweep], reps=100, seed=3), reps=100, seed=3)
    assert (outs[0] / "report.md").read_text() == again
    pngs = sorted(p.name for p in outs[0].glob("*.png"))
    assert pngs == [
        "MT10_aggregates.png",
        "MT10_curve_iqm.png",
        "MT10_curve_mean.png",
        "MT10_per_task_final.png",
        "MT10_performance_profile.png",
        "MT10_probability_of_improvement.png",
    ]
    for name in pngs:
        with Image.open(outs[0] / name) as image:
            image.verify()
        with Image.open(outs[0] / name) as image:
            assert image.format == "PNG"
            assert image.width >= 600 and image.height >= 200
            pixels = np.asarray(image.convert("L"))
            assert pixels.std() > 10  # drawn on, not a blank canvas
        assert f"]({name})" in (outs[0] / "report.md").read_text()


def test_iqm_and_mean_of_known_arrays():
    scores = np.array(CAGRAD[300])
    assert interquartile_mean(scores)[0] == pytest.approx(2.8 / 6)
    assert overall_mean(scores)[0] == pytest.approx(5.8 / 12)
    # 3 seeds x 2 tasks: 6 values, one cut at each end
    assert interquartile_mean(np.array([[0.0, 10.0], [1.0, 2.0], [3.0, 4.0]]))[0] == pytest.approx(2.5)
    # curves: one IQM per step, the same as the IQM of each step's slice
    curves = np.random.default_rng(0).uniform(size=(5, 4, 7))
    expected = [interquartile_mean(curves[:, :, s])[0] for s in range(7)]
    np.testing.assert_allclose(interquartile_mean(curves), expected)


def test_stratified_bootstrap_intervals():
    # Two seeds of one task scoring 0 and 1: a resample's mean is 0, 0.5 or 1 (p = 1/4, 1/2, 1/4).
    ci = stratified_bootstrap(np.array([[0.0], [1.0]]), overall_mean, reps=2000, seed=0)
    assert (ci.point[0], ci.lower[0], ci.upper[0]) == (0.5, 0.0, 1.0)
    # Seeds that agree on every task leave nothing to resample.
    same = np.tile(np.array([[0.2, 0.4, 0.9]]), (4, 1))
    ci = stratified_bootstrap(same, interquartile_mean, reps=100, seed=0)
    assert ci.lower[0] == pytest.approx(ci.point[0]) and ci.upper[0] == pytest.approx(ci.point[0])
    # Resampling is within tasks: a task's values never leak into another, so the mean stays within bounds
    # set by each task's own min and max.
    scores = np.array([[0.0, 1.0], [0.5, 1.0], [0.2, 1.0]])
    ci = stratified_bootstrap(scores, overall_mean, reps=500, seed=1)
    assert 0.5 <= ci.lower[0] <= ci.point[0] <= ci.upper[0] <= 0.75
    # Curves: one interval per step; same seed, same numbers.
    curves = np.random.default_rng(0).uniform(size=(3, 4, 5))
    a, b = (stratified_bootstrap(curves, interquartile_mean, reps=200, seed=7) for _ in range(2))
    assert a.lower.shape == (5,) and np.all(a.lower <= a.point) and np.all(a.point <= a.upper)
    np.testing.assert_array_equal(a.lower, b.lower)
    np.testing.assert_array_equal(a.upper, b.upper)


def _usable_rliable():
    try:
        from rliable import library as rly
        from rliable import metrics

        rly.get_interval_estimates({"m": np.zeros((2, 2))}, lambda x: np.array([metrics.aggregate_mean(x)]), reps=2)
    except Exception as err:  # rliable 1.2 breaks on import with pandas 3 and on use with arch 8
        pytest.skip(f"rliable does not run in this environment ({type(err).__name__}: {err})".splitlines()[0])
    return rly, metrics


def test_bootstrap_equals_rliable():
    rly, metrics = _usable_rliable()
    rng = np.random.default_rng(0)
    final = rng.uniform(size=(5, 10))
    curves = rng.uniform(size=(3, 4, 6))
    state = np.random.get_state()
    try:
        np.random.seed(11)
        points, cis = rly.get_interval_estimates({"m": final}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps=300)
        ours = stratified_bootstrap(final, interquartile_mean, reps=300, seed=11)
        np.testing.assert_allclose(ours.point, points["m"])
        np.testing.assert_allclose([ours.lower[0], ours.upper[0]], cis["m"][:, 0])

        def iqm_per_step(x: np.ndarray) -> np.ndarray:
            return np.array([metrics.aggregate_iqm(x[..., s]) for s in range(x.shape[-1])])

        np.random.seed(5)
        points, cis = rly.get_interval_estimates({"m": curves}, iqm_per_step, reps=200)
        ours = stratified_bootstrap(curves, interquartile_mean, reps=200, seed=5)
        np.testing.assert_allclose(ours.point, points["m"])
        np.testing.assert_allclose(np.stack([ours.lower, ours.upper]), cis["m"])
    finally:
        np.random.set_state(state)


def test_bootstrap_leaves_numpy_global_rng_alone():
    state = np.random.get_state()
    stratified_bootstrap(np.random.default_rng(0).uniform(size=(3, 4)), interquartile_mean, reps=20, seed=0)
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such directory"),
        ("empty", "no run directories"),
        ("no_metrics", "no metrics.jsonl"),
        ("no_config", "no config.yaml"),
        ("no_evals", "no evaluation records"),
        ("bad_yaml", "not valid YAML"),
        ("no_common_step", "no evaluation step is common"),
        ("same_seed_twice", "both seed 0"),
        ("other_tasks", "report different tasks"),
        ("reps", "--reps must be >= 1"),
        ("seed", "--seed must be in"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, case: str, message: str):
    root = tmp_path / "runs"
    root.mkdir()
    args = ["--reps", "10"]
    if case == "no_metrics":
        write_run(root / "r", 0, {100: [0.5] * 4})
        (root / "r" / "metrics.jsonl").unlink()
    elif case == "no_config":
        write_run(root / "r", 0, {100: [0.5] * 4})
        (root / "r" / "config.yaml").unlink()
    elif case == "no_evals":
        write_run(root / "r", 0, {}, tail='{"step": 10, "kind": "train"}\n{"step": 20, "ki')
    elif case == "bad_yaml":
        write_run(root / "r", 0, {100: [0.5] * 4})
        (root / "r" / "config.yaml").write_text("seed: [0\n")
    elif case == "no_common_step":
        write_run(root / "a", 0, {100: [0.5] * 4})
        write_run(root / "b", 1, {200: [0.5] * 4})
    elif case == "same_seed_twice":
        write_run(root / "a", 0, {100: [0.5] * 4})
        write_run(root / "b", 0, {100: [0.5] * 4})
    elif case == "other_tasks":
        write_run(root / "a", 0, {100: [0.5] * 4})
        write_run(root / "b", 1, {100: [0.5] * 4}, tasks=["t0", "t1", "t2", "t9"])
    elif case in ("reps", "seed"):
        write_run(root / "a", 0, {100: [0.5] * 4})
        args = ["--reps", "0"] if case == "reps" else ["--seed", "-1"]
    target = tmp_path / "nowhere" if case == "missing" else root
    out = tmp_path / "out"
    assert main(["report", str(target), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrl: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_out_must_be_a_directory(sweep: Path, tmp_path: Path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["report", str(sweep), "--out", str(out), "--reps", "10"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert out.read_text() == "x"


def test_build_report_summaries(sweep: Path):
    (bench,) = build_report([sweep], reps=100, seed=0)
    cagrad = bench.experiments[0]
    np.testing.assert_allclose(cagrad.final_success, [0.45, 0.6, 0.4])
    np.testing.assert_allclose(cagrad.best_success, [0.9, 0.6, 0.5])
    np.testing.assert_allclose(cagrad.mean_curve.point, [0.0, (0.9 + 0.2 + 0.5) / 3, 5.8 / 12])
    assert cagrad.iqm_curve.point.shape == (3,) and cagrad.aggregates.point[1] == pytest.approx(2.8 / 6)
    # median of the task means 0.9, 0.2, 0.6, 0.233 is 0.417; optimality gap = 1 - mean
    np.testing.assert_allclose(cagrad.aggregates.point, [(0.6 + 0.7 / 3) / 2, 2.8 / 6, 5.8 / 12, 1 - 5.8 / 12])
