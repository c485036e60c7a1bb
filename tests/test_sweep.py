"""`mtrl sweep`: the spec and its grid without Ray, then real sweeps on a local Ray.

The Ray test runs a 2 x 2 grid (two `agent.tau` values x two seeds) of toy trials with one retry
allowed. One trial's training process is SIGKILLed once its first checkpoint exists: Ray's retry
resumes it from that checkpoint and it finishes with every metrics step exactly once. Another is
killed on both of its attempts: it fails, and the sweep exits 1. Running the sweep again resumes
only that trial; a third run finds everything finished and starts nothing, not even Ray.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from mtrl import checkpoint as ckpt
from mtrl import sweep
from mtrl.cli import main
from mtrl.config import LogConfig
from mtrl.rundir import METRICS_FILE
from mtrl.trainer import Trainer
from tests.conftest import TOY_OVERRIDES, nested_config

REPO = Path(__file__).resolve().parents[1]


def write_preset(path: Path, *overrides: str) -> Path:
    """The seconds-long toy config as a YAML preset, with `overrides` on top."""
    path.write_text(yaml.safe_dump(nested_config([*TOY_OVERRIDES, *overrides])))
    return path


def write_spec(path: Path, **fields) -> Path:
    """A spec named toy with seed 0, its root next to it; a field given as None is left out."""
    spec = {"name": "toy", "root": str(path.parent / "sweep"), "seeds": [0], **fields}
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False))
    return path



def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----- the spec and the grid, without Ray -----------------------------------------------------
def test_grid_expands_presets_x_values_x_seeds(tmp_path):
    a = write_preset(tmp_path / "toy_a.yaml")
    b = write_preset(tmp_path / "toy_b.yaml", "combiner.name=pcgrad", "train.torch_threads=3")
    spec = sweep.load_spec(
        write_spec(
            tmp_path / "spec.yaml",
            presets=[str(a), str(b)],
            overrides={"train.total_steps": 80},
            grid={"agent.tau": [0.005, 0.01], "agent.hidden_sizes": [[16], [32, 32]]},
            seeds=[3, 4],
            resources={"num_cpus": 2.5},
        )
    )
    trials = sweep.expand(spec)
    expected = [
        (stem, tau, sizes, seed)
        for stem in ("toy_a", "toy_b")
        for tau in (0.005, 0.01)
        for sizes in ([16], [32, 32])
        for seed in (3, 4)
    ]
    assert [t.name for t in trials] == [
        f"{stem}-agent.tau={tau}-agent.hidden_sizes={'_'.join(map(str, sizes))}-s{seed}"
        for stem, tau, sizes, seed in expected
    ]
    assert trials[0].name == "toy_a-agent.tau=0.005-agent.hidden_sizes=16-s3"
    root = tmp_path / "sweep"
    for trial, (stem, tau, sizes, seed) in zip(trials, expected, strict=True):
        cfg = trial.config
        assert trial.preset == tmp_path / f"{stem}.yaml" and trial.seed == seed
        assert trial.run_dir == root / trial.name and cfg.run.dir == str(root / trial.name)
        assert (cfg.seed, cfg.agent.tau, cfg.agent.hidden_sizes) == (seed, tau, sizes)
        assert cfg.train.total_steps == 80 and cfg.log.progress is False
        assert cfg.combiner.name == ("mean" if stem == "toy_a" else "pcgrad")
        # Torch threads follow the trial's CPU share unless the preset sets them.
        assert cfg.train.torch_threads == (2 if stem == "toy_a" else 3)
    assert trials[0].overrides == [
        "train.total_steps=80",
        "agent.tau=0.005",
        "agent.hidden_sizes=[16]",
        "seed=3",
        f"run.dir={root / trials[0].name}",
        "log.progress=false",
        "train.torch_threads=2",
    ]
    assert spec.max_retries == 2 and spec.command == "train"
    assert not root.exists()


@pytest.mark.skipif(not hasattr(LogConfig(), "wandb"), reason="no W&B tracking keys in this config")
def test_tracked_trials_are_grouped_by_the_sweep_name(tmp_path):
    tracked = write_preset(tmp_path / "tracked.yaml", "log.wandb=true")
    grouped = write_preset(tmp_path / "grouped.yaml", "log.wandb=true", "log.wandb_group=mine")
    untracked = write_preset(tmp_path / "untracked.yaml")
    path = write_spec(tmp_path / "spec.yaml", name="mt10 sweep", presets=[str(tracked), str(grouped), str(untracked)])
    trials = sweep.expand(sweep.load_spec(path))
    assert [t.config.log.wandb_group for t in trials] == ["mt10 sweep", "mine", None]
    assert [t.overrides[-1] for t in trials] == [
        "log.wandb_group=mt10 sweep",
        "train.torch_threads=1",
        "train.torch_threads=1",
    ]


def test_relative_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_preset(tmp_path / "toy.yaml")
    spec = sweep.load_spec(write_spec(Path("spec.yaml"), root="runs/s", presets=["toy.yaml"], seeds=[7]))
    (trial,) = sweep.expand(spec)
    assert trial.run_dir == tmp_path / "runs" / "s" / "toy-s7" and trial.preset == tmp_path / "toy.yaml"


@pytest.mark.parametrize("name", ["mt10_methods", "smoke"])
def test_example_specs_expand(name, monkeypatch):
    monkeypatch.chdir(REPO)  # their paths are relative to the repository root
    spec = sweep.load_spec(REPO / "configs" / "sweeps" / f"{name}.yaml")
    trials = sweep.expand(spec)
    assert len(trials) == len(spec.presets) * math.prod(len(v) for v in spec.grid.values()) * len(spec.seeds)
    assert len({t.run_dir for t in trials}) == len(trials)
    if name == "mt10_methods":
        assert len(trials) == 30 and trials[0].name == "mt10_mtsac-s0"
        assert {t.config.env.benchmark for t in trials} == {"MT10"}


def test_trial_names_are_file_name_safe_and_bounded():
    point = {"env.tasks": ["reach-v3", "push/v3"], "x.note": "a b", "agent.target_entropy": None, "y.on": True}
    name = sweep.trial_name("p", point, 0)
    assert name == "p-env.tasks=reach-v3_push_v3-x.note=a_b-agent.target_entropy=null-y.on=true-s0"
    assert sweep.trial_name("p", {"agent.alpha_lr": 1e-05}, 2) == "p-agent.alpha_lr=1e-05-s2"
    long_a = sweep.trial_name("p", {"k": "v" * 300}, 1)
    long_b = sweep.trial_name("p", {"k": "v" * 299 + "w"}, 1)
    assert len(long_a) == sweep.MAX_NAME + len("-s1") and long_a.endswith("-s1")
    assert long_a != long_b and long_a == sweep.trial_name("p", {"k": "v" * 300}, 1)
    assert re.fullmatch(r"[A-Za-z0-9._=+-]+", long_a)


BAD_SPECS = [
    ({"seeds": None}, "seeds: missing (required)"),
    ({"seed": 1}, "seed: unknown key; expected one of name, root, command"),
    ({"seeds": [0, 0]}, "seeds: expected a non-empty list of distinct integers >= 0, found [0, 0]"),
    ({"seeds": [True]}, "seeds: expected a non-empty list of distinct integers >= 0"),
    ({"name": ""}, "name: expected a non-empty string"),
    ({"command": "eval"}, "command: expected one of train, baseline, found 'eval'"),
    ({"presets": []}, "presets: expected a non-empty list of config file paths"),
    ({"grid": {"agent.tau": 0.01}}, "grid.agent.tau: expected a non-empty list of values, found 0.01"),
    ({"grid": {"agent.tau": [0.01, 0.01]}}, "grid.agent.tau: duplicate values"),
    ({"grid": {"agent": {"tau": [0.01]}}}, "grid.agent: found a mapping; give each key in dotted form"),
    ({"grid": {"seed": [1, 2]}}, "grid.seed: set by the sweep: the trial's seed comes from `seeds`"),
    ({"overrides": {"run.dir": "x"}}, "overrides.run.dir: set by the sweep"),
    ({"overrides": {"agent.tau": 0.1}, "grid": {"agent.tau": [0.01]}}, "grid.agent.tau: also set in overrides"),
    ({"overrides": ["train.total_steps=5"]}, "overrides: expected a mapping of dotted config keys"),
    ({"resources": {"num_gpus": -1}}, "resources.num_gpus: expected a number >= 0, found -1"),
    ({"resources": {"num_gpus": 1.5}}, "resources.num_gpus: above 1 it must be a whole number, found 1.5"),
    ({"resources": {"gpus": 1}}, "resources.gpus: unknown key; expected one of num_cpus, num_gpus"),
    ({"resources": {"num_cpus": 0}}, "resources: a trial needs num_cpus > 0 or num_gpus > 0"),
    ({"max_retries": -1}, "max_retries: expected an integer >= 0, found -1"),
    # Each trial's config is loaded before anything starts: one bad combination fails the sweep.
    ({"grid": {"combiner.c": [0.5]}}, "trial toy-combiner.c=0.5-s0: combiner: unknown hyper-parameter 'c'"),
    (
        {"grid": {"train.total_steps": [100, -5]}},
        "trial toy-train.total_steps=-5-s0: train.total_steps must be > 0, found -5",
    ),
    ({"grid": {"agent.nope": [1]}}, "trial toy-agent.nope=1-s0: agent: unknown key 'nope'"),
    ({"overrides": {"device": "cuda"}}, "trial toy-s0: device=cuda needs a GPU; set resources.num_gpus"),
    ({"presets": ["missing.yaml"]}, "trial missing-s0: config file not found: "),
    ({"presets": ["toy.yaml", "other/toy.yaml"]}, "share the file name 'toy', which names their trials"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_a_bad_spec_fails_up_front_with_one_line(fields, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_preset(tmp_path / "toy.yaml")
    write_spec(tmp_path / "spec.yaml", **{"presets": ["toy.yaml"], **fields})
    before = _tree(tmp_path)
    assert main(["sweep", "spec.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrl: error: sweep spec spec.yaml: ") and err.count("\n") == 1, err
    assert message in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name: [unclosed\n", "malformed YAML in sweep spec spec.yaml (line 2)"),
        ("- a\n- b\n", "sweep spec spec.yaml: expected a mapping of name, root"),
    ],
)
def test_an_unreadable_spec_is_one_line(content, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("spec.yaml").write_text(content)
    assert main(["sweep", "spec.yaml"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_local_ray_flags_do_not_go_with_an_address(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "spec.yaml"), "--address", "auto", "--num-cpus", "2"]) == 2
    assert capsys.readouterr().err == (
        "mtrl: error: --num-cpus and --num-gpus size a local Ray; an existing cluster (--address) has its own\n"
    )


def test_joining_a_cluster_that_is_not_there_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_preset(tmp_path / "toy.yaml")
    path = write_spec(tmp_path / "spec.yaml", presets=[str(tmp_path / "toy.yaml")])
    assert main(["sweep", str(path), "--address", "auto"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("mtrl: error: --address auto: Could not find any running Ray instance")
    assert not (tmp_path / "sweep").exists()


def test_existing_runs_are_skipped_extended_resumed_or_refused(tmp_path, capsys, monkeypatch):
    # Over before learning starts (warm-up is 40 steps): seconds.
    preset = write_preset(tmp_path / "toy.yaml", "train.total_steps=40", "checkpoint.every=20", "eval.every=20")
    grid = {"agent.tau": [0.005, 0.01]}
    path = write_spec(tmp_path / "spec.yaml", presets=[str(preset)], grid=grid)
    done, fresh = sweep.expand(sweep.load_spec(path))
    assert Trainer(done.config, done.run_dir).train() == 0
    assert sweep.run_progress(done) == 40 and sweep.run_progress(fresh) is None
    capsys.readouterr()

    def dry_run(**fields) -> list[str]:
        assert main(["sweep", str(write_spec(path, presets=[str(preset)], grid=grid, **fields)), "--dry-run"]) == 0
        return capsys.readouterr().out.splitlines()

    assert dry_run() == [
        "toy-agent.tau=0.005-s0: finished (step 40), skipped",
        f"toy-agent.tau=0.01-s0: start: mtrl train --config {preset} agent.tau=0.01 seed=0 "
        f"run.dir={fresh.run_dir} log.progress=false train.torch_threads=1",
    ]
    # A longer train.total_steps extends the finished trial: it resumes.
    assert dry_run(overrides={"train.total_steps": 60})[0] == (
        f"toy-agent.tau=0.005-s0: resume from step 40: mtrl train --resume {done.run_dir} "
        "train.total_steps=60 train.torch_threads=1 log.progress=false"
    )
    (done.run_dir / "checkpoints" / "step_0000000040.pt").unlink()
    assert dry_run()[0] == (
        f"toy-agent.tau=0.005-s0: resume from step 20: mtrl train --resume {done.run_dir} "
        "train.total_steps=40 train.torch_threads=1 log.progress=false"
    )

    # A run directory holding another experiment is never adopted.
    write_spec(path, presets=[str(preset)], grid=grid, overrides={"agent.gamma": 0.9})
    assert main(["sweep", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"mtrl: error: trial toy-agent.tau=0.005-s0: {done.run_dir} holds a run with another config "
        "(agent.gamma: 0.99 in the run, 0.9 in the sweep); move it away or change root\n"
    )
    write_spec(path, presets=[str(preset)], grid=grid, overrides={"train.total_steps": 10})
    assert main(["sweep", str(path)]) == 2
    assert "is at step 20, beyond train.total_steps=10" in capsys.readouterr().err
    write_spec(path, presets=[str(preset)], grid=grid, command="baseline")
    assert main(["sweep", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"mtrl: error: trial toy-agent.tau=0.005-s0: {done.run_dir} holds another run: "
        f"{done.run_dir / 'config.yaml'} is not the config of an `mtrl baseline` run; move it away or change root\n"
    )


def test_a_baseline_sweep_skips_finished_baseline_runs(tmp_path, capsys, monkeypatch):
    preset = write_preset(tmp_path / "toy.yaml", "train.total_steps=40", "checkpoint.every=20", "eval.every=20")
    path = write_spec(tmp_path / "spec.yaml", presets=[str(preset)], seeds=[0, 1], command="baseline")
    done, fresh = sweep.expand(sweep.load_spec(path))
    assert main(done.start_argv()) == 0
    assert sweep.run_progress(done) == 40 and sweep.run_progress(fresh) is None
    capsys.readouterr()
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "toy-s0: finished (step 40), skipped",
        f"toy-s1: start: mtrl baseline --config {preset} seed=1 run.dir={fresh.run_dir} log.progress=false "
        "train.torch_threads=1",
    ]
    # A train sweep over the same directories does not mistake the baseline run for one of its own.
    write_spec(path, presets=[str(preset)], seeds=[0, 1])
    assert main(["sweep", str(path)]) == 2
    assert "is not the config of an `mtrl train` run" in capsys.readouterr().err


def test_metrics_tail_reads_appends_and_follows_a_rewrite(tmp_path):
    path = tmp_path / METRICS_FILE
    rec = [
        {"step": 20, "kind": "train"},
        {"step": 40, "kind": "eval", "eval/mean_success": 0.5},
        {"step": 60, "kind": "eval", "eval/mean_success": 0.25},
    ]
    tail = sweep.MetricsTail(tmp_path).update()
    assert (tail.step, tail.final_success, tail.best_success) == (0, None, None)
    path.write_text(json.dumps(rec[0]) + "\n" + json.dumps(rec[1]) + "\n" + json.dumps(rec[2])[:10])
    tail.update()
    assert (tail.step, tail.final_success, tail.best_success) == (40, 0.5, 0.5)  # the cut line waits
    path.write_text(path.read_text()[:-10] + json.dumps(rec[2]) + "\n")
    tail.update()
    assert (tail.step, tail.final_success, tail.best_success) == (60, 0.25, 0.5)
    # A resume rewrites the file without what came after its checkpoint: read it again from the start.
    tmp = tmp_path / "new"
    tmp.write_text(json.dumps(rec[0]) + "\n" + json.dumps({**rec[1], "eval/mean_success": 0.1}) + "\n")
    tmp.replace(path)
    tail.update()
    assert (tail.step, tail.final_success, tail.best_success) == (40, 0.1, 0.1)


def test_a_second_driver_on_the_same_root_refuses_until_the_first_is_gone(tmp_path, capsys, monkeypatch):
    """ROOT/sweep.lock names the driver's pid: a live one refuses a second driver, a gone one is taken over."""
    preset = write_preset(tmp_path / "toy.yaml", "train.total_steps=40", "checkpoint.every=40", "eval.every=40")
    path = write_spec(tmp_path / "spec.yaml", presets=[str(preset)])
    (trial,) = sweep.expand(sweep.load_spec(path))
    assert Trainer(trial.config, trial.run_dir).train() == 0  # finished: a sweep that runs needs no Ray
    lock = tmp_path / "sweep" / sweep.LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{holder.pid} {socket.gethostname()}\n")
        before = _tree(tmp_path)
        capsys.readouterr()
        assert main(["sweep", str(path)]) == 2
        assert capsys.readouterr().err == (
            f"mtrl: error: {tmp_path / 'sweep'} is in use by another `mtrl sweep` (pid {holder.pid}); wait for it "
            "to end or stop it\n"
        )
        assert _tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["sweep", str(path)]) == 0  # its driver is gone: the lock is taken over
    assert "1 finished already" in capsys.readouterr().err
    assert not lock.exists() and (tmp_path / "sweep" / "summary.md").is_file()


