"""What a checkpoint holds, typed: captured from a live run, checked against a config, restored into one.

A `RunState` is everything needed to continue a run exactly: the config it ran with, the
states of the agent, optimizers, combiner, generators and (optionally) the replay buffer, and the
loop's own `Progress` (counters, where the running episode began, the last evaluation and the values
waiting for the next train log). `mtrl.checkpoint` writes and reads the files; this module
knows their contents. `RunState.actor` rebuilds the policy network alone, for evaluation and
deployment.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtrl import checkpoint as ckpt
from mtrl.checkpoint import CheckpointError
from mtrl.config import Config, ConfigError, config_from_dict, load_config, to_dict
from mtrl.evaluation import EvalResult
from mtrl.networks import Actor

if TYPE_CHECKING:
    from mtrl.build import Parts


@dataclass
class Counters:
    env_steps: int = 0  # vector steps
    updates: int = 0
    bad_updates: int = 0  # non-finite updates skipped, in total
    bad_streak: int = 0  # ... in a row
    episodes: int = 0  # per task (all tasks end their episodes together in training)
    best_success: float = -1.0


@dataclass
class Progress:
    """The training loop's own state, between two vector steps."""

    counters: Counters = field(default_factory=Counters)
    learning_starts: int = 0  # no update before this step: the buffer must hold enough transitions
    # The training envs' state when the running episode began (None: the first reset, from the
    # seed). A resume restarts that episode from its beginning, with the same goal.
    episode_start: str | None = None
    last_eval: EvalResult | None = None
    # Logged with every train record until replaced: the last finished episode's return and
    # success ([K] each), and the last good update's metrics (a diagnostics update's until logged once).
    train_stats: dict[str, np.ndarray] = field(default_factory=dict)
    update_metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RunState:
    config: Config
    task_names: list[str]
    dims: dict[str, int]  # {"obs", "act", "tasks"}
    progress: Progress
    agent: dict[str, torch.Tensor]
    optimizers: dict[str, Any]
    combiner: dict[str, Any]
    rng: dict[str, torch.Tensor]  # {"cpu", "device"}: the generators' states
    buffer: dict[str, Any] | None = None  # None: not saved, the buffer restarts empty
    source: Path | None = None  # the file it was read from

    # ----- from a live run, into a live run --------------------------------------------------
    @classmethod
    def capture(cls, cfg: Config, parts: Parts, progress: Progress) -> RunState:
        """The run as it stands (tensors are the live ones: write them out before the next update)."""
        return cls(
            config=cfg,
            task_names=list(parts.tasks),
            dims={"obs": parts.obs_dim, "act": parts.act_dim, "tasks": parts.num_tasks},
            progress=progress,
            agent=parts.agent.state_dict(),
            optimizers=parts.optimization.state_dict(),
            combiner=parts.combiner.state_dict(),
            rng={"cpu": parts.gen_cpu.get_state(), "device": parts.gen_device.get_state()},
            buffer=parts.buffer.state_dict() if cfg.checkpoint.save_buffer else None,
        )

    def check(self, cfg: Config, parts: Parts) -> None:
        """Refuse to resume a run of other tasks, networks or combiner, or one already past `train.total_steps`."""
        dims = {"obs": parts.obs_dim, "act": parts.act_dim, "tasks": parts.num_tasks}
        if self.task_names != parts.tasks or self.dims != dims:
            raise CheckpointError(f"{self.source} was saved for other tasks or dimensions than this config")
        if self.config.agent != cfg.agent or self.config.combiner.name != cfg.combiner.name:
            raise CheckpointError(f"{self.source} was saved with another agent or combiner config")
        step = self.progress.counters.env_steps
        if step > cfg.train.total_steps:
            raise ConfigError(
                f"train.total_steps must be >= the step of the checkpoint ({step}), found {cfg.train.total_steps}"
            )

    def restore(self, cfg: Config, parts: Parts) -> Progress:
        """Check, load every state into `parts`, and return the loop's progress to continue from."""
        self.check(cfg, parts)
        progress = copy.deepcopy(self.progress)
        try:
            parts.agent.load_state_dict(self.agent)
            parts.optimization.load_state_dict(self.optimizers)
            parts.combiner.load_state_dict(self.combiner)
            if self.buffer is not None:
                parts.buffer.load_state_dict(self.buffer)
            else:  # the replay buffer starts empty: refill it before learning again
                progress.learning_starts = progress.counters.env_steps + cfg.train.warmup_steps
        except (RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{self.source} does not match this config: {str(err).splitlines()[0]}") from None
        parts.gen_cpu.set_state(self.rng["cpu"])
        parts.gen_device.set_state(self.rng["device"])  # a CPU tensor, whatever device the generator is on
        return progress

    def resumed_config(self, run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
        """The config to continue the run with: the saved one, then `overrides`, in `run_dir`."""
        return load_config(None, [*overrides, f"run.dir={run_dir}"], base=to_dict(self.config))

    def actor(self, device: torch.device) -> Actor:
        """The policy network alone, on `device` (the agent keeps its weights under `actor.`)."""
        a = self.config.agent
        actor = Actor(
            self.dims["obs"],
            self.dims["act"],
            a.hidden_sizes,
            self.dims["tasks"],
            a.log_std_min,
            a.log_std_max,
            a.architecture,
            a.hyper_parameters(),
        )
        weights = {k.removeprefix("actor."): v for k, v in self.agent.items() if k.startswith("actor.")}
        try:
            actor.load_state_dict(weights)
        except RuntimeError as err:
            raise CheckpointError(
                f"actor weights do not match the checkpoint's config: {str(err).splitlines()[0]}"
            ) from None
        return actor.to(device)

    # ----- the checkpoint's dictionary -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        p = self.progress
        state = {
            "config": to_dict(self.config),
            "dims": dict(self.dims),
            "task_names": list(self.task_names),
            "counters": asdict(p.counters),
            "agent": self.agent,
            "optimizers": self.optimizers,
            "combiner": self.combiner,
            "rng": self.rng,
            "env_state": p.episode_start,
            "last_eval": None if p.last_eval is None else p.last_eval.to_dict(),
            "learning_starts": p.learning_starts,
            "train_stats": {k: torch.from_numpy(np.asarray(v)) for k, v in p.train_stats.items()},
            "update_metrics": {k: v.detach() for k, v in p.update_metrics.items()},
        }
        if self.buffer is not None:
            state["buffer"] = self.buffer
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any], source: Path | None = None) -> RunState:
        """Read a checkpoint's dictionary (a CheckpointError names the first key it lacks)."""
        try:
            cfg = config_from_dict(state["config"])
        except (ConfigError, KeyError) as err:
            raise CheckpointError(f"checkpoint holds no usable config: {err}") from None
        try:
            last_eval = state["last_eval"]
            progress = Progress(
                counters=Counters(**state["counters"]),
                learning_starts=state["learning_starts"],
                episode_start=state["env_state"],
                last_eval=None if last_eval is None else EvalResult(**last_eval),
                train_stats={k: v.cpu().numpy() for k, v in state["train_stats"].items()},
                update_metrics=dict(state["update_metrics"]),
            )
            return cls(
                config=cfg,
                task_names=list(state["task_names"]),
                dims=dict(state["dims"]),
                progress=progress,
                agent=state["agent"],
                optimizers=state["optimizers"],
                combiner=state["combiner"],
                rng=state["rng"],
                buffer=state.get("buffer"),
                source=source,
            )
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{source} is not a complete mtrl checkpoint ({type(err).__name__}: {err})") from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> RunState:
    """The run state in a checkpoint file, or in the latest checkpoint of a run directory."""
    path = ckpt.resolve(path)
    return RunState.from_dict(ckpt.load(path, map_location=map_location), source=path)


def load_latest(run_dir: Path) -> RunState:
    """The state to resume `run_dir` from: its newest complete periodic checkpoint."""
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint to resume from in {run_dir}")
    return RunState.from_dict(ckpt.load(path), source=path)  # tensors on the CPU (the default of ckpt.load)
