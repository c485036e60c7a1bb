"""RunState on its own: reading checkpoints, what a restore hands back, and its refusals (tests/test_trainer.py
resumes whole runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtrl import checkpoint as ckpt
from mtrl import runstate
from mtrl.build import build
from mtrl.config import ConfigError
from mtrl.runstate import RunState
from mtrl.trainer import Trainer
from tests.conftest import toy_config

STEPS = 60  # a checkpoint every 20 steps, warm-up 40: the last checkpoint holds updates


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runstate") / "run"
    cfg = toy_config(run_dir, f"train.total_steps={STEPS}", "checkpoint.every=20", "eval.every=20")
    assert Trainer(cfg, run_dir).train() == 0
    return run_dir


def test_load_reads_the_latest_checkpoint_onto_the_cpu_or_where_asked(run, tmp_path):
    latest = ckpt.latest_checkpoint(run)
    state = runstate.load(run)
    assert state.source == latest and state.progress.counters.env_steps == STEPS
    assert {t.device.type for t in state.agent.values()} == {"cpu"}
    assert runstate.load_latest(run).source == latest
    # torch's "meta" device (shapes, no data) shows where tensors go without a GPU; the pending train
    # statistics, read back into numpy, need data
    saved = ckpt.load(latest)
    del saved["train_stats"]
    torch.save(saved, tmp_path / "no_stats.pt")
    on_meta = runstate.load(tmp_path / "no_stats.pt", map_location="meta")
    assert on_meta.source == tmp_path / "no_stats.pt"
    assert {t.device.type for t in on_meta.agent.values()} == {"meta"}


def test_a_restore_hands_back_a_copy_of_the_progress(run):
    saved = runstate.load_latest(run)
    cfg = toy_config(run, f"train.total_steps={STEPS + 20}")
    progress = saved.restore(cfg, build(cfg))
    assert progress.counters == saved.progress.counters and progress.last_eval == saved.progress.last_eval
    assert progress.learning_starts == STEPS + 40  # no buffer saved: warm up again
    progress.counters.env_steps += 1
    progress.train_stats.clear()
    assert saved.progress.counters.env_steps == STEPS and saved.progress.train_stats  # a second restore starts alike


def test_a_checkpoint_without_learning_starts_reads_as_learning_from_the_warm_up(run):
    state = ckpt.load(run)
    del state["learning_starts"]
    assert RunState.from_dict(state).progress.learning_starts == 40


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("agent.hidden_sizes=[16,16]", ckpt.CheckpointError, "{src} was saved with another agent or combiner config"),
        ("combiner.name=pcgrad", ckpt.CheckpointError, "{src} was saved with another agent or combiner config"),
        (
            f"train.total_steps={STEPS - 1}",
            ConfigError,
            f"train.total_steps must be >= the step of the checkpoint ({STEPS}), found {STEPS - 1}",
        ),
    ],
    ids=["other networks", "other combiner", "past total_steps"],
)
def test_a_resume_of_another_config_is_refused_in_one_line(run, override, error, message):
    saved = runstate.load_latest(run)
    cfg = toy_config(run, override)
    with pytest.raises(error) as err:
        saved.check(cfg, build(cfg))
    assert str(err.value) == message.format(src=saved.source)


def test_a_resume_at_exactly_total_steps_is_accepted(run):
    saved = runstate.load_latest(run)
    cfg = toy_config(run, f"train.total_steps={STEPS}")
    saved.check(cfg, build(cfg))


def test_the_actor_alone_acts_like_the_agents_actor(run):
    saved = runstate.load_latest(run)
    cfg = toy_config(run)
    parts = build(cfg)
    saved.restore(toy_config(run, f"train.total_steps={STEPS}"), parts)
    actor = saved.actor(torch.device("cpu"))
    obs = torch.randn(3, 1, parts.obs_dim, generator=torch.Generator().manual_seed(0))
    assert torch.equal(actor.deterministic(obs), parts.agent.actor.deterministic(obs))
