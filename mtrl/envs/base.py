"""The env backend interface: what the trainer, the evaluator and the tools ask of a multi-task env.

A backend runs K tasks side by side, task i in slot i, and speaks numpy: a batched `reset`, and a
batched `step` that returns a `Step` of plain arrays, with the auto-reset already done and the true
final observations and successes of the episodes that ended kept apart. `step_async`/`step_wait`
split a step in two so that the caller can compute while envs in worker processes step. `get_state`/`set_state`
save and restore what decides the next episodes (RNG states, goal order) as a JSON string.
`vector_env` is the one gymnasium object in the interface, for gym-only tools (videos, the SB3
baseline, Meta-World's own evaluator). docs/envs.md says how to add a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import gymnasium as gym


@dataclass
class Step:
    """One batched step; row i is task i."""

    obs: np.ndarray  # [K, obs_dim] float32: what to act on next (the reset observation where an episode ended)
    reward: np.ndarray  # [K] float64
    terminated: np.ndarray  # [K] bool
    truncated: np.ndarray  # [K] bool
    next_obs: np.ndarray  # [K, obs_dim] float32: the observation this step led to (the final one where done)
    success: np.ndarray  # [K] bool: success reported by this step (by the final step where done)

    @property
    def done(self) -> np.ndarray:
        """[K] bool: the episodes that ended with this step."""
        return self.terminated | self.truncated


class EnvBackend(Protocol):
    """K tasks stepped together; slot i is task `task_names[i]`."""

    task_names: list[str]
    obs_dim: int
    act_dim: int
    action_low: np.ndarray  # [act_dim] float32
    action_high: np.ndarray  # [act_dim] float32
    vector_env: gym.vector.VectorEnv  # the escape hatch for gym-only tools

    @property
    def num_tasks(self) -> int: ...

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start every task's episode; [K, obs_dim] float32. A seed reseeds task i with `seed + i`."""
        ...

    def step(self, actions: np.ndarray) -> Step:
        """Apply `actions` [K, act_dim]; tasks whose episode ended are reset in the same call."""
        ...

    def step_async(self, actions: np.ndarray) -> None:
        """Start `step(actions)` and return at once; `step_wait` returns its `Step`.

        Between the two the caller may compute (an update, say) while envs that run in other
        processes step. `step(a)` is `step_async(a)` then `step_wait()`. Nothing else may be asked
        of the backend while a step is in flight.
        """
        ...

    def step_wait(self) -> Step:
        """The `Step` of the `step_async` before it."""
        ...

    def get_state(self) -> str:
        """What the next resets draw from (per-task RNG states and goal order), as JSON."""
        ...

    def set_state(self, state: str) -> None:
        """Restore a `get_state`; a ValueError naming the task when `state` was saved for other tasks."""
        ...

    def goal_sets(self) -> list[np.ndarray]:
        """Each task's goals, `[num_goals, ...]` rows in sorted order (to compare goal sets)."""
        ...

    def close(self) -> None: ...
