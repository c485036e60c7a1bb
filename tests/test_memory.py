"""Resident memory stays flat over many evaluations: the evaluation envs are built once and reused.

Re-creating evaluation envs at every evaluation is how the older systems grew until they ran out of
memory. Each measurement runs in a fresh interpreter (this file run as a script): in the test
process, memory freed by earlier tests would absorb growth and hide a leak. RSS is read with psutil
after warm-up and again after hundreds of evaluations; a control that leaks 64 KiB per evaluation
shows that the measurement catches a leak that small. The control runs in the same interpreter,
right after the clean measurement: that one frees nothing the leak could reuse (it does not grow),
and coming second, the leak cannot inflate it.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
WARMUP, EVALUATIONS = 30, 300
TOLERANCE = 6 * 2**20  # bytes of growth allowed
LEAK = 64 * 2**10  # per evaluation in the control: 300 x 64 KiB = 18.75 MiB


# ----- measurements, each in its own process --------------------------------------------------
def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _measure(mode: str, run: Path) -> dict:
    from tqdm import tqdm

    import mtrl.build
    from mtrl.trainer import Callback, Trainer
    from tests.conftest import toy_config

    made = []
    make_backend = mtrl.build.make_backend

    def counted_make_backend(cfg, seed, evaluation, **kwargs):
        made.append(evaluation)
        return make_backend(cfg, seed, evaluation, **kwargs)

    mtrl.build.make_backend = counted_make_backend
    if mode == "training":
        # The whole loop (collect, update, evaluate, log, checkpoint), sampled at every evaluation.
        cfg = toy_config(run, "train.total_steps=300", "eval.every=3", "eval.episodes=1", "checkpoint.every=100")
        samples = []

        class SampleMemory(Callback):
            def on_eval(self, trainer, result):
                samples.append(psutil.Process().memory_info().rss)

        assert Trainer(cfg, run, callbacks=[SampleMemory()]).train() == 0
        growth = int(np.median(samples[-20:]) - np.median(samples[10:30]))
        return {"growth": growth, "evaluations": len(samples), "make_envs": made}

    # One short episode per task: each evaluation still runs the whole evaluation path (reset, steps to the
    # time limit, the record), at a fraction of the cost; what is measured is the envs' reuse, not the episodes.
    overrides = ["eval.episodes=1", "env.max_episode_steps=5"]
    evaluations, phases = EVALUATIONS, ("clean", "leak")
    if mode == "metaworld":
        # rebuilding Meta-World envs would leak megabytes per evaluation: fewer evaluations show it
        overrides = ["env.benchmark=MT1", "env.tasks=[reach-v3]", "env.max_episode_steps=10", "eval.episodes=1"]
        evaluations, phases = 50, ("clean",)
    trainer = Trainer(toy_config(run, *overrides), run)
    eval_envs = trainer.parts.evaluator.backend
    bar = tqdm(disable=True)
    leaked = []
    for _ in range(WARMUP):
        trainer.evaluate(bar)
    growth = {}
    for phase in phases:
        before = _rss()
        for _ in range(evaluations):
            trainer.evaluate(bar)
            if phase == "leak":
                leaked.append(np.ones(LEAK, dtype=np.uint8))  # touched, so resident
        growth[phase] = _rss() - before
    records = len((run / "metrics.jsonl").read_text().splitlines())
    return {
        "growth": growth["clean"],
        "leak_growth": growth.get("leak"),
        "evaluations": records,
        "make_envs": made,
        "same_eval_envs": trainer.parts.evaluator.backend is eval_envs,
    }


def measure(mode: str, tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(tmp_path / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    leak = "" if result.get("leak_growth") is None else f", {result['leak_growth'] / 2**20:.2f} MiB with the leak"
    print(f"\n{mode}: RSS growth {result['growth'] / 2**20:.2f} MiB{leak} ({result['evaluations']} evaluations)")
    return result


# ----- tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> dict:
    """Warm-up, then the clean measurement, then the leaking control, in one fresh interpreter."""
    return measure("evaluations", tmp_path_factory.mktemp("evaluations"))


def test_evaluations_reuse_their_envs_and_resident_memory_stays_flat(evaluations):
    result = evaluations
    assert result["make_envs"] == [False, True]  # one training and one evaluation vector env, at start-up
    assert result["same_eval_envs"]
    assert result["evaluations"] == WARMUP + 2 * EVALUATIONS  # one metrics record each: they all ran
    assert result["growth"] < TOLERANCE


def test_the_memory_measurement_catches_a_small_leak(evaluations):
    assert evaluations["leak_growth"] > TOLERANCE
    assert evaluations["leak_growth"] == pytest.approx(EVALUATIONS * LEAK, rel=0.25)


def test_resident_memory_stays_flat_over_a_training_run_with_frequent_evaluations(tmp_path):
    result = measure("training", tmp_path)
    assert result["make_envs"] == [False, True] and result["evaluations"] == 100
    assert result["growth"] < TOLERANCE


@pytest.mark.metaworld
@pytest.mark.slow  # the trainer's reuse of its evaluation envs does not depend on the benchmark: the toy tests above
def test_metaworld_evaluations_reuse_their_envs_and_resident_memory_stays_flat(tmp_path):
    result = measure("metaworld", tmp_path)
    assert result["make_envs"] == [False, True] and result["same_eval_envs"]
    assert result["growth"] < TOLERANCE


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1], Path(sys.argv[2]))))
