"""Numerical faults: a non-finite loss or gradient skips its update and changes nothing.

Faults are injected into real updates of the toy benchmark: NaN rewards, infinite observations,
rewards whose squared error overflows float32, and NaN/inf written straight into a network's
gradient (after the losses, which stay finite). Each bad update must leave every weight, target
weight, temperature and optimizer moment bit for bit as it was, be counted and logged; too many in
a row stop the run with a clear message and a checkpoint of the last good state. Gradient-norm
and Q-target clipping must bound exactly what they claim.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mtrl import checkpoint as ckpt
from mtrl.buffer import Batch
from mtrl.callbacks import Callback
from mtrl.cli import main
from mtrl.rundir import METRICS_FILE
from mtrl.sac import SACUpdate, UpdateHook
from mtrl.trainer import Trainer, TrainingError
from tests.conftest import TOY_OVERRIDES, toy_config

KINDS = (
    "nan reward",
    "inf observation",
    "nan next observation",
    "overflowing reward",  # finite input; (Q - 1e30)^2 overflows float32
    "nan critic gradient",  # finite losses, non-finite gradient
    "inf actor gradient",
)


def corrupt(batch: Batch, kind: str) -> Batch:
    fields = batch._asdict()
    if kind == "nan reward":
        fields["reward"] = batch.reward.clone().index_put_(
            (torch.tensor([0]), torch.tensor([3])), torch.tensor(torch.nan)
        )
    elif kind == "inf observation":
        obs = batch.obs.clone()
        obs[1, 2, 0] = torch.inf
        fields["obs"] = obs
    elif kind == "nan next observation":
        nxt = batch.next_obs.clone()
        nxt[-1, 0, 1] = torch.nan
        fields["next_obs"] = nxt
    elif kind == "overflowing reward":
        fields["reward"] = batch.reward.clone().fill_(1e30)
    return Batch(**fields)


def agent_state(trainer: Trainer) -> dict:
    """Every number an update may write: weights, target weights, temperatures, optimizer state."""
    return copy.deepcopy(
        {
            "agent": trainer.agent.state_dict(),
            "optimizers": trainer.optimization.state_dict(),
        }
    )


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_identical(a, b, where: str = "") -> None:
    """Bit for bit: same structure, dtypes and bytes (NaN-safe)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bytes(a), _bytes(b)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class OnBatch(Callback):
    """Hands each batch sampled for an update to `receive(trainer, batch)`; the update runs on what it returns."""

    def __init__(self, receive: Callable[[Trainer, Batch], Batch]):
        self.receive = receive

    def on_batch(self, trainer: Trainer, batch: Batch) -> Batch:
        return self.receive(trainer, batch)


class FaultInjector(UpdateHook):
    """Corrupts the updates whose index is in `schedule`; checks after each that nothing changed.

    Batches are corrupted as the trainer receives them (`Callback.on_batch`); gradients through the update's
    `on_gradients` hook, after every loss of the update was computed (and found finite).
    """

    POISON = {"nan critic gradient": ("critic", torch.nan), "inf actor gradient": ("actor", torch.inf)}

    def __init__(self, trainer: Trainer, schedule: dict[int, str]):
        self.trainer, self.schedule = trainer, schedule
        self.calls = 0
        self.pending: str | None = None
        self.snapshot: dict | None = None
        self.injected: list[tuple[int, str]] = []  # (env step, kind)
        self.verified = 0
        trainer.callbacks.append(OnBatch(self.receive))
        trainer.learner.hooks.append(self)

    def receive(self, trainer: Trainer, batch: Batch) -> Batch:
        self._verify_previous()
        self.pending = self.schedule.get(self.calls)
        self.calls += 1
        if self.pending is not None:
            self.snapshot = agent_state(trainer)
            self.injected.append((trainer.counters.env_steps, self.pending))
            batch = corrupt(batch, self.pending)
        return batch

    def on_gradients(self, network: str, parameters: list[torch.nn.Parameter]) -> None:
        target = self.POISON.get(self.pending)
        if target is not None and network == target[0]:
            shared = parameters[0]  # the first layer's weight: shared by every task in both variants
            shared.grad.view(-1)[5] = target[1]

    def _verify_previous(self) -> None:
        if self.snapshot is not None:
            assert_identical(agent_state(self.trainer), self.snapshot, self.injected[-1][1])
            for p in self.trainer.agent.parameters():
                assert p.grad is None
            self.verified += 1
            self.snapshot = None

    def finish(self) -> None:
        self._verify_previous()


