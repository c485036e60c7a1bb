"""Training paths beyond the defaults, on the toy benchmark: what each must do, read from metrics.jsonl.

Every run logs at every step (`log.every=1`), so each record after warm-up holds the metrics of
exactly one update: 3 tasks, updates at steps 40..60.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from mtrl import checkpoint as ckpt
from mtrl.rundir import METRICS_FILE
from mtrl.trainer import Trainer
from tests.conftest import toy_config

TASKS = ["toy-0", "toy-1", "toy-2"]
WARMUP, TOTAL = 40, 60
DIAGNOSTICS = ("cos_mean", "cos_min", "conflict_share", "grad_norm", "update_angle_deg", "update_norm", "weights")


class Run(NamedTuple):
    trainer: Trainer
    updates: list[dict]  # the train records of steps WARMUP..TOTAL, one update each
    initial: dict[str, torch.Tensor]  # the agent's weights before training


def _run(run: Path, *overrides: str) -> Run:
    trainer = Trainer(
        toy_config(run, f"train.total_steps={TOTAL}", "log.every=1", "eval.every=0", "checkpoint.every=0", *overrides),
        run,
    )
    initial = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
    assert trainer.train() == 0
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, TOTAL + 1))
    updates = [r for r in train if r["step"] >= WARMUP]
    assert len(updates) == trainer.counters.updates == TOTAL - WARMUP + 1
    return Run(trainer, updates, initial)


def _trained_and_finite(run: Run) -> None:
    state = run.trainer.agent.state_dict()
    assert all(torch.isfinite(p).all() for p in state.values())
    changed = {name.split(".")[0] for name, p in state.items() if not torch.equal(p, run.initial[name])}
    assert {"actor", "critic", "critic_target", "log_alpha"} <= changed


# ----- SDMGrad-OS: a random subset of tasks per update -------------------------------------------
@pytest.fixture(scope="module")
def sdmgrad_os(tmp_path_factory) -> Run:
    # n = 1 of K = 3: each task is drawn with probability 1/3 (the draw repeats until one is drawn)
    return _run(tmp_path_factory.mktemp("sdmgrad_os") / "run", "combiner.name=sdmgrad_os", "combiner.n=1")


def test_sdmgrad_os_updates_only_the_drawn_tasks(sdmgrad_os):
    updates = sdmgrad_os.updates
    _trained_and_finite(sdmgrad_os)
    drawn_sets = []
    for r in updates:
        critic, actor = r["loss/critic/per_task"], r["loss/actor/per_task"]
        drawn = {t for t in TASKS if critic[t] is not None}
        assert drawn == {t for t in TASKS if actor[t] is not None}, r["step"]  # one draw for both networks
        assert drawn, r["step"]  # never an empty subset
        assert all(math.isfinite(critic[t]) and math.isfinite(actor[t]) for t in drawn)
        assert math.isfinite(r["loss/critic"]) and math.isfinite(r["loss/actor"])  # means over the drawn tasks
        assert r["loss/critic"] == pytest.approx(np.mean([critic[t] for t in drawn]))
        drawn_sets.append(drawn)
    # all three are drawn in 1 update of 19 on average: most updates leave tasks out, every task gets its turn
    assert sum(len(d) < len(TASKS) for d in drawn_sets) >= 0.8 * len(drawn_sets)
    assert set().union(*drawn_sets) == set(TASKS)
    assert len({frozenset(d) for d in drawn_sets}) >= 3  # the subset is drawn anew, not fixed
    # An undrawn task's temperature gets no gradient: it stays at its initial value until the task is
    # first drawn, and moves once it is.
    for task in TASKS:
        first = next(i for i, d in enumerate(drawn_sets) if task in d)
        assert all(r["alpha/per_task"][task] == 1.0 for r in updates[:first]), task
        if first + 1 < len(updates):
            assert updates[first + 1]["alpha/per_task"][task] != 1.0, task
    assert not any(key.startswith("combiner/") for r in updates for key in r)  # diagnostics_every=0


# ----- one shared temperature, combined with the other networks, and the diagnostics ------------
C = 0.4  # CAGrad's default c


@pytest.fixture(scope="module")
def shared_temperature(tmp_path_factory) -> Run:
    return _run(
        tmp_path_factory.mktemp("shared_temperature") / "run",
        "combiner.name=cagrad",
        f"combiner.c={C}",
        "agent.shared_temperature=true",
        "combiner.networks=[critic,actor,alpha]",
        "combiner.diagnostics_every=2",
    )


def test_a_shared_temperature_is_one_trained_number(shared_temperature):
    updates = shared_temperature.updates
    _trained_and_finite(shared_temperature)
    log_alpha = ckpt.load(shared_temperature.trainer.run_dir)["agent"]["log_alpha"]
    assert log_alpha.shape == (1,)
    alphas = [r["alpha/per_task"] for r in updates]
    assert all(len(set(a.values())) == 1 for a in alphas)  # every task sees the same temperature
    # The policy's entropy stays above the target -|A| = -2, so the temperature only goes down.
    trajectory = [1.0] + [a["toy-0"] for a in alphas] + [float(log_alpha.exp())]
    assert all(later <= earlier for earlier, later in zip(trajectory, trajectory[1:], strict=False))
    assert trajectory[-1] < 1.0
    for r in updates:
        assert all(math.isfinite(r[f"loss/{net}/per_task"][t]) for net in ("critic", "actor", "alpha") for t in TASKS)


def test_diagnostics_are_logged_every_second_update_for_each_combined_network(shared_temperature):
    updates = shared_temperature.updates
    with_diagnostics = [i for i, r in enumerate(updates) if "combiner/critic/cos_mean" in r]
    assert with_diagnostics == list(range(with_diagnostics[0], len(updates), 2)) and with_diagnostics[0] in (0, 1)
    floor = 1 / (len(TASKS) * (1 + C**2))  # CAGrad's weights are (1/K + λ w*) / (1 + c²) with λ, w* >= 0
    max_angle = math.degrees(math.asin(C))  # d ∝ g0 + v with ‖v‖ = c‖g0‖
    for i in with_diagnostics:
        r = updates[i]
        for net in ("critic", "actor", "alpha"):
            values = {key: r[f"combiner/{net}/{key}"] for key in DIAGNOSTICS}
            assert all(v is not None and math.isfinite(v) for v in values.values()), (net, values)
            assert -1 - 1e-6 <= values["cos_min"] <= values["cos_mean"] <= 1 + 1e-6
            # 3 tasks, 3 pairs: the share of conflicting pairs is a multiple of 1/3, and > 0 iff a cosine is < 0
            assert values["conflict_share"] * 3 == pytest.approx(round(values["conflict_share"] * 3), abs=1e-6)
            assert (values["conflict_share"] > 0) == (values["cos_min"] < 0)
            assert 0 <= values["update_angle_deg"] <= max_angle + 0.1
            assert values["update_norm"] > 0
            assert all(g > 0 for g in r[f"combiner/{net}/grad_norm/per_task"].values())
            assert all(w >= floor - 1e-6 for w in r[f"combiner/{net}/weights/per_task"].values())
        # the temperature's per-task gradients are scalars of one sign: they never conflict
        assert r["combiner/alpha/cos_min"] == pytest.approx(1.0) and r["combiner/alpha/update_angle_deg"] < 0.1
    others = [r for i, r in enumerate(updates) if i not in with_diagnostics]
    assert not any(key.startswith("combiner/") for r in others for key in r)
    assert any(updates[i]["combiner/actor/conflict_share"] > 0 for i in with_diagnostics)  # a real conflict was seen
