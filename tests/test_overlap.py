"""`train.overlap`: the envs step while the updates run; the same updates, one transition less in reach.

Without overlap, vector step t is collected and then updated on with a replay that holds it. With
overlap, the updates of step t run while step t is in flight, so they sample the transitions up
to t - 1. Everything else is the same: the same steps update, the same count of updates, the
same random draws in the same order, hence same-seed determinism and exact resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtrl import checkpoint as ckpt
from mtrl.callbacks import Callback
from mtrl.config import ConfigError
from mtrl.rundir import METRICS_FILE
from mtrl.trainer import Trainer
from tests.conftest import toy_config

WARMUP = 40  # the toy config's


def _metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


class ReplayAtUpdates(Callback):
    """(vector steps counted, transitions stored) at every update, and the phases in order."""

    def __init__(self):
        self.seen: list[tuple[int, int]] = []
        self.phases: list[tuple[str, bool]] = []

    def on_update(self, trainer, result):
        self.seen.append((trainer.counters.env_steps, trainer.buffer.size))

    def on_phase(self, phase, entering):
        if phase in ("collect", "update"):
            self.phases.append((phase, entering))


def _run(run: Path, *overrides: str, callbacks=()) -> Trainer:
    trainer = Trainer(toy_config(run, *overrides), run, callbacks=callbacks)
    assert trainer.train() == 0
    return trainer


@pytest.fixture(scope="module")
def overlapped_run(tmp_path_factory) -> tuple[Trainer, ReplayAtUpdates]:
    """One finished overlapped run of the toy config (its buffer in the checkpoints), and what it recorded."""
    replay = ReplayAtUpdates()
    run = tmp_path_factory.mktemp("overlapped") / "run"
    return _run(run, "train.overlap=true", "checkpoint.save_buffer=true", callbacks=[replay]), replay


def test_overlapped_updates_sample_the_replay_without_the_step_in_flight(tmp_path, overlapped_run):
    serial = ReplayAtUpdates()
    a = _run(tmp_path / "serial", callbacks=[serial])
    b, overlapped = overlapped_run
    # the same updates: one per vector step from the end of warm-up on
    assert a.counters.updates == b.counters.updates == 200 - WARMUP + 1
    assert serial.seen[0] == (WARMUP, WARMUP)  # after step WARMUP, which the replay holds
    assert overlapped.seen[0] == (WARMUP - 1, WARMUP - 1)  # while step WARMUP is in flight
    assert all(size == steps for steps, size in serial.seen + overlapped.seen)
    # serially the update follows the step; overlapped it runs inside it
    assert serial.phases[-4:] == [("collect", True), ("collect", False), ("update", True), ("update", False)]
    assert overlapped.phases[-4:] == [("collect", True), ("update", True), ("update", False), ("collect", False)]
    # the warm-up is the same; learning then differs by the transition in flight
    a_records, b_records = _metrics(a.run_dir), _metrics(b.run_dir)
    assert a_records[0] == b_records[0]  # step 20, before any update
    assert a_records != b_records


def test_overlap_is_deterministic_and_does_not_depend_on_where_the_envs_step(tmp_path):
    sync = _run(tmp_path / "sync", "train.overlap=true", "train.total_steps=120")
    again = _run(tmp_path / "again", "train.overlap=true", "train.total_steps=120")
    workers = _run(tmp_path / "async", "train.overlap=true", "train.total_steps=120", "env.vector_strategy=async")
    assert _metrics(sync.run_dir) == _metrics(again.run_dir) == _metrics(workers.run_dir)


def test_overlap_resumes_exactly(tmp_path, overlapped_run):
    full, _ = overlapped_run
    split = tmp_path / "split"
    _run(split, "train.overlap=true", "checkpoint.save_buffer=true", "train.total_steps=100")
    resumed = Trainer.resume(split, ["train.total_steps=200"])
    assert resumed.train() == 0
    assert _metrics(split) == _metrics(full.run_dir)


def test_a_callback_ends_the_run_with_a_checkpoint(tmp_path):
    class StopAt(Callback):
        def on_step(self, trainer):
            return trainer.counters.env_steps < 55

    run = tmp_path / "run"
    trainer = Trainer(toy_config(run), run, callbacks=[StopAt()])
    assert trainer.train() == 0
    assert trainer.counters.env_steps == 55
    assert ckpt.latest_checkpoint(run).name == "step_0000000055.pt"


def test_overlap_needs_two_warm_up_steps(tmp_path):
    with pytest.raises(ConfigError, match="train.overlap needs train.warmup_steps >= 2"):
        toy_config(tmp_path, "train.overlap=true", "train.warmup_steps=1")