def _trained(run: Path, *overrides: str) -> Trainer:
    """A trainer past warm-up, with a filled buffer."""
    trainer = Trainer(toy_config(run, "train.total_steps=60", "eval.every=0", *overrides), run)
    assert trainer.train() == 0
    return trainer


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("combiner", ["mean", "pcgrad"])
def test_a_bad_update_writes_nothing_and_a_good_one_does(kind, combiner, tmp_path):
    trainer = _trained(tmp_path / "run", f"combiner.name={combiner}")
    c = trainer.counters
    injector = FaultInjector(trainer, {0: kind})
    before = agent_state(trainer)
    counts = (c.updates, c.bad_updates, c.bad_streak)
    assert trainer.update() is None
    injector.finish()
    assert injector.verified == 1
    assert (c.updates, c.bad_updates, c.bad_streak) == (counts[0], counts[1] + 1, counts[2] + 1)

    metrics = trainer.update()  # the next, clean batch
    assert metrics is not None and (c.updates, c.bad_updates, c.bad_streak) == (counts[0] + 1, counts[1] + 1, 0)
    after = agent_state(trainer)
    with pytest.raises(AssertionError):  # the comparison can fail: a good update does write
        assert_identical(after, before)
    for net, optimizers in after["optimizers"].items():
        for name, opt in optimizers.items():
            steps = {float(c) for s in opt["state"].values() for c in s["step"].reshape(-1)}  # task rows: one each
            assert steps == {float(counts[0] + 1)}, (net, name)  # Adam's step count never saw the bad update


@pytest.mark.parametrize(("combiner", "variant"), [("mean", "conditioned"), ("pcgrad", "multihead")])
def test_faults_in_a_live_run_are_skipped_counted_and_logged(combiner, variant, tmp_path, caplog):
    run = tmp_path / "run"
    overrides = [f"combiner.name={combiner}", f"agent.architecture={variant}", "train.max_bad_updates=5"]
    trainer = Trainer(toy_config(run, *overrides), run)
    # 200 steps, updates from step 40 on: 161 updates. Faults: single ones of every kind, and runs of
    # four in a row (one short of the limit), so the streak must reset after each good update.
    schedule = {i: KINDS[i % len(KINDS)] for i in (3, 10, 11, 40, 41, 42, 43, 77, 100, 120, 121, 122, 123, 150)}
    injector = FaultInjector(trainer, schedule)
    with caplog.at_level(logging.WARNING, logger="mtrl"):
        assert trainer.train() == 0
    injector.finish()

    c = trainer.counters
    assert len(injector.injected) == len(schedule) == injector.verified
    assert c.bad_updates == len(schedule) and c.bad_streak == 0 and c.updates == 161 - len(schedule)
    assert all(torch.isfinite(p).all() for p in trainer.agent.state_dict().values())
    streaks, streak, previous = [], 0, None
    for i in sorted(schedule):
        streak = streak + 1 if previous == i - 1 else 1
        streaks.append(streak)
        previous = i
    expected = [
        f"non-finite loss or gradient at step {step}: update skipped ({n} in a row)"
        for (step, _), n in zip(injector.injected, streaks, strict=True)
    ]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == expected

    logged = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(20, 201, 20))
    for r in train:
        assert r["train/bad_updates"] == sum(step <= r["step"] for step, _ in injector.injected)
    assert ckpt.load(run)["counters"]["bad_updates"] == len(schedule)
    print(f"\nfaults injected {len(schedule)}, survived {injector.verified} ({combiner}, {variant})")


