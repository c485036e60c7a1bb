"""`EnvPool` (`env.vector_strategy=pool`): the same env steps as the sync and async strategies, and failures that end.

The pool must give bit-identical steps, infos (`final_obs`/`final_info` at the autoreset), seeds,
states and goal sets to gymnasium's vector envs over episodes with time limits and resets, for
any split of the sub-envs over the workers. Its failures must be one line and never a hang: a
sub-env that raises, a worker that dies, a sub-env whose `close` never returns.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError

from mtrl.config import EnvConfig
from mtrl.envs import make_backend
from mtrl.envs.pool import EnvPool, EnvPoolError, assign, usable_cores

FIELDS = ("obs", "next_obs", "reward", "terminated", "truncated", "success")


def assert_same(a, b, path: str = "") -> None:
    """Equal nested infos: same keys, equal arrays (dtype included), equal objects; wall-clock times aside."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for key in a:
            if not (key == "t" and path.endswith("episode")):  # the episode's wall-clock time
                assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, (path, a, b)
        if a.dtype == object:
            for x, y in zip(a, b, strict=True):
                assert_same(x, y, path)
        else:
            np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def assert_same_steps(a, b) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def toy(**kw) -> EnvConfig:
    return EnvConfig(**{"benchmark": "toy", "toy_tasks": 5, "max_episode_steps": 7, "num_goals": 5, **kw})


# ----- the same env steps as gymnasium's vector envs ------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_the_pool_steps_exactly_as_the_async_vector_env_infos_included(workers):
    cfg = toy(workers=workers)
    ref = make_backend(cfg, 3, evaluation=False, vector_strategy="async").vector_env
    pool = make_backend(cfg, 3, evaluation=False, vector_strategy="pool").vector_env
    assert isinstance(pool, EnvPool) and pool.workers == workers
    try:
        for x, y in zip(ref.reset(seed=3), pool.reset(seed=3), strict=True):
            assert_same(x, y)
        rng = np.random.default_rng(0)
        ended = 0
        for _ in range(30):  # four episodes of 7 steps and a bit
            actions = rng.uniform(-1, 1, (5, 2)).astype(np.float32)
            expected, got = ref.step(actions), pool.step(actions)
            for x, y in zip(expected, got, strict=True):
                assert_same(x, y)
            ended += int("final_obs" in got[4])
        assert ended == 4
    finally:
        ref.close()
        pool.close()


@pytest.mark.parametrize("chunking", ["contiguous", "round_robin"])
def test_backend_steps_states_and_goals_equal_the_sync_strategy(chunking):
    cfg = toy()
    sync = make_backend(cfg, 5, evaluation=False, vector_strategy="sync")
    fns = [partial(_toy_sub_env, i, cfg, 5) for i in range(5)]
    pool_backend = type(sync)(EnvPool(fns, workers=2, chunking=chunking), sync.task_names)
    try:
        assert pool_backend.vector_env.assignment == assign(5, 2, chunking)
        for a, b in zip(sync.goal_sets(), pool_backend.goal_sets(), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sync.reset(seed=5), pool_backend.reset(seed=5))
        rng = np.random.default_rng(1)
        for t in range(300):
            actions = rng.uniform(-1, 1, (5, 2)).astype(np.float32)
            assert_same_steps(sync.step(actions), pool_backend.step(actions))
            if t % 50 == 0:
                assert pool_backend.get_state() == sync.get_state()
        np.testing.assert_array_equal(sync.reset(), pool_backend.reset())  # unseeded: each goes on from its RNG
    finally:
        sync.close()
        pool_backend.close()


def _toy_sub_env(i: int, cfg: EnvConfig, seed: int) -> gym.Env:
    from mtrl.envs.toy import _toy_env

    return _toy_env(i, cfg, seed, False, {})


