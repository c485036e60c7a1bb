"""`VectorEnvBackend`: an env backend over a gymnasium vector env whose sub-env i is task i.

The sub-envs speak Meta-World's surface: `info["success"]`, and `get_checkpoint()` /
`load_checkpoint(pairs)` exchanging `(env id, state)` pairs. The vector env auto-resets in the
same step (`AutoresetMode.SAME_STEP`), so the final observation and info of an episode that ended
arrive in `info["final_obs"]` / `info["final_info"]`; `step` moves them into the `Step` arrays.
A backend module subclasses this and says how its sub-envs' states become JSON and goals.
`step_async`/`step_wait` use the vector env's own split where it has one (gymnasium's
`AsyncVectorEnv`, `EnvPool`: the sub-envs step in their processes in between); on other vector
envs the whole step runs in `step_wait`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from mtrl.envs.base import Step


def reported(info: dict, key: str, num_envs: int) -> np.ndarray:
    """`info[key]` where the vector env reported it, False elsewhere."""
    if key not in info:
        return np.zeros(num_envs, dtype=bool)
    present = info.get(f"_{key}", np.ones(num_envs, dtype=bool))
    return np.asarray(info[key], dtype=float).astype(bool) & present


class VectorEnvBackend:
    """The `EnvBackend` of a gymnasium vector env; `task_names[i]` names sub-env i."""

    def __init__(self, vector_env: gym.vector.VectorEnv, task_names: Sequence[str]):
        if vector_env.num_envs != len(task_names):
            raise ValueError(f"{len(task_names)} task names for {vector_env.num_envs} sub-envs")
        self.vector_env = vector_env
        self.task_names = list(task_names)
        self.obs_dim = int(np.prod(vector_env.single_observation_space.shape))
        action_space = vector_env.single_action_space
        self.act_dim = int(np.prod(action_space.shape))
        self.action_low = np.asarray(action_space.low, dtype=np.float32).reshape(self.act_dim)
        self.action_high = np.asarray(action_space.high, dtype=np.float32).reshape(self.act_dim)
        self._splits_steps = callable(getattr(vector_env, "step_async", None))
        # the step in flight: True (the vector env holds it) or the actions still to apply; None when idle
        self._in_flight: bool | np.ndarray | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def reset(self, seed: int | None = None) -> np.ndarray:
        self._check_idle("reset")
        obs, _ = self.vector_env.reset(seed=seed)
        return np.asarray(obs, dtype=np.float32)

    def step(self, actions: np.ndarray) -> Step:
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        self._check_idle("step_async")
        if self._splits_steps:
            self.vector_env.step_async(actions)
            self._in_flight = True
        else:  # a copy: the caller may reuse its array before step_wait
            self._in_flight = np.array(actions, copy=True)

    def step_wait(self) -> Step:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            raise RuntimeError("step_wait() without a step_async() before it")
        if in_flight is True:
            obs, reward, terminated, truncated, info = self.vector_env.step_wait()
        else:
            obs, reward, terminated, truncated, info = self.vector_env.step(in_flight)
        terminated, truncated = np.asarray(terminated, dtype=bool), np.asarray(truncated, dtype=bool)
        done = terminated | truncated
        next_obs = np.array(obs, dtype=np.float32, copy=True)
        success = reported(info, "success", self.num_tasks)
        if done.any():
            for i in np.flatnonzero(done):
                next_obs[i] = info["final_obs"][i]
            if "final_info" in info:
                success |= reported(info["final_info"], "success", self.num_tasks)
        return Step(
            obs=np.asarray(obs, dtype=np.float32),
            reward=np.asarray(reward, dtype=np.float64),
            terminated=terminated,
            truncated=truncated,
            next_obs=next_obs,
            success=success,
        )

    # ----- state: a JSON list of (env id, state) pairs, one per sub-env ---------------------------
    def get_state(self, tasks: Sequence[int] | None = None) -> str:
        """All sub-envs' state, or only that of the sub-envs `tasks` (synchronous vector envs only)."""
        self._check_idle("get_state")
        return json.dumps([(env_id, self._save(ckpt)) for env_id, ckpt in self._checkpoints(tasks)])

    def set_state(self, state: str, tasks: Sequence[int] | None = None) -> None:
        """Restore `get_state(tasks)`; the sub-envs outside `tasks` keep theirs."""
        self._check_idle("set_state")
        saved = {env_id: ckpt for env_id, ckpt in json.loads(state)}
        indices = range(self.num_tasks) if tasks is None else tasks
        merged = []
        for i, (env_id, live) in zip(indices, self._checkpoints(tasks), strict=True):
            if env_id not in saved:
                task = self.task_names[i]
                raise ValueError(f"env state has no entry for task {task!r}: it was saved for other tasks")
            merged.append((env_id, self._load(live, saved[env_id])))
        if tasks is None:
            self.vector_env.call("load_checkpoint", merged)
        else:
            for i in tasks:
                self._sub_env(i).get_wrapper_attr("load_checkpoint")(merged)

    def goal_sets(self) -> list[np.ndarray]:
        self._check_idle("goal_sets")
        return [
            np.array(sorted(np.asarray(g, dtype=np.float64).tolist() for g in self._goals(ckpt)))
            for _, ckpt in self._checkpoints(None)
        ]

    def close(self) -> None:
        self.vector_env.close()

    def _check_idle(self, what: str) -> None:
        if self._in_flight is not None:
            raise RuntimeError(f"{what}() while a step is in flight: call step_wait() first")

    # ----- what a backend module says about its sub-envs --------------------------------------
    def _save(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """One sub-env's checkpoint in JSON form."""
        return ckpt

    def _load(self, live: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint to load into a sub-env: its live one, updated from the saved JSON form."""
        return {**live, **saved}

    def _goals(self, ckpt: dict[str, Any]) -> list[Any]:
        """A sub-env's goals, from its checkpoint."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its goals")

    def _checkpoints(self, tasks: Sequence[int] | None) -> list[tuple[str, dict[str, Any]]]:
        if tasks is None:
            return list(self.vector_env.call("get_checkpoint"))
        return [self._sub_env(i).get_wrapper_attr("get_checkpoint")() for i in tasks]

    def _sub_env(self, i: int) -> gym.Env:
        if not isinstance(self.vector_env, gym.vector.SyncVectorEnv):
            raise ValueError("the state of single tasks needs a synchronous vector env (vector_strategy='sync')")
        return self.vector_env.envs[i]
