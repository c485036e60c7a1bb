"""configs/toy.yaml: the preset of the built-in toy benchmark trains, and is the configuration whose
learning tests/test_trainer.py::test_toy_agent_learns checks."""

from __future__ import annotations

import json
from pathlib import Path

from mtrl.checkpoint import checkpoint_step, latest_checkpoint
from mtrl.cli import main
from mtrl.config import load_config, to_dict
from mtrl.rundir import METRICS_FILE
from tests.conftest import toy_config

PRESET = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"
# test_toy_agent_learns's overrides on top of tests.conftest.TOY_OVERRIDES
LEARNS = [
    "env.max_episode_steps=30",
    "agent.hidden_sizes=[64,64]",
    "train.batch_per_task=64",
    "train.total_steps=2500",
    "eval.every=500",
    "eval.episodes=10",
    "log.every=500",
]


def test_the_preset_is_the_configuration_the_learning_test_checks(tmp_path):
    preset = to_dict(load_config(PRESET, [f"run.dir={tmp_path}"]))
    learns = to_dict(toy_config(tmp_path, *LEARNS))
    # what decides the learning curve; logging, checkpoints and the progress bar may differ
    for section in ("env", "agent", "combiner", "optimizer", "train"):
        assert preset[section] == learns[section], section
    assert (preset["seed"], preset["device"], preset["eval"]) == (learns["seed"], learns["device"], learns["eval"])


def test_the_preset_trains_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--config", str(PRESET), f"run.dir={run}", "train.total_steps=60", "eval.every=0"]
    assert main([*argv, "eval.episodes=1", "log.every=30", "log.progress=false"]) == 0
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in records] == [(30, "train"), (60, "train"), (60, "eval")]
    assert latest_checkpoint(run) is not None and checkpoint_step(latest_checkpoint(run)) == 60
    assert "(1 episode per task)" in capsys.readouterr().out