def test_evaluation_envs_sweep_the_same_goals_and_end_on_success_as_sync():
    cfg = toy(max_episode_steps=12)
    sync = make_backend(cfg, 2, evaluation=True, vector_strategy="sync")
    pool = make_backend(cfg, 2, evaluation=True, vector_strategy="pool")
    try:
        obs = sync.reset(seed=2)
        np.testing.assert_array_equal(obs, pool.reset(seed=2))
        successes = 0
        for _ in range(100):
            actions = np.clip((obs[:, 2:4] - obs[:, :2]) / 0.1, -1, 1).astype(np.float32)
            expected, got = sync.step(actions), pool.step(actions)
            assert_same_steps(expected, got)
            successes += int(got.terminated.sum())
            obs = expected.obs
        assert successes > 10  # the expert reaches the goals, and the pool's episodes end there too
    finally:
        sync.close()
        pool.close()


def test_set_state_on_the_pool_replays_the_same_episodes():
    pool = make_backend(toy(), 0, evaluation=False, vector_strategy="pool")
    try:
        pool.reset(seed=0)
        state = pool.get_state()

        def episodes() -> list[np.ndarray]:
            rng = np.random.default_rng(3)
            seen = [pool.reset()]
            for _ in range(10):
                step = pool.step(rng.uniform(-1, 1, (5, 2)).astype(np.float32))
                seen += [step.obs, step.next_obs, step.reward]
            return seen

        first, carried_on = episodes(), episodes()
        pool.set_state(state)
        for a, b in zip(first, episodes(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert any(not np.array_equal(a, b) for a, b in zip(first, carried_on, strict=True))
    finally:
        pool.close()


def test_call_get_attr_and_set_attr_speak_to_every_sub_env_in_order():
    pool = make_backend(toy(workers=2), 0, evaluation=False, vector_strategy="pool").vector_env
    try:
        names = tuple(f"toy-{i}" for i in range(5))
        assert pool.call("task_name") == names == pool.get_attr("task_name")
        assert [name for name, _ in pool.call("get_checkpoint")] == list(names)
        pool.set_attr("terminate_on_success", [True, False, True, False, True])
        assert pool.get_attr("terminate_on_success") == (True, False, True, False, True)
        with pytest.raises(ValueError, match=r"^use the pool's own `step` instead of call\('step'\)$"):
            pool.call("step", None)
    finally:
        pool.close()


def test_actions_reach_the_sub_envs_in_the_dtype_they_were_given():
    pool = EnvPool([partial(Probe, i) for i in range(3)], workers=2)
    try:
        pool.reset(seed=0)
        for dtype in (np.float32, np.float64):
            actions = np.full((3, 2), 1 / 3, dtype=dtype)
            obs, *_, info = pool.step(actions)
            assert list(info["dtype"]) == [np.dtype(dtype).str] * 3
            np.testing.assert_array_equal(obs[:, :2], actions)  # no rounding on the way
    finally:
        pool.close()


def test_the_number_of_workers():
    for workers, expected in ((7, 3), (0, min(3, usable_cores()))):
        pool = EnvPool([partial(Probe, i) for i in range(3)], workers=workers)
        assert pool.workers == len(pool.pids) == expected
        pool.close()
    assert assign(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]  # round-robin
    assert assign(7, 3, "contiguous") == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match=r"^workers must be >= 0 \(0: one per usable core\), found -1$"):
        EnvPool([partial(Probe, 0)], workers=-1)


def test_the_config_selects_the_pool():
    from mtrl.config import ConfigError, load_config

    cfg = load_config(None, ["env.benchmark=toy", "env.vector_strategy=pool", "env.workers=2"])
    assert (cfg.env.vector_strategy, cfg.env.workers) == ("pool", 2)
    with pytest.raises(ConfigError, match=r"^env.workers must be >= 0, found -1$"):
        load_config(None, ["env.benchmark=toy", "env.workers=-1"])
    with pytest.raises(ConfigError, match=r"^env.vector_strategy must be one of sync, async, pool; found 'fork'$"):
        load_config(None, ["env.benchmark=toy", "env.vector_strategy=fork"])


# ----- the split step --------------------------------------------------------------------------------
def test_step_async_and_step_wait_are_checked():
    pool = EnvPool([partial(Probe, i) for i in range(2)], workers=2)
    try:
        pool.reset(seed=0)
        with pytest.raises(NoAsyncCallError):
            pool.step_wait()
        pool.step_async(np.zeros((2, 2), np.float32))
        with pytest.raises(AlreadyPendingCallError):
            pool.step_async(np.zeros((2, 2), np.float32))
        with pytest.raises(AlreadyPendingCallError):
            pool.call("t")
        assert list(pool.step_wait()[4]["t"]) == [1, 1]
        with pytest.raises(ValueError, match=r"^actions must be a numeric array of shape \(2, 2\), found"):
            pool.step_async(np.zeros((3, 2)))
    finally:
        pool.close()


# ----- failures: one line, never a hang ---------------------------------------------------------------
def test_a_sub_env_that_raises_re_raises_its_error_in_one_line():
    pool = EnvPool([partial(Probe, i) for i in range(4)], workers=2)
    try:
        pool.reset(seed=0)
        actions = np.zeros((4, 2))
        actions[3, 0] = -1000  # sub-env 3 raises
        with pytest.raises(ValueError) as err:
            pool.step(actions)
        assert str(err.value) == "probe 3 refuses -1000.0 [in step of sub-env 3 (env pool worker 1)]"
        with pytest.raises(EnvPoolError, match=r"^the env pool is unusable after an earlier failure: probe 3"):
            pool.step(np.zeros((4, 2)))
    finally:
        pool.close()


def test_a_call_that_raises_leaves_the_pool_usable():
    pool = EnvPool([partial(Probe, i) for i in range(2)], workers=2)
    try:
        pool.reset(seed=0)
        with pytest.raises(AttributeError) as err:
            pool.call("no_such_method")
        where = "[in call of sub-env 0 (env pool worker 0)]"
        assert str(err.value) == f"'Probe' object has no attribute 'no_such_method' {where}"
        assert list(pool.step(np.zeros((2, 2)))[4]["t"]) == [1, 1]
    finally:
        pool.close()


def test_a_worker_that_dies_is_a_one_line_error_not_a_hang():
    pool = EnvPool([partial(Probe, i) for i in range(4)], workers=2)
    try:
        pool.reset(seed=0)
        actions = np.zeros((4, 2))
        actions[1, 0] = 1000  # sub-env 1 exits its process mid-step
        with pytest.raises(EnvPoolError) as err:
            pool.step(actions)
        assert str(err.value) == "env pool worker 1 (sub-envs 1, 3) died (exit code 3)"
        os.kill(pool.pids[0], signal.SIGKILL)  # the other worker, killed from outside while idle
        with pytest.raises(EnvPoolError, match="^the env pool is unusable after an earlier failure: env pool worker 1"):
            pool.reset()
    finally:
        pool.close()
    assert pool.closed


def test_a_worker_killed_between_steps_is_reported_at_the_next_step():
    pool = EnvPool([partial(Probe, i) for i in range(4)], workers=2)
    try:
        pool.reset(seed=0)
        os.kill(pool.pids[1], signal.SIGKILL)
        with pytest.raises(EnvPoolError, match=r"^env pool worker 1 \(sub-envs 1, 3\) died \(exit code -9\)$"):
            pool.step(np.zeros((4, 2)))
    finally:
        pool.close()


def test_a_constructor_that_raises_fails_the_pool_and_leaves_no_worker():
    fns = [partial(Probe, 0), partial(Probe, 1, fail_on_init=True)]
    with pytest.raises(RuntimeError) as err:
        EnvPool(fns, workers=2)
    assert str(err.value) == "probe 1 cannot start [in make of sub-env 1 (env pool worker 1)]"
    assert not [p for p in mp.active_children() if p.name.startswith("EnvPool-worker")]


def test_close_ends_every_worker_and_a_stuck_one_within_the_timeout():
    pool = EnvPool([partial(Probe, 0), partial(Probe, 1, hang_on_close=True)], workers=2, close_timeout=1.0)
    pids = pool.pids
    pool.reset(seed=0)
    pool.step_async(np.zeros((2, 2)))  # closing with a step in flight is fine too
    start = time.monotonic()
    pool.close()
    assert time.monotonic() - start < 5
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ClosedEnvironmentError):
        pool.reset()
    pool.close()  # closing twice is harmless


