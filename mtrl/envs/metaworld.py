"""The Meta-World backend: Meta-World 3.x benchmarks (MT1, MT10, MT25, MT50, custom) through gymnasium.

One sub-env per task, sub-env i is task i, observations carry a one-hot task id.
Training envs sample a goal at random on each reset; evaluation envs follow the Meta-World+
protocol: `terminate_on_success=True` and a pseudorandom sweep over each task's goals.
Built with the same seed, both hold the same goal sets (docs/protocol.md).
Build them once per process and reuse them (Meta-World construction is slow).
"""

from __future__ import annotations

import base64
import pickle
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from mtrl.envs.pool import EnvPool
from mtrl.envs.vector import VectorEnvBackend

if TYPE_CHECKING:
    from mtrl.config import EnvConfig

DEFAULT_CAMERA = "corner"
# The cameras of Meta-World's shared scene, known before any env is built (`mtrl eval --video --camera`).
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
RENDERS_WITH_MUJOCO = True  # offscreen, through an OpenGL backend (MUJOCO_GL)

# Meta-World declares float64 bounds on float32 spaces; gymnasium warns on every construction.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")


def _metaworld():
    import metaworld  # noqa: F401 - registers the gymnasium ids

    return metaworld


def all_tasks() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return list(ALL_V3_ENVIRONMENTS)


def check_task_names(benchmark: str, tasks: list[str]) -> None:
    """MT1 and custom name their tasks in `env.tasks`; the others ignore it."""
    if benchmark not in ("MT1", "custom"):
        return
    known = set(all_tasks())
    for name in tasks:
        if name not in known:
            raise ValueError(f"unknown Meta-World task {name!r} (examples: reach-v3, push-v3, pick-place-v3)")


def task_names(cfg: EnvConfig) -> list[str]:
    if cfg.benchmark in ("MT1", "custom"):
        return list(cfg.tasks)
    from metaworld import env_dict

    return list(getattr(env_dict, f"{cfg.benchmark}_V3"))


def make_backend(
    cfg: EnvConfig, seed: int, evaluation: bool, vector_strategy: str, render: dict[str, Any] | None
) -> MetaWorldBackend:
    render_kwargs = {} if render is None else {"render_mode": "rgb_array", **render}
    mw = _metaworld()
    # Meta-World keeps the number of goals per task in a module global that only the MT10/25/50
    # entry point sets; set it for every benchmark so that one preset cannot leak into the next.
    mw._N_GOALS = cfg.num_goals
    kwargs: dict[str, Any] = dict(
        vector_strategy=vector_strategy,
        use_one_hot=True,  # Meta-World's default is False
        reward_function_version=cfg.reward_version,
        max_episode_steps=cfg.max_episode_steps,
        terminate_on_success=evaluation,
        task_select="pseudorandom" if evaluation else "random",
        **render_kwargs,
    )
    if vector_strategy == "pool":
        envs = EnvPool(_sub_env_fns(cfg, seed, kwargs), num_envs=len(task_names(cfg)), workers=cfg.workers)
    elif cfg.benchmark in ("MT10", "MT25", "MT50"):
        envs = gym.make_vec(f"Meta-World/{cfg.benchmark}", seed=seed, **kwargs)
    else:
        # The custom entry point seeds sub-env i with `seed + i` but treats seed 0 as "unseeded";
        # shifting by one keeps every seed, 0 included, deterministic.
        envs = gym.make_vec("Meta-World/custom-mt-envs", envs_list=list(cfg.tasks), seed=seed + 1, **kwargs)
    if evaluation:
        # Pseudorandom goal selection only advances through the goal list when this is on.
        envs.call("toggle_sample_tasks_on_reset", True)
    return MetaWorldBackend(envs, task_names(cfg))


def _sub_env_fns(cfg: EnvConfig, seed: int, kwargs: dict[str, Any]) -> Iterator[Callable[[], gym.Env]]:
    """Each sub-env's constructor, as Meta-World's vector entry points (above) build that sub-env.

    So an `EnvPool` built from them holds the same goals and gives the same steps as `gym.make_vec`
    with the same seed. The MT10/25/50 goals come from one global NumPy stream seeded once and
    consumed task after task (Meta-World's `_make_tasks`), so they are drawn here, in order; each
    task's constructor is yielded as soon as its goals exist, and the pool's workers build the
    sub-envs while the next goals are drawn. MT1 and custom tasks draw their goals from their own
    seeds, inside the sub-env's constructor, so the workers do all of it.
    """
    mw = _metaworld()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("vector_strategy", "use_one_hot")}
    names = task_names(cfg)
    if cfg.benchmark not in ("MT10", "MT25", "MT50"):
        # the custom entry point's seeds: `seed + 1` (see make_backend), plus the sub-env's index
        for idx, name in enumerate(names):
            yield partial(_custom_sub_env, name, idx, len(names), seed + 1 + idx, cfg.num_goals, kwargs)
        return
    from metaworld import env_dict

    classes = getattr(env_dict, f"{cfg.benchmark}_V3")
    args_kwargs = getattr(env_dict, f"{cfg.benchmark}_V3_ARGS_KWARGS")
    # Meta-World's goal generation needs the global NumPy RNG; keep its stream apart from the
    # caller's (who may use the global RNG between two yields) and restore the caller's each time.
    outer = np.random.get_state()
    np.random.seed(seed)
    stream = np.random.get_state()
    np.random.set_state(outer)
    for env_id, (name, cls) in enumerate(classes.items()):
        outer = np.random.get_state()
        np.random.set_state(stream)
        try:
            goals = mw._make_tasks(classes, {name: args_kwargs[name]}, mw._MT_OVERRIDE, seed=None)
        finally:
            stream = np.random.get_state()
            np.random.set_state(outer)
        yield partial(
            mw._init_each_env,
            env_cls=cls,
            tasks=goals,
            seed=seed,
            env_id=env_id,
            num_tasks=len(classes),
            use_one_hot=True,
            **kwargs,
        )


def _custom_sub_env(name: str, idx: int, num_tasks: int, seed: int, num_goals: int, kwargs: dict) -> gym.Env:
    mw = _metaworld()
    mw._N_GOALS = num_goals  # this worker's copy of the global that make_backend sets
    return mw.make_mt_envs(name, num_tasks=num_tasks, env_id=idx, seed=seed, use_one_hot=True, **kwargs)


class MetaWorldBackend(VectorEnvBackend):
    """Meta-World's vector envs; the state is Meta-World's checkpoint format without its pickles.

    Meta-World stores each goal ("task") as a pickle. The state keeps only the order of the goals,
    as positions in their sorted serialised form, so that loading never unpickles data that came
    from a file: the goals themselves are rebuilt from the seed when the envs are made.
    """

    def _save(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        state = {k: v for k, v in ckpt.items() if k != "tasks"}
        canonical = sorted(t["data"] for t in ckpt["tasks"])
        state["task_order"] = [canonical.index(t["data"]) for t in ckpt["tasks"]]
        return state

    def _load(self, live: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        restored = {**live, **{k: v for k, v in saved.items() if k != "task_order"}}
        canonical = sorted(live["tasks"], key=lambda t: t["data"])
        restored["tasks"] = [canonical[i] for i in saved["task_order"]]
        return restored

    def _goals(self, ckpt: dict[str, Any]) -> list[Any]:
        # The goals are the tasks' random vectors; these pickles come from the live envs of this
        # process, never from a file.
        return [pickle.loads(base64.b64decode(t["data"]))["rand_vec"] for t in ckpt["tasks"]]
