"""Env backends and their registry: which backend serves each `env.benchmark`.

A backend is one module here (see docs/envs.md) that provides
    make_backend(cfg, seed, evaluation, vector_strategy, render) -> EnvBackend
    task_names(cfg) -> list[str]                    the tasks in slot order, without building envs
    check_task_names(benchmark, tasks) -> None      ValueError for a task it does not know
    DEFAULT_CAMERA: str, CAMERAS: tuple[str, ...], RENDERS_WITH_MUJOCO: bool   for `mtrl eval --video`
and one line in `REGISTRY`. The registry answers config validation (which benchmarks exist, are these
task names valid) by importing only the backend asked about, and builds nothing.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mtrl.envs.base import EnvBackend, Step

if TYPE_CHECKING:
    from mtrl.config import EnvConfig

__all__ = ["EnvBackend", "Step", "backend_module", "benchmarks", "check_task_names", "make_backend", "task_names"]

# backend module -> the `env.benchmark` values it serves
REGISTRY: dict[str, tuple[str, ...]] = {
    "mtrl.envs.metaworld": ("MT1", "MT10", "MT25", "MT50", "custom"),
    "mtrl.envs.toy": ("toy",),
}


def benchmarks() -> tuple[str, ...]:
    """Every `env.benchmark` value, in registry order."""
    return tuple(name for names in REGISTRY.values() for name in names)


def backend_module(benchmark: str) -> ModuleType:
    for module, names in REGISTRY.items():
        if benchmark in names:
            return importlib.import_module(module)
    raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(benchmarks())}")


def check_task_names(benchmark: str, tasks: list[str]) -> None:
    """ValueError naming the first task of `tasks` that `benchmark`'s backend does not know."""
    backend_module(benchmark).check_task_names(benchmark, list(tasks))


def task_names(cfg: EnvConfig) -> list[str]:
    """Task names in slot order."""
    return backend_module(cfg.benchmark).task_names(cfg)


def make_backend(
    cfg: EnvConfig,
    seed: int,
    evaluation: bool,
    vector_strategy: str | None = None,
    render: dict[str, Any] | None = None,
) -> EnvBackend:
    """Training envs (`evaluation=False`) or protocol evaluation envs (`evaluation=True`).

    Both built with the same seed hold the same goal sets. `vector_strategy` (sync | async | pool)
    defaults to `cfg.vector_strategy`; `render` (`camera_name`, `width`, `height`) makes every
    sub-env render RGB frames.
    """
    module = backend_module(cfg.benchmark)
    return module.make_backend(cfg, seed, evaluation, vector_strategy or cfg.vector_strategy, render)