def test_the_summary_keeps_every_attempt_of_every_run(tmp_path, capsys, monkeypatch):
    """A re-run that skips every trial rewrites summary.md with the attempts of the runs before it."""
    preset = write_preset(tmp_path / "toy.yaml", "train.total_steps=40", "checkpoint.every=40", "eval.every=40")
    path = write_spec(tmp_path / "spec.yaml", presets=[str(preset)])
    (trial,) = sweep.expand(sweep.load_spec(path))
    # The Ray task's body, run here: one attempt of a run of the sweep called `earlier`.
    result = sweep.run_attempt(sweep.TrialJob.of(trial, "earlier", num_gpus=0))
    assert (result.status, result.attempt) == ("finished", 1)
    host = socket.gethostname()
    line = re.compile(rf"  - earlier attempt 1: start on {re.escape(host)}; exited at step 40 after \d+\.\ds\n")
    for _ in range(2):
        assert main(["sweep", str(path)]) == 0
        md = (tmp_path / "sweep" / "summary.md").read_text()
        assert f"| {trial.name} | skipped | 0 | 40/40 |" in md
        assert line.search(md.split("## Attempts")[1]), md
        (row,) = json.loads((tmp_path / "sweep" / "summary.json").read_text())["trials"]
        assert [(a["sweep"], a["attempt"], a["how"], a["code"], a["step"]) for a in row["history"]] == [
            ("earlier", 1, "start", 0, 40)
        ]


