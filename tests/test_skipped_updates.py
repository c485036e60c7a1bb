"""A skipped update leaves every combiner's state as it was, "no warm start yet" included.

Nash-MTL is the one combiner with state (its warm start): a first update whose Gramian is not
finite, or the first update after resuming from a checkpoint taken before any update, must not
leave a NaN warm start behind (every later solve would start from it, every update be skipped and
the run stop). The faults are written through the update's `on_target` hook into the Bellman
targets, so the critic's Gramian is not finite while the actor's is.
"""

from __future__ import annotations

import pytest
import torch

from mtrl import checkpoint as ckpt
from mtrl.callbacks import Callback
from mtrl.combiners import make_combiner
from mtrl.compiled import CompiledUpdate
from mtrl.optim import Optimization
from mtrl.sac import SACUpdate, UpdateHook
from mtrl.trainer import Trainer
from tests.conftest import toy_config
from tests.test_sac import make_agent, make_batch
from tests.test_sac_update import build, run

MODES = pytest.mark.parametrize("device_steps", [False, True], ids=["eager", "device_steps"])


def gradients(k: int, seed: int) -> torch.Tensor:
    return torch.randn(k, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class PoisonTargets(UpdateHook):
    """Writes NaN into one Bellman target of the updates numbered in `poisoned` (0: the first seen)."""

    def __init__(self, poisoned: set[int]) -> None:
        self.poisoned, self.seen = poisoned, 0

    def on_target(self, target: torch.Tensor) -> None:
        if self.seen in self.poisoned:
            target[0, 0] = torch.nan
        self.seen += 1


def test_a_non_finite_first_call_leaves_no_warm_start():
    combiner, fresh = make_combiner("nashmtl"), make_combiner("nashmtl")
    poisoned = gradients(5, 0)
    poisoned[1, 2] = torch.nan
    assert not torch.isfinite(combiner(poisoned)).all()
    assert combiner.state_dict() == {}
    assert torch.equal(combiner(gradients(5, 1)), fresh(gradients(5, 1)))


@pytest.mark.parametrize("saved", [{}, {"warm_start": torch.full((5,), torch.nan, dtype=torch.float64)}])
def test_a_restored_state_without_a_finite_warm_start_starts_cold_after_a_bad_call(saved):
    # {}: a checkpoint taken before the first update; a NaN warm start: one saved by older versions.
    combiner, fresh = make_combiner("nashmtl"), make_combiner("nashmtl")
    combiner.load_state_dict(saved)
    poisoned = gradients(5, 0)
    poisoned[0, 0] = torch.inf
    combiner(poisoned)
    assert combiner.state_dict() == {}
    assert torch.equal(combiner(gradients(5, 1)), fresh(gradients(5, 1)))


@MODES
@pytest.mark.parametrize("skipped", [0, 1], ids=["first-update", "later-update"])
def test_a_skipped_update_leaves_the_combiner_state_as_it_was(device_steps, skipped):
    # The critic's Gramian is NaN, the actor's finite: the actor's solve must not move the warm start
    # either, since the update as a whole is skipped.
    batches = [make_batch(seed) for seed in range(skipped + 1)]
    update = build(make_agent("multihead"), "nashmtl", device_steps, hooks=[PoisonTargets({skipped})])
    assert [r.finite for r in run(update, batches)] == [True] * skipped + [False]
    reference = build(make_agent("multihead"), "nashmtl", device_steps)
    run(reference, batches[:skipped])
    after, expected = update.combiner.state_dict(), reference.combiner.state_dict()
    assert after.keys() == expected.keys() == ({"warm_start"} if skipped else set())
    if skipped:
        assert torch.equal(after["warm_start"], expected["warm_start"])


def learner(combiner: str, optimizer: str, device_steps: bool, hooks=()) -> SACUpdate | CompiledUpdate:
    agent = make_agent("multihead")
    optimization = Optimization(agent.params, optimizer, agent.learning_rates, agent.num_tasks)
    update = SACUpdate(agent, optimization, make_combiner(combiner), hooks=hooks)
    return CompiledUpdate(update) if device_steps else update


def everything(update: SACUpdate) -> dict:
    """Weights, optimizer state (moments and step counts) and combiner state."""
    return {
        "agent": update.agent.state_dict(),
        "optimizers": update.optimization.state_dict(),
        "combiner": update.combiner.state_dict(),
    }


def assert_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@MODES
@pytest.mark.parametrize(
    ("combiner", "optimizer"), [("nashmtl", "adam"), ("pcgrad", "adam"), ("sdmgrad_os", "adam"), ("mean", "adatask")]
)
def test_after_a_skipped_first_update_the_learner_goes_on_as_if_it_had_not_been_tried(
    device_steps, combiner, optimizer
):
    skipping = learner(combiner, optimizer, device_steps, hooks=[PoisonTargets({0})])
    assert [r.finite for r in run(skipping, [make_batch(0)])] == [False]
    assert [r.finite for r in run(skipping, [make_batch(1)])] == [True]  # the same generators' seeds again
    reference = learner(combiner, optimizer, device_steps)
    run(reference, [make_batch(1)])
    assert_equal(everything(skipping), everything(reference))


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer: Trainer) -> bool | None:
        return trainer.counters.env_steps != self.step


OVERRIDES = (
    "combiner.name=nashmtl",
    "train.total_steps=60",
    "eval.every=0",
    "train.max_bad_updates=3",
    "checkpoint.save_buffer=true",  # a resume then updates at once, as the run would have
)


def test_a_bad_first_update_does_not_stall_the_run_nor_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer(toy_config(run_dir, *OVERRIDES), run_dir)
    trainer.learner.hooks.append(PoisonTargets({0}))
    assert trainer.train() == 0
    assert (trainer.counters.bad_updates, trainer.counters.updates) == (1, 20)
    saved = ckpt.load(ckpt.latest_checkpoint(run_dir))["combiner"]["warm_start"]
    assert torch.isfinite(saved).all()


def test_a_bad_first_update_after_resuming_before_any_update_does_not_stall(tmp_path):
    run_dir = tmp_path / "run"
    cfg = toy_config(run_dir, *OVERRIDES)
    assert Trainer(cfg, run_dir, callbacks=[StopAt(39)]).train() == 0  # the warm-up ends at 40
    assert ckpt.load(ckpt.latest_checkpoint(run_dir))["combiner"] == {}
    resumed = Trainer.resume(run_dir)
    resumed.learner.hooks.append(PoisonTargets({0}))
    assert resumed.train() == 0
    assert (resumed.counters.bad_updates, resumed.counters.updates) == (1, 20)
    assert torch.isfinite(ckpt.load(ckpt.latest_checkpoint(run_dir))["combiner"]["warm_start"]).all()
