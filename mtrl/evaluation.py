"""Success-rate evaluation following the Meta-World+ protocol (docs/protocol.md).

Separate evaluation envs that hold the training envs' goal sets (`terminate_on_success=True`,
pseudorandom goal sweep), the policy's deterministic action, the first `episodes` episodes of
each task in the order they end, and an episode succeeds if `info["success"]` was 1 at any step.
Same loop as `metaworld.evaluation.evaluation`, so on the same envs and policy both give the same
numbers (tests/test_metaworld.py). `Evaluator` puts its envs back to their freshly built state
before every evaluation, so every evaluation sweeps the same goals in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import gymnasium as gym
import numpy as np

from mtrl.envs import env_checkpoint, load_env_checkpoint


class Agent(Protocol):
    def eval_action(self, observations: np.ndarray) -> np.ndarray: ...

    def reset(self, env_mask: np.ndarray) -> None: ...


@dataclass
class EvalResult:
    mean_success: float
    mean_return: float
    per_task: dict[str, dict[str, float]]  # task -> {"success": rate, "return": mean return}

    def to_dict(self) -> dict:
        return {"mean_success": self.mean_success, "mean_return": self.mean_return, "per_task": self.per_task}

    def metrics(self, task_names: list[str]) -> dict[str, float | np.ndarray]:
        """The run-log record of an evaluation: means, and per-task vectors in `task_names` order."""
        return {
            "eval/mean_success": self.mean_success,
            "eval/mean_return": self.mean_return,
            "eval/success": np.array([self.per_task[t]["success"] for t in task_names]),
            "eval/return": np.array([self.per_task[t]["return"] for t in task_names]),
        }

    def summary(self, step: int, episodes: int) -> str:
        """The console line of an evaluation."""
        return (
            f"step {step}: eval success {self.mean_success:.3f}, return {self.mean_return:.1f} "
            f"({episodes} episodes per task)"
        )


def reported(info: dict, key: str, num_envs: int) -> np.ndarray:
    """`info[key]` where the vector env reported it, False elsewhere."""
    if key not in info:
        return np.zeros(num_envs, dtype=bool)
    present = info.get(f"_{key}", np.ones(num_envs, dtype=bool))
    return np.asarray(info[key], dtype=float).astype(bool) & present


def evaluate(agent: Agent, envs: gym.vector.VectorEnv, task_names: list[str], episodes: int) -> EvalResult:
    """Run until every task has `episodes` finished episodes; sub-env i is task `task_names[i]`."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, found {episodes}")
    n = envs.num_envs
    if len(task_names) != n:
        raise ValueError(f"{len(task_names)} task names for {n} envs")
    obs, _ = envs.reset()
    agent.reset(np.ones(n, dtype=bool))
    returns: list[list[float]] = [[] for _ in range(n)]
    successes: list[list[bool]] = [[] for _ in range(n)]
    succeeded = np.zeros(n, dtype=bool)  # success seen so far in each env's current episode

    while min(len(r) for r in returns) < episodes:
        obs, _, terminated, truncated, info = envs.step(agent.eval_action(obs))
        done = np.logical_or(terminated, truncated)
        agent.reset(done)
        succeeded |= reported(info, "success", n)
        if done.any():
            final = info["final_info"]
            final_success = reported(final, "success", n)
            for i in np.flatnonzero(done):
                returns[i].append(float(final["episode"]["r"][i]))
                successes[i].append(bool(succeeded[i] or final_success[i]))
            succeeded[done] = False

    per_task = {
        name: {
            "success": float(np.mean(successes[i][:episodes])),
            "return": float(np.mean(returns[i][:episodes])),
        }
        for i, name in enumerate(task_names)
    }
    return EvalResult(
        mean_success=float(np.mean([t["success"] for t in per_task.values()])),
        mean_return=float(np.mean([t["return"] for t in per_task.values()])),
        per_task=per_task,
    )


class Evaluator:
    """The protocol on envs built once: each call starts from the envs' state at construction.

    Meta-World's pseudorandom sweep walks through a task's goals and reshuffles them when it wraps
    around. Tasks that finish early run more than `episodes` episodes, so without the restore the
    next evaluation would start mid-sweep and repeat some goals while skipping others.
    """

    def __init__(self, envs: gym.vector.VectorEnv, task_names: list[str], episodes: int):
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, found {episodes}")
        self.envs, self.task_names, self.episodes = envs, list(task_names), episodes
        self.initial_state = env_checkpoint(envs)

    def __call__(self, agent: Agent) -> EvalResult:
        load_env_checkpoint(self.envs, self.initial_state)
        return evaluate(agent, self.envs, self.task_names, self.episodes)

    def close(self) -> None:
        self.envs.close()