# ----- on Ray ---------------------------------------------------------------------------------
class Killer(threading.Thread):
    """SIGKILLs a trial's training process `times` times: first once its first checkpoint exists, then
    every new attempt as soon as it has started. Records (pid, latest checkpoint step) per kill."""

    def __init__(self, run_dir: Path, times: int):
        super().__init__(daemon=True)
        self.run_dir, self.times = run_dir, times
        self.kills: list[tuple[int, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pid_file = self.run_dir / sweep.PID_FILE
        while len(self.kills) < self.times and not self.stop.is_set():
            try:
                pid = int(pid_file.read_text())
            except (FileNotFoundError, ValueError):
                pid = None
            ready = self.kills or ckpt.latest_checkpoint(self.run_dir) is not None
            if pid is not None and ready and pid not in [k[0] for k in self.kills]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return  # it ended by itself: the test's checks say so
                with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):  # gone before counting
                    psutil.Process(pid).wait(10)
                self.kills.append((pid, ckpt.checkpoint_step(ckpt.latest_checkpoint(self.run_dir))))
            time.sleep(0.005)


def _alive_children() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


@pytest.fixture
def reaped():
    """Every process the test starts (Ray's included) is gone at the end."""
    yield
    deadline = time.monotonic() + 20
    while (left := _alive_children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [proc.pid for proc in left]


def _steps(run_dir: Path) -> tuple[list[int], list[int]]:
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"], [r["step"] for r in records if r["kind"] == "eval"]


def _events(run_dir: Path) -> list[tuple]:
    return [(e["event"], e.get("code", e.get("step"))) for e in sweep.read_events(run_dir)]


TOTAL = 120  # toy episodes are 20 steps; checkpoints every 40 fall on episode boundaries
TRAIN_STEPS, EVAL_STEPS = list(range(20, TOTAL + 1, 20)), [60, 120]


@pytest.mark.slow  # a minute of local Ray on a quiet 2-core machine: .ci/run runs it after the default suite
def test_sweep_on_ray_retries_resumes_and_skips(tmp_path, capsys, monkeypatch, reaped):
    preset = write_preset(tmp_path / "toy.yaml", f"train.total_steps={TOTAL}", "checkpoint.every=40", "eval.every=60")
    spec_path = write_spec(
        tmp_path / "spec.yaml",
        presets=[str(preset)],
        grid={"agent.tau": [0.005, 0.01]},
        seeds=[0, 1],
        resources={"num_cpus": 1},
        max_retries=1,
    )
    trials = sweep.expand(sweep.load_spec(spec_path))
    names = [t.name for t in trials]
    assert names == [f"toy-agent.tau={tau}-s{seed}" for tau in (0.005, 0.01) for seed in (0, 1)]
    root = tmp_path / "sweep"
    once, twice = trials[0], trials[3]  # `once` is killed once and retried; `twice` runs out of retries
    killers = [Killer(once.run_dir, 1), Killer(twice.run_dir, 2)]
    for k in killers:
        k.start()
    argv = ["sweep", str(spec_path), "--num-cpus", "2", "--status-every", "1"]
    start = time.monotonic()
    try:
        code = main(argv)
    finally:
        for k in killers:
            k.stop.set()
            k.join()
    first_run = time.monotonic() - start
    out, err = capsys.readouterr()
    assert code == 1, err
    assert [len(k.kills) for k in killers] == [1, 2]

    # Killed once: Ray's retry resumed it from its checkpoint; every metrics step is there exactly once.
    resumed_at = killers[0].kills[0][1]
    assert resumed_at > 0
    assert _events(once.run_dir) == [("start", 0), ("exit", -9), ("resume", resumed_at), ("exit", 0)]
    assert _steps(once.run_dir) == (TRAIN_STEPS, EVAL_STEPS)
    assert f"[{once.name}] attempt 1 was killed by SIGKILL; Ray retries it from its last checkpoint" in err
    assert f"[{once.name}] resumed from step {resumed_at} (attempt 2, pid " in err
    assert re.search(rf"\[{re.escape(once.name)}\] finished: {TOTAL} steps, eval success \d\.\d{{3}}", err)
    assert re.search(rf"\] step \d+/{TOTAL}, ", err), "no periodic status line"
    assert f"[{once.name}] waiting (retry 1), will resume from step {resumed_at}" in err
    assert "\x1b[" not in out + err  # Ray prints no coloured traceback of the retried attempt
    # Killed on both attempts: failed, with its progress kept for the next run.
    failed_at = killers[1].kills[1][1]
    assert _events(twice.run_dir) == [("start", 0), ("exit", -9), ("resume", killers[1].kills[0][1]), ("exit", -9)]
    assert f"[{twice.name}] attempt 2 was killed by SIGKILL; no retries left" in err
    assert f"[{twice.name}] failed: attempt 2 was killed by SIGKILL at step {failed_at}; see " in err

    summary = json.loads((root / "summary.json").read_text())
    rows = {r["trial"]: r for r in summary["trials"]}
    assert list(rows) == names
    assert {n: (r["status"], r["attempts"], r["steps"]) for n, r in rows.items()} == {
        names[0]: ("finished", 2, TOTAL),
        names[1]: ("finished", 1, TOTAL),
        names[2]: ("finished", 1, TOTAL),
        names[3]: ("failed", 2, failed_at),
    }
    metrics = [json.loads(line) for line in (once.run_dir / METRICS_FILE).read_text().splitlines()]
    evals = [r["eval/mean_success"] for r in metrics if r["kind"] == "eval"]
    assert (rows[names[0]]["final_success"], rows[names[0]]["best_success"]) == (evals[-1], max(evals))
    assert 0 < rows[names[0]]["wall_seconds"] < first_run
    md = (root / "summary.md").read_text()
    assert md in out
    assert f"| {names[3]} | failed | 2 | {failed_at}/{TOTAL} | " in md
    assert f"- `{names[3]}`: attempt 2 was killed by SIGKILL at step {failed_at}; see " in md

    # Second run: the finished trials are skipped, the failed one resumes from its checkpoint.
    untouched = {t.name: _tree(t.run_dir) for t in trials[:3]}
    assert main(argv) == 0
    _, err = capsys.readouterr()
    assert "3 finished already, 1 to resume, 0 to start" in err
    assert _events(twice.run_dir)[-2:] == [("resume", failed_at), ("exit", 0)]
    assert _steps(twice.run_dir) == (TRAIN_STEPS, EVAL_STEPS)
    assert {t.name: _tree(t.run_dir) for t in trials[:3]} == untouched
    rows = {r["trial"]: r for r in json.loads((root / "summary.json").read_text())["trials"]}
    assert [r["status"] for r in rows.values()] == ["skipped", "skipped", "skipped", "finished"]

    # Third run: all finished, nothing to start: Ray is not even imported.
    everything = _tree(root)
    monkeypatch.setitem(sys.modules, "ray", None)
    start = time.monotonic()
    assert main(argv) == 0
    assert time.monotonic() - start < 10
    assert "4 finished already, 0 to resume, 0 to start" in capsys.readouterr().err
    assert {k: v for k, v in _tree(root).items() if not k.startswith("summary.")} == {
        k: v for k, v in everything.items() if not k.startswith("summary.")
    }
    # The summary of a run that skipped everything still tells how each trial got there.
    history = (root / "summary.md").read_text().split("## Attempts")[1]
    host = re.escape(socket.gethostname())
    assert re.search(rf"attempt 1: start on {host}; was killed by SIGKILL at step {resumed_at} after ", history)
    assert re.search(rf"attempt 2: resume from step {resumed_at} on {host}; exited at step {TOTAL} after ", history)


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_running_trials_and_a_rerun_resumes_them(tmp_path):
    preset = write_preset(tmp_path / "toy.yaml", "train.total_steps=1000", "checkpoint.every=40", "eval.every=500")
    spec_path = write_spec(tmp_path / "spec.yaml", presets=[str(preset)], resources={"num_cpus": 1})
    (trial,) = sweep.expand(sweep.load_spec(spec_path))
    argv = [sys.executable, "-m", "mtrl", "sweep", str(spec_path), "--num-cpus", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with (tmp_path / "driver.err").open("w") as stderr:
        # Its own session, like a shell's foreground job: Ctrl-C reaches the driver and Ray's processes.
        driver = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    deadline = time.monotonic() + 120
    while ckpt.latest_checkpoint(trial.run_dir) is None:
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.05)
    started = psutil.Process(driver.pid).children(recursive=True)
    os.killpg(driver.pid, signal.SIGINT)
    assert driver.wait(120) == 130, (tmp_path / "driver.err").read_text()
    assert "Token authentication" not in (tmp_path / "driver.err").read_text()  # the local Ray asks for it
    # Each running trial's training process got SIGTERM from its task and saved a checkpoint on the way out.
    log = (trial.run_dir / sweep.TRAIN_LOG).read_text()
    stopped = int(re.search(r"SIGTERM at step (\d+): checkpoint saved", log).group(1))
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(trial.run_dir)) == stopped
    assert sweep.read_events(trial.run_dir)[-1]["code"] == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [(r["status"], r["steps"]) for r in summary["trials"]] == [("interrupted", stopped)]
    _, alive = psutil.wait_procs(started, timeout=20)
    assert not alive, [p.pid for p in alive]

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"[{trial.name}] resumed from step {stopped} (attempt 1" in rerun.stderr
    assert _steps(trial.run_dir) == (list(range(20, 1001, 20)), [500, 1000])


@pytest.mark.slow
def test_a_trial_larger_than_the_local_ray_fails_at_the_start(tmp_path, capsys, reaped, monkeypatch):
    write_preset(tmp_path / "toy.yaml")
    path = write_spec(tmp_path / "spec.yaml", presets=[str(tmp_path / "toy.yaml")], resources={"num_gpus": 1})
    assert main(["sweep", str(path), "--num-cpus", "1", "--num-gpus", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mtrl: error: resources: a trial needs num_cpus=1 and num_gpus=1, the Ray cluster has CPU 1 and GPU 0; "
        "lower resources in the spec or pass --num-cpus / --num-gpus"
    )
    assert not (tmp_path / "sweep").exists()