def test_too_many_bad_updates_in_a_row_stop_with_the_last_good_state_checkpointed(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(toy_config(run, "train.max_bad_updates=4", "checkpoint.every=0", "eval.every=0"), run)
    first_bad = 30
    injector = FaultInjector(trainer, {i: "nan reward" for i in range(first_bad, 1000)})
    with pytest.raises(TrainingError) as info:
        trainer.train()
    stop_step = 40 + first_bad + 3  # updates start at step 40, one per step
    assert str(info.value) == (
        f"4 non-finite updates in a row at step {stop_step}; stopped. The last good state is checkpointed in "
        f"{run / 'checkpoints'}; consider train.grad_clip_norm or train.q_target_clip"
    )
    assert injector.injected[0][0] == 40 + first_bad and len(injector.injected) == 4
    saved = ckpt.load(ckpt.latest_checkpoint(run))
    assert ckpt.latest_checkpoint(run).name == f"step_{stop_step:010d}.pt"
    assert saved["counters"]["updates"] == first_bad and saved["counters"]["bad_streak"] == 4
    # The weights and optimizer state of the last good update (the snapshot taken before the
    # first bad one), bit for bit.
    last_good = injector.snapshot
    assert_identical({"agent": saved["agent"], "optimizers": saved["optimizers"]}, last_good)


def test_the_cli_reports_a_streak_stop_in_one_line_and_exit_code_1(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        ["train", "--config", str(_empty_yaml(tmp_path)), *TOY_OVERRIDES, f"run.dir={run}", "train.max_bad_updates=3"],
        callbacks=[OnBatch(lambda _trainer, batch: corrupt(batch, "nan reward"))],
    )
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[-1] == (
        f"mtrl: error: 3 non-finite updates in a row at step 42; stopped. The last good state is checkpointed in "
        f"{run / 'checkpoints'}; consider train.grad_clip_norm or train.q_target_clip"
    )
    assert sum("update skipped" in line for line in err) == 3
    assert ckpt.latest_checkpoint(run).name == "step_0000000042.pt"


def _empty_yaml(d: Path) -> Path:
    path = d / "empty.yaml"
    path.write_text("{}\n")
    return path


class Recorder(UpdateHook):
    """The critic targets of an update, and each network's gradients as its optimizer steps on them."""

    def __init__(self) -> None:
        self.target: torch.Tensor | None = None
        self.grads: dict[str, list[torch.Tensor]] = {}

    def on_target(self, target: torch.Tensor) -> None:
        self.target = target.clone()

    def on_step(self, network: str, parameters: list[torch.nn.Parameter]) -> None:
        self.grads[network] = [p.grad.clone() for p in parameters]


def _one_update(update: SACUpdate, batch: Batch, noise_state: torch.Tensor) -> Recorder:
    """One update; returns what a `Recorder` saw of it."""
    recorder = Recorder()
    update.hooks.append(recorder)
    try:
        result = update(batch, torch.Generator().set_state(noise_state), torch.Generator().manual_seed(0))
    finally:
        update.hooks.remove(recorder)
    assert result.finite
    return recorder


def test_gradient_clipping_scales_each_network_to_the_bound(tmp_path):
    bound = 0.05
    trainer = _trained(tmp_path / "run", f"train.grad_clip_norm={bound}")
    assert trainer.optimization.grad_clip_norm == bound
    unclipped = copy.deepcopy(trainer.learner)
    unclipped.optimization.grad_clip_norm = None
    batch = trainer.buffer.sample(8, torch.Generator().manual_seed(1), trainer.device)
    state = torch.Generator().manual_seed(2).get_state()
    clipped_grads = _one_update(trainer.learner, batch, state).grads
    raw_grads = _one_update(unclipped, batch, state).grads
    assert clipped_grads.keys() == {"critic", "actor", "alpha"}
    exceeded = 0
    for net, raw in raw_grads.items():
        raw_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw]))
        clipped = clipped_grads[net]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
        assert norm <= bound * (1 + 1e-5), (net, float(norm))
        scale = min(1.0, bound / (float(raw_norm) + 1e-6))  # torch's clip_grad_norm_ coefficient
        for g, r in zip(clipped, raw, strict=True):
            torch.testing.assert_close(g, r * scale, rtol=1e-5, atol=1e-9)  # direction kept
        exceeded += float(raw_norm) > bound
    assert exceeded >= 2  # the bound was active, not vacuous


def test_q_target_clipping_clamps_the_bellman_targets(tmp_path):
    bound = 50.0
    trainer = _trained(tmp_path / "run", f"train.q_target_clip={bound}")
    assert trainer.learner.q_target_clip == bound
    unclipped = copy.deepcopy(trainer.learner)
    unclipped.q_target_clip = None
    batch = trainer.buffer.sample(8, torch.Generator().manual_seed(1), trainer.device)
    fields = batch._asdict()
    fields["reward"] = torch.linspace(-300.0, 300.0, batch.reward.numel()).reshape(batch.reward.shape)
    batch = Batch(**fields)
    state = torch.Generator().manual_seed(2).get_state()
    clipped = _one_update(trainer.learner, batch, state).target
    raw = _one_update(unclipped, batch, state).target
    assert raw.abs().max() > 250 and clipped.abs().max() == bound
    assert torch.equal(clipped, raw.clamp(-bound, bound))
    assert (clipped == bound).any() and (clipped == -bound).any() and (clipped.abs() < bound).any()