class Probe(gym.Env):
    """A sub-env that shows what reached it: its observation is the action; misbehaves on request.

    An action below -100 raises a ValueError, above 100 exits the process; episodes last 3 steps.
    """

    def __init__(self, index: int, fail_on_init: bool = False, hang_on_close: bool = False):
        if fail_on_init:
            raise RuntimeError(f"probe {index} cannot start")
        self.index, self.hang_on_close, self.t = index, hang_on_close, 0
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
        self.action_space = gym.spaces.Box(-1e4, 1e4, (2,), np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 0.0, self.index]), {}

    def step(self, action):
        if action[0] < -100:
            raise ValueError(f"probe {self.index} refuses {float(action[0])}")
        if action[0] > 100:
            os._exit(3)
        self.t += 1
        obs = np.array([action[0], action[1], self.index], dtype=np.float64)
        return obs, float(self.t), False, self.t == 3, {"dtype": action.dtype.str, "t": self.t}

    def close(self):
        while self.hang_on_close:
            time.sleep(1)


# ----- training on the pool: the same numbers --------------------------------------------------------------
def test_training_on_the_pool_gives_the_metrics_of_sync_also_across_a_resume(tmp_path):
    import json

    import yaml

    from mtrl.cli import main
    from tests.conftest import TOY_OVERRIDES, nested_config

    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump(nested_config([*TOY_OVERRIDES, "checkpoint.save_buffer=true"])))

    def metrics(run_dir) -> list[dict]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in lines]

    assert main(["train", "--config", str(preset), f"run.dir={tmp_path / 'sync'}"]) == 0
    pool_run = [f"run.dir={tmp_path / 'pool'}", "env.vector_strategy=pool", "env.workers=2"]
    assert main(["train", "--config", str(preset), *pool_run, "train.total_steps=100"]) == 0
    assert main(["train", "--resume", str(tmp_path / "pool"), "train.total_steps=200"]) == 0
    expected = metrics(tmp_path / "sync")
    assert len(expected) == 12 and metrics(tmp_path / "pool") == expected


