"""Vectorised multi-task environments: Meta-World 3.x benchmarks and a tiny toy benchmark.

One sub-env per task, sub-env i is task i, observations carry a one-hot task id.
Training envs sample a goal at random on each reset; evaluation envs follow the Meta-World+
protocol: `terminate_on_success=True` and a pseudorandom sweep over each task's goals.
Built with the same seed, both hold the same goal sets (docs/protocol.md).
Build them once per process and reuse them (Meta-World construction is slow).
"""

from __future__ import annotations

import base64
import json
import pickle
import warnings
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np

from mtrl.config import ConfigError, EnvConfig

TOY_PREFIX = "toy-"

# Meta-World declares float64 bounds on float32 spaces; gymnasium warns on every construction.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")


def _metaworld():
    import metaworld  # noqa: F401 - registers the gymnasium ids

    return metaworld


def all_metaworld_tasks() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return list(ALL_V3_ENVIRONMENTS)


def check_task_names(tasks: list[str]) -> None:
    known = set(all_metaworld_tasks())
    for name in tasks:
        if name not in known:
            raise ConfigError(f"unknown Meta-World task {name!r} (examples: reach-v3, push-v3, pick-place-v3)")


def task_names(cfg: EnvConfig) -> list[str]:
    """Task names in sub-env order."""
    if cfg.benchmark == "toy":
        return [f"{TOY_PREFIX}{i}" for i in range(cfg.toy_tasks)]
    if cfg.benchmark in ("MT1", "custom"):
        return list(cfg.tasks)
    from metaworld import env_dict

    return list(getattr(env_dict, f"{cfg.benchmark}_V3"))


def make_envs(
    cfg: EnvConfig,
    seed: int,
    evaluation: bool,
    vector_strategy: str | None = None,
    render: dict[str, Any] | None = None,
) -> gym.vector.VectorEnv:
    """Training envs (`evaluation=False`) or protocol evaluation envs (`evaluation=True`).

    `render` (`camera_name`, `width`, `height`) builds every sub-env with `render_mode="rgb_array"`.
    """
    strategy = vector_strategy or cfg.vector_strategy
    render_kwargs = {} if render is None else {"render_mode": "rgb_array", **render}
    if cfg.benchmark == "toy":
        return _make_toy_envs(cfg, seed, evaluation, strategy, render_kwargs)
    mw = _metaworld()
    # Meta-World keeps the number of goals per task in a module global that only the MT10/25/50
    # entry point sets; set it for every benchmark so that one preset cannot leak into the next.
    mw._N_GOALS = cfg.num_goals
    kwargs: dict[str, Any] = dict(
        vector_strategy=strategy,
        use_one_hot=True,  # Meta-World's default is False
        reward_function_version=cfg.reward_version,
        max_episode_steps=cfg.max_episode_steps,
        terminate_on_success=evaluation,
        task_select="pseudorandom" if evaluation else "random",
        **render_kwargs,
    )
    if cfg.benchmark in ("MT10", "MT25", "MT50"):
        envs = gym.make_vec(f"Meta-World/{cfg.benchmark}", seed=seed, **kwargs)
    else:
        # The custom entry point seeds sub-env i with `seed + i` but treats seed 0 as "unseeded";
        # shifting by one keeps every seed, 0 included, deterministic.
        envs = gym.make_vec("Meta-World/custom-mt-envs", envs_list=list(cfg.tasks), seed=seed + 1, **kwargs)
    if evaluation:
        # Pseudorandom goal selection only advances through the goal list when this is on.
        envs.call("toggle_sample_tasks_on_reset", True)
    return envs


def env_checkpoint(envs: gym.vector.VectorEnv) -> str:
    """Per-sub-env RNG and goal-order state as JSON, in Meta-World's checkpoint format.

    Meta-World stores each goal ("task") as a pickle. The checkpoint keeps only the order of the
    goals, as positions in their sorted serialised form, so that loading never unpickles data
    that came from a file: the goals themselves are rebuilt from the seed when the envs are made.
    """
    states = []
    for env_id, ckpt in envs.call("get_checkpoint"):
        state = {k: v for k, v in ckpt.items() if k != "tasks"}
        if "tasks" in ckpt:
            canonical = sorted(t["data"] for t in ckpt["tasks"])
            state["task_order"] = [canonical.index(t["data"]) for t in ckpt["tasks"]]
        states.append((env_id, state))
    return json.dumps(states)


def load_env_checkpoint(envs: gym.vector.VectorEnv, state: str) -> None:
    saved = {env_id: ckpt for env_id, ckpt in json.loads(state)}
    merged = []
    for env_id, live in envs.call("get_checkpoint"):
        if env_id not in saved:
            raise ValueError(f"checkpoint has no state for env {env_id!r}: it was saved for other tasks")
        restored = {**live, **{k: v for k, v in saved[env_id].items() if k != "task_order"}}
        if "task_order" in saved[env_id]:
            canonical = sorted(live["tasks"], key=lambda t: t["data"])
            restored["tasks"] = [canonical[i] for i in saved[env_id]["task_order"]]
        merged.append((env_id, restored))
    envs.call("load_checkpoint", merged)


def goal_sets(envs: gym.vector.VectorEnv) -> list[np.ndarray]:
    """Each sub-env's goals, `[num_goals, ...]` rows in sorted order (to compare goal sets)."""
    sets = []
    for _, ckpt in envs.call("get_checkpoint"):
        if "tasks" in ckpt:  # Meta-World: the goals are the tasks' random vectors
            # These pickles come from the live envs of this process, never from a file.
            goals = [pickle.loads(base64.b64decode(t["data"]))["rand_vec"] for t in ckpt["tasks"]]
        else:
            goals = list(ckpt["goals"])
        sets.append(np.array(sorted(np.asarray(g, dtype=np.float64).tolist() for g in goals)))
    return sets


