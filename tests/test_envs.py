"""The env backend contract, checked on the toy backend and on Meta-World's MT1 reach-v3.

Each backend is asked the same questions: array shapes and dtypes, the true final observation at a
time limit, success at the step that reached the goal, a `get_state`/`set_state` round trip that
replays the same episodes, and a one-line error for a state saved for other tasks. The registry
lists the backends and rejects unknown names without building anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from mtrl import envs
from mtrl.config import EnvConfig
from mtrl.envs import EnvBackend, make_backend

STEPS = 4  # time limit of the training envs below


@dataclass
class Case:
    train: EnvBackend  # time limit STEPS, random goals
    evaluation: EnvBackend  # terminate on success, a longer time limit
    foreign_state: str  # a state saved for other tasks
    missing_task: str  # the task of `train` that `foreign_state` lacks
    expert: Callable[[np.ndarray], np.ndarray]  # actions that reach the goal
    # whether `next_obs` is the observation that `actions` led to from `obs` (an independent check)
    follows: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def toy_expert(obs: np.ndarray) -> np.ndarray:
    return np.clip((obs[:, 2:4] - obs[:, :2]) / 0.1, -1, 1).astype(np.float32)


def toy_follows(obs: np.ndarray, actions: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    # toy dynamics: pos' = clip(pos + 0.1 a, -1, 1); the goal stays
    moved = np.clip(obs[:, :2] + 0.1 * np.clip(actions, -1, 1), -1, 1)
    return np.isclose(next_obs[:, :2], moved, atol=1e-6).all(1) & (next_obs[:, 2:4] == obs[:, 2:4]).all(1)


def metaworld_follows(obs: np.ndarray, actions: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    # Meta-World observations carry the previous frame: next_obs[18:36] is obs[0:18]
    return (next_obs[:, 18:36] == obs[:, 0:18]).all(1)


def toy_case() -> Case:
    cfg = EnvConfig(benchmark="toy", toy_tasks=3, max_episode_steps=STEPS, num_goals=5)
    eval_cfg = EnvConfig(benchmark="toy", toy_tasks=3, max_episode_steps=30, num_goals=5)
    other = make_backend(EnvConfig(benchmark="toy", toy_tasks=2, num_goals=5), 0, evaluation=False)
    return Case(
        make_backend(cfg, 0, evaluation=False),
        make_backend(eval_cfg, 0, evaluation=True),
        other.get_state(),
        "toy-2",
        toy_expert,
        toy_follows,
    )


def metaworld_case() -> Case:
    from metaworld.policies import ENV_POLICY_MAP

    cfg = EnvConfig(benchmark="MT1", tasks=["reach-v3"], max_episode_steps=STEPS, num_goals=10)
    eval_cfg = EnvConfig(benchmark="MT1", tasks=["reach-v3"], max_episode_steps=150, num_goals=10)
    policy = ENV_POLICY_MAP["reach-v3"]()
    toy = make_backend(EnvConfig(benchmark="toy", toy_tasks=1), 0, evaluation=False)
    return Case(
        make_backend(cfg, 0, evaluation=False),
        make_backend(eval_cfg, 0, evaluation=True),
        toy.get_state(),
        "reach-v3",
        lambda obs: np.stack([policy.get_action(o[:39]) for o in obs]).astype(np.float32),
        metaworld_follows,
    )


@pytest.fixture(
    scope="module",
    params=["toy", pytest.param("metaworld", marks=pytest.mark.metaworld)],
)
def case(request) -> Case:
    made = toy_case() if request.param == "toy" else metaworld_case()
    yield made
    made.train.close()
    made.evaluation.close()


def random_actions(backend: EnvBackend, rng: np.random.Generator) -> np.ndarray:
    size = (backend.num_tasks, backend.act_dim)
    return rng.uniform(backend.action_low, backend.action_high, size).astype(np.float32)


def test_arrays_have_the_declared_shapes_and_dtypes(case):
    b = case.train
    k = b.num_tasks
    assert k == len(b.task_names) == b.vector_env.num_envs
    assert b.action_low.shape == b.action_high.shape == (b.act_dim,)
    assert b.action_low.dtype == b.action_high.dtype == np.float32 and (b.action_low < b.action_high).all()
    obs = b.reset(seed=0)
    assert obs.shape == (k, b.obs_dim) and obs.dtype == np.float32
    step = b.step(random_actions(b, np.random.default_rng(0)))
    for name, shape, dtype in [
        ("obs", (k, b.obs_dim), np.float32),
        ("next_obs", (k, b.obs_dim), np.float32),
        ("reward", (k,), np.float64),
        ("terminated", (k,), np.bool_),
        ("truncated", (k,), np.bool_),
        ("success", (k,), np.bool_),
    ]:
        value = getattr(step, name)
        assert isinstance(value, np.ndarray) and value.shape == shape and value.dtype == dtype, name


def test_next_obs_is_the_final_observation_at_the_time_limit(case):
    b = case.train
    rng = np.random.default_rng(1)
    obs = b.reset(seed=1)
    for t in range(1, 2 * STEPS + 1):
        actions = random_actions(b, rng)
        step = b.step(actions)
        assert case.follows(obs, actions, step.next_obs).all(), t
        assert not step.terminated.any()  # training envs never terminate
        if t % STEPS:
            assert not step.truncated.any()
            np.testing.assert_array_equal(step.next_obs, step.obs)
        else:  # every episode ends here; `obs` is the next episode's first observation
            assert step.truncated.all() and step.done.all()
            assert not case.follows(obs, actions, step.obs).any()
        obs = step.obs


def test_success_is_reported_at_the_step_that_reaches_the_goal(case):
    b = case.evaluation
    obs = b.reset(seed=0)
    succeeded = np.zeros(b.num_tasks, dtype=bool)
    for _ in range(150):
        step = b.step(case.expert(obs))
        # evaluation envs end an episode at its first success, which the same step reports
        np.testing.assert_array_equal(step.success, step.terminated)
        succeeded |= step.success
        obs = step.obs
        if succeeded.all():
            break
    assert succeeded.all()


def test_set_state_replays_the_same_episodes(case):
    b = case.train
    b.reset(seed=2)
    state = b.get_state()

    def episodes() -> list[np.ndarray]:
        rng = np.random.default_rng(3)
        seen = [b.reset()]
        for _ in range(2 * STEPS):
            step = b.step(random_actions(b, rng))
            seen += [step.obs, step.next_obs, step.reward]
        return seen

    first, carried_on = episodes(), episodes()
    b.set_state(state)
    replayed = episodes()
    for a, c in zip(first, replayed, strict=True):
        np.testing.assert_array_equal(a, c)
    # without the restore, the episodes go on with other goals (and toy starting points)
    assert any(not np.array_equal(a, c) for a, c in zip(first, carried_on, strict=True))


def test_a_state_saved_for_other_tasks_is_refused_in_one_line(case):
    with pytest.raises(ValueError) as err:
        case.train.set_state(case.foreign_state)
    assert str(err.value) == f"env state has no entry for task {case.missing_task!r}: it was saved for other tasks"


@pytest.mark.parametrize(
    "benchmark, strategy",
    [
        ("toy", "sync"),
        ("toy", "async"),
        ("toy", "pool"),
        pytest.param("MT1", "sync", marks=pytest.mark.metaworld),
        pytest.param("MT1", "async", marks=pytest.mark.metaworld),
        pytest.param("MT1", "pool", marks=pytest.mark.metaworld),
    ],
)
def test_step_async_then_step_wait_gives_what_step_gives(benchmark, strategy):
    cfg = EnvConfig(benchmark=benchmark, tasks=["reach-v3"], toy_tasks=3, max_episode_steps=STEPS, num_goals=5)
    reference = make_backend(cfg, 0, evaluation=False, vector_strategy="sync")
    split = make_backend(cfg, 0, evaluation=False, vector_strategy=strategy)
    try:
        np.testing.assert_array_equal(reference.reset(seed=0), split.reset(seed=0))
        rng, ends = np.random.default_rng(0), 0
        for _ in range(2 * STEPS + 2):
            actions = random_actions(reference, rng)
            expected = reference.step(actions)
            split.step_async(actions)
            actions[:] = 0  # the caller may reuse its array while the step is in flight
            got = split.step_wait()
            for name in ("obs", "next_obs", "reward", "terminated", "truncated", "success"):
                np.testing.assert_array_equal(getattr(expected, name), getattr(got, name), err_msg=name)
            ends += int(got.truncated.sum())
        assert ends == 2 * split.num_tasks  # every task crossed two time limits

        with pytest.raises(RuntimeError, match=r"^step_wait\(\) without a step_async\(\) before it$"):
            split.step_wait()
        split.step_async(actions)
        for call in (lambda: split.step_async(actions), split.reset, split.get_state):
            with pytest.raises(RuntimeError, match=r"while a step is in flight: call step_wait\(\) first$"):
                call()
        assert split.step_wait().obs.shape == (split.num_tasks, split.obs_dim)
    finally:
        reference.close()
        split.close()


def test_the_state_of_one_task_restores_that_task_only():
    backend = toy_case().train
    backend.reset(seed=0)
    task_1 = backend.get_state(tasks=[1])
    first = backend.reset()
    backend.set_state(task_1, tasks=[1])
    second = backend.reset()
    np.testing.assert_array_equal(second[1], first[1])  # task 1 starts over from its saved RNG
    assert not np.array_equal(second[0], first[0]) and not np.array_equal(second[2], first[2])


def test_same_seed_same_goal_sets_in_training_and_evaluation_backends():
    cfg = EnvConfig(benchmark="toy", toy_tasks=3, num_goals=5)
    train, evaluation, other = (make_backend(cfg, s, evaluation=e) for s, e in ((4, False), (4, True), (5, False)))
    for a, b in zip(train.goal_sets(), evaluation.goal_sets(), strict=True):
        assert a.shape == (5, 2)
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(train.goal_sets()[0], other.goal_sets()[0])


def test_the_registry_lists_the_benchmarks_and_rejects_unknown_names():
    assert envs.benchmarks() == ("MT1", "MT10", "MT25", "MT50", "custom", "toy")
    assert envs.backend_module("toy").__name__ == "mtrl.envs.toy"
    assert envs.backend_module("MT10").__name__ == "mtrl.envs.metaworld"
    known = "known: MT1, MT10, MT25, MT50, custom, toy"
    with pytest.raises(ValueError, match=f"^unknown benchmark 'MT7'; {known}$"):
        envs.backend_module("MT7")
    with pytest.raises(ValueError, match="^unknown benchmark 'gym'"):
        make_backend(EnvConfig(benchmark="gym"), 0, evaluation=False)
    assert envs.task_names(EnvConfig(benchmark="toy", toy_tasks=2)) == ["toy-0", "toy-1"]
    assert envs.task_names(EnvConfig(benchmark="custom", tasks=["push-v3", "reach-v3"])) == ["push-v3", "reach-v3"]
    envs.check_task_names("toy", ["anything"])  # the toy benchmark ignores env.tasks
    envs.check_task_names("MT10", ["anything"])  # ... and so does MT10


def test_the_registry_checks_metaworld_task_names():
    envs.check_task_names("custom", ["reach-v3", "push-v3"])
    with pytest.raises(ValueError, match=r"^unknown Meta-World task 'reach-v9' \(examples: reach-v3,"):
        envs.check_task_names("MT1", ["reach-v9"])