# ----- Meta-World ---------------------------------------------------------------------------------------
@pytest.mark.metaworld
def test_mt10_pool_is_bit_identical_to_sync():
    cfg = EnvConfig(benchmark="MT10", max_episode_steps=20, num_goals=5, workers=3)
    sync = make_backend(cfg, 7, evaluation=False, vector_strategy="sync")
    pool = make_backend(cfg, 7, evaluation=False, vector_strategy="pool")
    try:
        assert pool.vector_env.workers == 3 and pool.task_names == sync.task_names
        for a, b in zip(sync.goal_sets(), pool.goal_sets(), strict=True):
            assert a.shape[0] == 5
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sync.reset(seed=7), pool.reset(seed=7))
        assert pool.get_state() == sync.get_state()
        rng = np.random.default_rng(0)
        ends = 0
        for t in range(100):
            actions = rng.uniform(-1, 1, (10, 4)).astype(np.float32)
            if t < 40:  # the gymnasium level: observations, rewards, flags and every info
                expected, got = sync.vector_env.step(actions), pool.vector_env.step(actions)
                for x, y in zip(expected, got, strict=True):
                    assert_same(x, y)
                ends += int(got[3].sum())
            else:  # the backend level: the Steps the trainer sees
                expected, got = sync.step(actions), pool.step(actions)
                assert_same_steps(expected, got)
                ends += int(got.truncated.sum())
        assert ends == 50  # five time limits of every task
        assert pool.get_state() == sync.get_state()
    finally:
        sync.close()
        pool.close()
