"""Resident memory stays flat over many evaluations: the evaluation envs are built once and reused.

Re-creating evaluation envs at every evaluation is how the older systems grew until they ran out of
memory. RSS is measured with psutil after warm-up and again after hundreds of evaluations; a
control run that leaks 64 KiB per evaluation shows the measurement catches a leak that small.
"""

from __future__ import annotations

import gc

import numpy as np
import psutil
import pytest
from tqdm import tqdm

import mtrl.trainer
from mtrl.trainer import Trainer
from tests.conftest import toy_config

WARMUP, EVALUATIONS = 30, 300
TOLERANCE = 6 * 2**20  # bytes of growth allowed over EVALUATIONS evaluations
LEAK = 64 * 2**10  # per evaluation in the control: 300 x 64 KiB = 18.75 MiB


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _growth_over_evaluations(trainer: Trainer, leak: int = 0, evaluations: int = EVALUATIONS) -> int:
    bar = tqdm(disable=True)
    leaked = []
    for _ in range(WARMUP):
        trainer._evaluate(bar)
    before = _rss()
    for _ in range(evaluations):
        trainer._evaluate(bar)
        if leak:
            leaked.append(np.ones(leak, dtype=np.uint8))  # touched, so resident
    return _rss() - before


@pytest.fixture
def counted_make_envs(monkeypatch) -> list:
    calls = []
    original = mtrl.trainer.make_envs

    def make_envs(*args, **kwargs):
        calls.append(kwargs.get("evaluation", args[2] if len(args) > 2 else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(mtrl.trainer, "make_envs", make_envs)
    return calls


def test_evaluations_reuse_their_envs_and_resident_memory_stays_flat(tmp_path, counted_make_envs):
    trainer = Trainer(toy_config(tmp_path / "run", "eval.episodes=3"), tmp_path / "run")
    eval_envs = trainer.eval_envs
    assert counted_make_envs == [False, True]  # one training and one evaluation vector env, at start-up
    growth = _growth_over_evaluations(trainer)
    assert counted_make_envs == [False, True] and trainer.eval_envs is eval_envs
    print(f"\nRSS growth over {EVALUATIONS} evaluations: {growth / 2**20:.2f} MiB (tolerance {TOLERANCE / 2**20} MiB)")
    assert growth < TOLERANCE
    # The evaluations really ran: one metrics record each, and the goal sweep moved on.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == WARMUP + EVALUATIONS


def test_the_memory_measurement_catches_a_small_leak(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run", "eval.episodes=3"), tmp_path / "run")
    growth = _growth_over_evaluations(trainer, leak=LEAK)
    assert growth > TOLERANCE
    assert growth == pytest.approx(EVALUATIONS * LEAK, rel=0.3)


def test_resident_memory_stays_flat_over_a_training_run_with_frequent_evaluations(tmp_path, monkeypatch):
    """The whole loop (collect, update, evaluate, log, checkpoint), sampled at every evaluation."""
    run = tmp_path / "run"
    cfg = toy_config(run, "train.total_steps=500", "eval.every=5", "eval.episodes=2", "checkpoint.every=100")
    trainer = Trainer(cfg, run)
    samples = []
    original = mtrl.trainer.evaluate

    def evaluate(*args, **kwargs):
        samples.append(psutil.Process().memory_info().rss)
        return original(*args, **kwargs)

    monkeypatch.setattr(mtrl.trainer, "evaluate", evaluate)
    assert trainer.train() == 0
    assert len(samples) == 100
    growth = int(np.median(samples[-20:]) - np.median(samples[10:30]))
    print(f"\nRSS growth over 400 training steps and 80 evaluations: {growth / 2**20:.2f} MiB")
    assert growth < TOLERANCE


@pytest.mark.metaworld
def test_metaworld_evaluations_reuse_their_envs_and_resident_memory_stays_flat(tmp_path, counted_make_envs):
    run = tmp_path / "run"
    cfg = toy_config(run, "env.benchmark=MT1", "env.tasks=[reach-v3]", "env.max_episode_steps=30", "eval.episodes=2")
    trainer = Trainer(cfg, run)
    growth = _growth_over_evaluations(trainer, evaluations=100)
    assert counted_make_envs == [False, True]
    print(f"\nRSS growth over 100 Meta-World evaluations: {growth / 2**20:.2f} MiB")
    assert growth < TOLERANCE
