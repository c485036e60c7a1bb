"""The toy backend (`env.benchmark=toy`): a point in the plane reaches goals, one task per direction.

Its sub-envs follow the protocol as Meta-World's do: training envs draw a random goal per reset,
evaluation envs terminate on success and sweep each task's goals in a seeded pseudorandom order;
built with the same seed, both hold the same goal sets.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from mtrl.envs.pool import EnvPool
from mtrl.envs.vector import VectorEnvBackend

if TYPE_CHECKING:
    from mtrl.config import EnvConfig

DEFAULT_CAMERA = "topview"
CAMERAS = ("topview",)  # the one view it draws
RENDERS_WITH_MUJOCO = False  # frames are drawn with numpy
TASK_PREFIX = "toy-"


def check_task_names(benchmark: str, tasks: list[str]) -> None:
    """The toy tasks are numbered (`env.toy_tasks`); `env.tasks` is unused."""


def task_names(cfg: EnvConfig) -> list[str]:
    return [f"{TASK_PREFIX}{i}" for i in range(cfg.toy_tasks)]


def make_backend(
    cfg: EnvConfig, seed: int, evaluation: bool, vector_strategy: str, render: dict[str, Any] | None
) -> ToyBackend:
    render_kwargs = {} if render is None else {"render_mode": "rgb_array", **render}
    fns = [partial(_toy_env, i, cfg, seed, evaluation, render_kwargs) for i in range(cfg.toy_tasks)]
    if vector_strategy == "pool":
        envs = EnvPool(fns, workers=cfg.workers)
    else:
        vector_cls = gym.vector.SyncVectorEnv if vector_strategy == "sync" else gym.vector.AsyncVectorEnv
        envs = vector_cls(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return ToyBackend(envs, task_names(cfg))


class ToyBackend(VectorEnvBackend):
    """The toy vector env; its sub-envs' checkpoints are JSON already and list their goals."""

    def _goals(self, ckpt: dict[str, Any]) -> list[Any]:
        return list(ckpt["goals"])


def _toy_env(task_id: int, cfg: EnvConfig, seed: int, evaluation: bool, render: dict[str, Any]) -> gym.Env:
    env = ToyReachEnv(task_id, cfg.toy_tasks, cfg.num_goals, seed, evaluation, **render)
    env = gym.wrappers.TimeLimit(env, cfg.max_episode_steps)
    return gym.wrappers.RecordEpisodeStatistics(env)


class ToyReachEnv(gym.Env):
    """A point in the plane must reach a goal; each task's goals sit around its own direction.

    No MuJoCo: a step costs microseconds, so unit tests and CI can train real agents on it.
    Mirrors the Meta-World surface the project relies on: `task_name`, `info["success"]`,
    `toggle_terminate_on_success`, `toggle_sample_tasks_on_reset`, `get_checkpoint`, and
    `render_mode="rgb_array"` (a numpy drawing of the plane seen from its one camera, so that the
    video path runs without any OpenGL backend).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    camera_names = CAMERAS

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
        self.task_name = f"{TASK_PREFIX}{task_id}"
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