class ToyReachEnv(gym.Env):
    """A point in the plane must reach a goal; each task's goals sit around its own direction.

    No MuJoCo: a step costs microseconds, so unit tests and CI can train real agents on it.
    Mirrors the Meta-World surface the project relies on: `task_name`, `info["success"]`,
    `toggle_terminate_on_success`, `toggle_sample_tasks_on_reset`, `get_checkpoint`, and
    `render_mode="rgb_array"` (a numpy drawing of the plane seen from its one camera, so that the
    video path runs without any OpenGL backend).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    camera_names = ("topview",)

    def __init__(
        self,
        task_id: int,
        num_tasks: int,
        num_goals: int,
        seed: int,
        evaluation: bool,
        render_mode: str | None = None,
        camera_name: str | None = None,
        width: int = 64,
        height: int = 64,
    ):
        self.render_mode, self.camera_name, self.width, self.height = render_mode, camera_name, width, height
        self.task_id, self.num_tasks = task_id, num_tasks
        self.task_name = f"{TOY_PREFIX}{task_id}"
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (4 + num_tasks,), np.float32)
        angle = 2 * np.pi * task_id / num_tasks
        center = 0.6 * np.array([np.cos(angle), np.sin(angle)])
        goal_rng = np.random.default_rng([seed, task_id, 1])
        self.goals = (center + goal_rng.uniform(-0.15, 0.15, size=(num_goals, 2))).astype(np.float32)
        self.terminate_on_success = evaluation
        self.pseudorandom = evaluation
        self.sample_tasks_on_reset = True
        self.goal_idx = -1
        self.goal_order = np.arange(num_goals)
        self.np_random = np.random.default_rng([seed, task_id, 2])
        self.one_hot = np.eye(num_tasks, dtype=np.float32)[task_id]
        self.pos = np.zeros(2, np.float32)
        self.goal = self.goals[0]

    def toggle_terminate_on_success(self, on: bool) -> None:
        self.terminate_on_success = on

    def toggle_sample_tasks_on_reset(self, on: bool) -> None:
        self.sample_tasks_on_reset = on

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.goal, self.one_hot]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.np_random = np.random.default_rng([seed, self.task_id, 2])
        if self.sample_tasks_on_reset or self.goal_idx < 0:
            if self.pseudorandom:  # like Meta-World: walk through the goals, reshuffled at each wrap-around
                self.goal_idx = (self.goal_idx + 1) % len(self.goals)
                if self.goal_idx == 0:
                    self.goal_order = self.np_random.permutation(len(self.goals))
            else:
                self.goal_idx = int(self.np_random.integers(len(self.goals)))
        self.goal = self.goals[self.goal_order[self.goal_idx] if self.pseudorandom else self.goal_idx]
        self.pos = self.np_random.uniform(-0.1, 0.1, size=2).astype(np.float32)
        return self._obs(), {}

    def step(self, action: np.ndarray):
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        self.pos = np.clip(self.pos + 0.1 * action, -1.0, 1.0).astype(np.float32)
        dist = float(np.linalg.norm(self.pos - self.goal))
        success = float(dist < 0.1)
        reward = 1.0 - dist + success
        terminated = bool(success) and self.terminate_on_success
        return self._obs(), reward, terminated, False, {"success": success}

    def render(self) -> np.ndarray | None:
        """The square [-1, 1]^2 filling the frame: the goal's success disc in green, the point in red."""
        if self.render_mode != "rgb_array":
            return None
        x = (np.arange(self.width) + 0.5) / self.width * 2 - 1
        y = 1 - (np.arange(self.height) + 0.5) / self.height * 2  # row 0 is the top of the plane
        frame = np.full((self.height, self.width, 3), 255, np.uint8)
        for center, radius, color in ((self.goal, 0.1, (40, 160, 60)), (self.pos, 0.05, (210, 30, 40))):
            # at least one pixel wide, so the point stays visible in tiny frames
            r = max(radius, 2.0 / min(self.width, self.height))
            inside = (x[None, :] - center[0]) ** 2 + (y[:, None] - center[1]) ** 2 <= r**2
            frame[inside] = color
        return frame

    def get_checkpoint(self) -> tuple[str, dict]:
        return self.task_name, {
            "rng": self.np_random.bit_generator.state,
            "goal_idx": self.goal_idx,
            "goal_order": self.goal_order.tolist(),
            "goals": self.goals.tolist(),
        }

    def load_checkpoint(self, ckpts: list[tuple[str, dict]]) -> None:
        ckpt = dict(ckpts)[self.task_name]
        self.np_random.bit_generator.state = ckpt["rng"]
        self.goal_idx = ckpt["goal_idx"]
        self.goal_order = np.asarray(ckpt["goal_order"])


def _toy_env(task_id: int, cfg: EnvConfig, seed: int, evaluation: bool, render: dict[str, Any]) -> gym.Env:
    env = ToyReachEnv(task_id, cfg.toy_tasks, cfg.num_goals, seed, evaluation, **render)
    env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
    return gym.wrappers.RecordEpisodeStatistics(env)


def _make_toy_envs(
    cfg: EnvConfig, seed: int, evaluation: bool, strategy: str, render: dict[str, Any]
) -> gym.vector.VectorEnv:
    fns = [partial(_toy_env, i, cfg, seed, evaluation, render) for i in range(cfg.toy_tasks)]
    vector_cls = gym.vector.SyncVectorEnv if strategy == "sync" else gym.vector.AsyncVectorEnv
    return vector_cls(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
