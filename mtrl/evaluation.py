"""Success-rate evaluation following the Meta-World+ protocol (docs/protocol.md).

Separate evaluation envs that hold the training envs' goal sets (`terminate_on_success=True`,
pseudorandom goal sweep), the policy's deterministic action, the first `episodes` episodes of
each task in the order they end, and an episode succeeds if it reported success at any step.
Same loop as `metaworld.evaluation.evaluation`, so on the same envs and policy both give the same
numbers. `Evaluator` puts its backend back to its freshly built state before every evaluation,
so every evaluation sweeps the same goals in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from mtrl.envs import EnvBackend


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
            f"({episodes} episode{'' if episodes == 1 else 's'} per task)"
        )


def evaluate(agent: Agent, backend: EnvBackend, episodes: int) -> EvalResult:
    """Run until every task has `episodes` finished episodes, from the backend's current state."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, found {episodes}")
    n = backend.num_tasks
    obs = backend.reset()
    agent.reset(np.ones(n, dtype=bool))
    returns: list[list[float]] = [[] for _ in range(n)]
    successes: list[list[bool]] = [[] for _ in range(n)]
    running = np.zeros(n)  # return so far of each task's current episode
    succeeded = np.zeros(n, dtype=bool)  # success seen so far in each task's current episode

    while min(len(r) for r in returns) < episodes:
        step = backend.step(agent.eval_action(obs))
        obs, done = step.obs, step.done
        agent.reset(done)
        running += step.reward
        succeeded |= step.success
        for i in np.flatnonzero(done):
            returns[i].append(float(running[i]))
            successes[i].append(bool(succeeded[i]))
        running[done] = 0.0
        succeeded[done] = False

    per_task = {
        name: {
            "success": float(np.mean(successes[i][:episodes])),
            "return": float(np.mean(returns[i][:episodes])),
        }
        for i, name in enumerate(backend.task_names)
    }
    return EvalResult(
        mean_success=float(np.mean([t["success"] for t in per_task.values()])),
        mean_return=float(np.mean([t["return"] for t in per_task.values()])),
        per_task=per_task,
    )


class Evaluator:
    """The protocol on a backend built once: each call starts from the backend's state at construction.

    Meta-World's pseudorandom sweep walks through a task's goals and reshuffles them when it wraps
    around. Tasks that finish early run more than `episodes` episodes, so without the restore the
    next evaluation would start mid-sweep and repeat some goals while skipping others.
    """

    def __init__(self, backend: EnvBackend, episodes: int):
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, found {episodes}")
        self.backend, self.episodes = backend, episodes
        self.initial_state = backend.get_state()

    def __call__(self, agent: Agent) -> EvalResult:
        self.backend.set_state(self.initial_state)
        return evaluate(agent, self.backend, self.episodes)

    def close(self) -> None:
        self.backend.close()
