"""RunState on its own: reading checkpoints, what a restore hands back, its refusals, the actor alone
(tests/test_trainer.py resumes whole runs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mtrl import checkpoint as ckpt
from mtrl import runstate
from mtrl.build import build
from mtrl.config import Config, ConfigError
from mtrl.runstate import RunState
from mtrl.trainer import Trainer
from tests.conftest import toy_config

STEPS, WARMUP = 60, 40  # checkpoints and evaluations every 20 steps: the last checkpoint holds updates
# Tight log-std bounds, so that the policy's clamp acts on both sides.
OVERRIDES = [f"train.total_steps={STEPS}", "checkpoint.every=20", "eval.every=20"]
OVERRIDES += ["agent.log_std_min=-0.05", "agent.log_std_max=0.05"]


def _config(run: Path, *overrides: str) -> Config:
    return toy_config(run, *OVERRIDES, *overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runstate") / "run"
    assert Trainer(_config(run_dir), run_dir).train() == 0
    return run_dir


def test_load_reads_the_latest_checkpoint_onto_the_cpu_or_where_asked(run, tmp_path):
    latest = ckpt.latest_checkpoint(run)
    state = runstate.load(run)
    assert state.source == latest and state.progress.counters.env_steps == STEPS
    assert {t.device.type for t in state.agent.values()} == {"cpu"}
    assert runstate.load_latest(run).source == latest
    # torch's "meta" device (shapes, no data) shows where tensors go without a GPU; the pending train
    # statistics, read back into numpy, need data: a checkpoint taken before the first episode ended has none
    saved = ckpt.load(latest)
    saved["train_stats"] = {}
    torch.save(saved, tmp_path / "no_stats.pt")
    on_meta = runstate.load(tmp_path / "no_stats.pt", map_location="meta")
    assert on_meta.source == tmp_path / "no_stats.pt"
    assert {t.device.type for t in on_meta.agent.values()} == {"meta"}


def test_a_restore_hands_back_a_copy_of_the_progress(run):
    saved = runstate.load_latest(run)
    cfg = _config(run, f"train.total_steps={STEPS + 20}")
    progress = saved.restore(cfg, build(cfg))
    assert progress.counters == saved.progress.counters and progress.last_eval == saved.progress.last_eval
    assert progress.learning_starts == STEPS + WARMUP  # no buffer saved: warm up again
    progress.counters.env_steps += 1
    progress.train_stats.clear()
    assert saved.progress.counters.env_steps == STEPS and saved.progress.train_stats  # a second restore starts alike


def test_learning_starts_and_the_pending_log_values_are_read_back_and_required(run):
    state = ckpt.load(run)
    state["learning_starts"] = 77
    assert RunState.from_dict(state).progress.learning_starts == 77
    for key in ("learning_starts", "train_stats", "update_metrics"):
        incomplete = {k: v for k, v in state.items() if k != key}
        with pytest.raises(ckpt.CheckpointError) as err:
            RunState.from_dict(incomplete, source=Path("old.pt"))
        assert str(err.value) == f"old.pt is not a complete mtrl checkpoint (KeyError: '{key}')"


def test_a_checkpoint_taken_before_any_evaluation_has_no_last_evaluation(run):
    state = ckpt.load(run)
    assert RunState.from_dict(state).progress.last_eval is not None
    state["last_eval"] = None
    assert RunState.from_dict(state).progress.last_eval is None


def test_a_checkpoint_without_a_usable_config_is_refused_in_one_line(run):
    state = ckpt.load(run)
    del state["config"]
    with pytest.raises(ckpt.CheckpointError, match="^checkpoint holds no usable config: 'config'$"):
        RunState.from_dict(state)


def test_an_incomplete_checkpoint_is_refused_naming_what_is_wrong(run):
    state = ckpt.load(run)
    del state["agent"]
    with pytest.raises(ckpt.CheckpointError) as err:
        RunState.from_dict(state, source=Path("old.pt"))
    assert str(err.value) == "old.pt is not a complete mtrl checkpoint (KeyError: 'agent')"


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
    cfg = _config(run, override)
    with pytest.raises(error) as err:
        saved.check(cfg, build(cfg))
    assert str(err.value) == message.format(src=saved.source)


def test_a_resume_at_exactly_total_steps_is_accepted(run):
    saved = runstate.load_latest(run)
    cfg = _config(run)
    saved.check(cfg, build(cfg))


def test_the_actor_alone_acts_like_the_agents_actor_on_the_device_asked_for(run):
    saved = runstate.load_latest(run)
    cfg = _config(run)
    parts = build(cfg)
    saved.restore(cfg, parts)
    actor = saved.actor(torch.device("cpu"))
    obs = 10 * torch.randn(3, 64, parts.obs_dim, generator=torch.Generator().manual_seed(0))
    (mean, log_std), (agent_mean, agent_log_std) = actor(obs), parts.agent.actor(obs)
    assert torch.equal(mean, agent_mean) and torch.equal(log_std, agent_log_std)
    assert (log_std.min().item(), log_std.max().item()) == pytest.approx((-0.05, 0.05))  # clamped on both sides
    assert {p.device.type for p in saved.actor(torch.device("meta")).parameters()} == {"meta"}


def test_actor_weights_of_other_dimensions_are_refused_with_the_first_line_of_torchs_reason(run):
    saved = runstate.load_latest(run)
    other = dataclasses.replace(saved, dims={**saved.dims, "obs": saved.dims["obs"] + 1})
    with pytest.raises(ckpt.CheckpointError) as err:
        other.actor(torch.device("cpu"))
    message = str(err.value)
    assert message.startswith("actor weights do not match the checkpoint's config: Error(s) in loading state_dict")
    assert "\n" not in message
