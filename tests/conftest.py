from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mtrl.config import Config, load_config

TOY_OVERRIDES = [
    "device=cpu",
    "env.benchmark=toy",
    "env.toy_tasks=3",
    "env.max_episode_steps=20",
    "env.num_goals=5",
    "agent.hidden_sizes=[32,32]",
    "train.total_steps=200",
    "train.warmup_steps=40",
    "train.batch_per_task=8",
    "train.buffer_capacity=3000",
    "eval.every=100",
    "eval.episodes=2",
    "log.every=20",
    "log.progress=false",
    "log.tensorboard=false",
    "checkpoint.every=100",
    "combiner.diagnostics_every=0",
]


def toy_config(run_dir: Path, *overrides: str) -> Config:
    """A seconds-long run on the built-in toy benchmark."""
    return load_config(None, [*TOY_OVERRIDES, f"run.dir={run_dir}", *overrides])


def nested_config(overrides: list[str]) -> dict:
    """Dotted `key=value` overrides as the nested mapping a YAML preset holds."""
    data: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return data


@pytest.fixture
def toy_cfg(tmp_path: Path) -> Config:
    return toy_config(tmp_path / "run")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
