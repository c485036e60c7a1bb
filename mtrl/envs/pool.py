"""`EnvPool`: a gymnasium vector env that runs K sub-envs on W worker processes, several per worker.

gymnasium's `SyncVectorEnv` steps every sub-env on one core; its `AsyncVectorEnv` gives each sub-env
a process of its own, which oversubscribes the cores once K exceeds them (MT50) and pays a pipe round
trip and a pickled observation per sub-env and step. The pool sits between the two:

- W worker processes (by default one per usable core, at most K) each own a share of the sub-envs,
  round-robin (`0,2,4.. | 1,3,5..`, the default) or contiguous (`0..4 | 5..9`), and step them one
  after another. A lockstep step lasts as long as the busiest worker's share; neighbours in
  Meta-World's task lists are often alike in cost (push and pick-place, the drawers, the windows),
  so round-robin spreads the costly ones better than contiguous chunks do;
- actions, observations, final observations, rewards and the done flags live in one shared-memory
  block that both sides view as numpy arrays, so a step costs one short command per worker and one
  reply that carries only the sub-envs' info dicts;
- each sub-env is built inside its worker. The constructors may come from a generator: a worker
  starts building its sub-env as soon as the generator yields its constructor, while the parent goes
  on producing the next ones, and the workers build theirs in parallel.

It behaves as `AsyncVectorEnv(..., autoreset_mode=AutoresetMode.SAME_STEP)`: the same observations,
rewards, flags and infos (`final_obs`/`final_info` where an episode ended, with the reset's info
merged in), `reset(seed=s)` seeds sub-env i with `s + i`, and `call`, `get_attr`, `set_attr`,
`step_async`/`step_wait` work as there. The spaces must be Boxes (fixed-size numeric arrays).
A sub-env that raises re-raises in the caller with its own exception type and one line naming the
sub-env (the worker's traceback is attached as a note); a worker that dies is a one-line
`EnvPoolError`, never a hang; `close` ends every worker within its timeout, terminating stragglers.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

CHUNKINGS = ("round_robin", "contiguous")
_PARENT_CHECK_S = 1.0  # how often an idle worker checks that its parent is still alive
_FORBIDDEN_CALLS = ("reset", "step", "close", "_setattr", "_check_spaces")
_REAL = (int, float, bool, np.integer, np.floating, np.bool_)

Layout = list[tuple[str, tuple[int, ...], str, int]]  # (name, shape, dtype, byte offset) per shared array


class EnvPoolError(RuntimeError):
    """A worker of the pool died, or the pool is unusable after an earlier failure."""


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def assign(num_envs: int, workers: int, chunking: str = "round_robin") -> list[list[int]]:
    """The sub-envs of each worker: every `workers`-th sub-env, or near-equal contiguous chunks."""
    if chunking not in CHUNKINGS:
        raise ValueError(f"chunking must be one of {', '.join(CHUNKINGS)}; found {chunking!r}")
    if chunking == "contiguous":
        return [[int(i) for i in chunk] for chunk in np.array_split(np.arange(num_envs), workers)]
    return [list(range(w, num_envs, workers)) for w in range(workers)]


def _layout(num_envs: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype, act_shape: tuple[int, ...]) -> Layout:
    # Actions and final observations are kept in float64, which holds float32 (and small ints)
    # exactly: each side converts to the dtype the caller or the sub-env used, so nothing is rounded.
    arrays = [
        ("actions", (num_envs, *act_shape), "f8"),
        ("obs", (num_envs, *obs_shape), np.dtype(obs_dtype).str),
        ("final_obs", (num_envs, *obs_shape), "f8"),
        ("reward", (num_envs,), "f8"),
        ("terminated", (num_envs,), "?"),
        ("truncated", (num_envs,), "?"),
    ]
    layout, offset = [], 0
    for name, shape, dtype in arrays:
        layout.append((name, shape, dtype, offset))
        offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 8) * 8  # 8-byte aligned
    return layout


def _size(layout: Layout) -> int:
    name, shape, dtype, offset = layout[-1]
    return max(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize, 1)


def _views(buffer: memoryview, layout: Layout) -> dict[str, np.ndarray]:
    return {name: np.ndarray(shape, dtype, buffer=buffer, offset=offset) for name, shape, dtype, offset in layout}


class EnvPool(gym.vector.VectorEnv):
    """K sub-envs on W worker processes with shared-memory arrays; see the module docstring.

    `env_fns` yields one constructor per sub-env (any callable that cloudpickle can ship); pass
    `num_envs` when it is a generator. `workers=0` means min(K, usable cores). `close_timeout`
    bounds `close`: workers still running after it are terminated.
    """

    def __init__(
        self,
        env_fns: Iterable[Callable[[], gym.Env]],
        num_envs: int | None = None,
        workers: int = 0,
        chunking: str = "round_robin",
        context: str | None = None,
        close_timeout: float = 10.0,
    ):
        self.closed = True  # until the workers exist: nothing for __del__ to close
        if num_envs is None:
            if not hasattr(env_fns, "__len__"):
                raise ValueError("give num_envs when env_fns is not a sequence")
            num_envs = len(env_fns)  # type: ignore[arg-type]
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, found {num_envs}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per usable core), found {workers}")
        self.num_envs = num_envs
        self.workers = min(workers or usable_cores(), num_envs)
        self.assignment = assign(num_envs, self.workers, chunking)
        self.close_timeout = close_timeout
        self._pipes: list[Connection] = []
        self._processes: list[mp.process.BaseProcess] = []
        self._shm: SharedMemory | None = None
        self._views: dict[str, np.ndarray] = {}
        self._pending: str | None = None
        self._broken: str | None = None

        ctx = mp.get_context(context)
        # Workers must share the parent's resource tracker: one they started themselves would unlink
        # the shared block again when they exit (and warn about a leak).
        resource_tracker.ensure_running()
        self.closed = False
        try:
            for w in range(self.workers):
                parent_end, child_end = ctx.Pipe()
                process = ctx.Process(
                    target=_worker, name=f"EnvPool-worker-{w}", args=(child_end, parent_end, os.getpid()), daemon=True
                )
                process.start()
                child_end.close()  # the worker now holds the only child end: its death reads as EOF here
                self._pipes.append(parent_end)
                self._processes.append(process)
            self._build(env_fns)
        except BaseException:
            self.close_extras(terminate=True)
            self.closed = True
            raise

    # ----- construction ---------------------------------------------------------------------------
    def _build(self, env_fns: Iterable[Callable[[], gym.Env]]) -> None:
        owner = {i: w for w, chunk in enumerate(self.assignment) for i in chunk}
        sent = 0
        for i, fn in enumerate(env_fns):
            if i >= self.num_envs:
                raise ValueError(f"env_fns yields more than num_envs={self.num_envs} constructors")
            self._send(owner[i], ("make", (i, cloudpickle.dumps(fn))))
            sent += 1
        if sent != self.num_envs:
            raise ValueError(f"env_fns yields {sent} constructors for num_envs={self.num_envs}")
        built = self._gather("make", count=[len(c) for c in self.assignment])
        spaces = [s for replies in built for s in replies]
        obs_space, act_space, metadata, render_mode = spaces[0]
        for name, space in (("observation", obs_space), ("action", act_space)):
            if not isinstance(space, gym.spaces.Box):
                raise ValueError(f"the env pool needs Box spaces; the {name} space is {space}")
        for other_obs, other_act, _, _ in spaces[1:]:
            if other_obs != obs_space or other_act != act_space:
                raise ValueError("the env pool needs the same observation and action spaces in every sub-env")
        self.single_observation_space, self.single_action_space = obs_space, act_space
        self.observation_space = batch_space(obs_space, self.num_envs)
        self.action_space = batch_space(act_space, self.num_envs)
        self.metadata = {**metadata, "autoreset_mode": AutoresetMode.SAME_STEP}
        self.render_mode = render_mode

        layout = _layout(self.num_envs, obs_space.shape, obs_space.dtype, act_space.shape)
        self._shm = SharedMemory(create=True, size=_size(layout))
        self._views = _views(self._shm.buf, layout)
        self._broadcast(("attach", (self._shm.name, layout)))
        self._gather("attach")

    # ----- the vector env interface -------------------------------------------------------------
    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        self._check_idle("reset")
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"{len(seeds)} seeds for num_envs={self.num_envs}")
        if options is not None and "reset_mask" in options:
            raise ValueError("the env pool resets ended episodes in the same step; it takes no reset_mask")
        for w, chunk in enumerate(self.assignment):
            self._send(w, ("reset", ([seeds[i] for i in chunk], options)))
        infos = self._merge_infos(self._gather("reset", fatal=True))
        return self._views["obs"].copy(), infos

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Start a step of every sub-env; `step_wait` collects it."""
        self._check_idle("step_async")
        actions = np.asarray(actions)
        if actions.shape != self.action_space.shape or actions.dtype.kind not in "biuf":
            shape = self.action_space.shape
            raise ValueError(f"actions must be a numeric array of shape {shape}, found {actions.dtype} {actions.shape}")
        self._views["actions"][...] = actions
        self._broadcast(("step", (actions.dtype.str,)))
        self._pending = "step"

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """The step that `step_async` started, as `step` returns it."""
        self._check_open()
        if self._pending != "step":
            raise NoAsyncCallError("step_wait() without a step_async() before it", "step")
        self._pending = None
        replies = self._gather("step", fatal=True)
        v = self._views
        infos = self._merge_infos(replies, final_obs=v["final_obs"], done=v["terminated"] | v["truncated"])
        return v["obs"].copy(), v["reward"].copy(), v["terminated"].copy(), v["truncated"].copy(), infos

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """`name(*args, **kwargs)` on every sub-env (or the attribute's value), in sub-env order."""
        self._check_idle("call")
        if name in _FORBIDDEN_CALLS:
            raise ValueError(f"use the pool's own `{name}` instead of call({name!r})")
        self._broadcast(("call", (name, args, kwargs)))
        return tuple(self._in_env_order(self._gather("call")))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | object) -> None:
        """Set `name` on every sub-env: one value for all, or a list with one per sub-env."""
        self._check_idle("set_attr")
        if not isinstance(values, list | tuple):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"{len(values)} values for num_envs={self.num_envs}")
        for w, chunk in enumerate(self.assignment):
            self._send(w, ("setattr", (name, [values[i] for i in chunk])))
        self._gather("setattr")

    def render(self) -> tuple[Any, ...]:
        return self.call("render")

    @property
    def pids(self) -> list[int | None]:
        """The worker processes' ids, worker w first."""
        return [p.pid for p in self._processes]

    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Stop the workers (they close their sub-envs); terminate those still running after `timeout`."""
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        if not terminate:
            for pipe in self._pipes:
                with contextlib.suppress(OSError, ValueError):  # the worker is gone already
                    pipe.send(("close", None))
        for process in self._processes:
            if not terminate:
                process.join(max(deadline - time.monotonic(), 0))
            if process.is_alive():
                process.terminate()
                process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self._pipes:
            pipe.close()
        self._views = {}
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None
        self._pending = None

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            self.close(terminate=True)

    # ----- messages -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError("the env pool is closed")
        if self._broken is not None:
            raise EnvPoolError(f"the env pool is unusable after an earlier failure: {self._broken}")

    def _check_idle(self, what: str) -> None:
        self._check_open()
        if self._pending is not None:
            raise AlreadyPendingCallError(f"{what}() while a {self._pending} is in flight", self._pending)

    def _send(self, w: int, message: tuple[str, Any]) -> None:
        try:
            self._pipes[w].send(message)
        except OSError:  # the worker is gone
            raise self._dead(w) from None

    def _broadcast(self, message: tuple[str, Any]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # pickled once for all workers
        for w, pipe in enumerate(self._pipes):
            try:
                pipe.send_bytes(data)
            except OSError:
                raise self._dead(w) from None

    def _dead(self, w: int) -> EnvPoolError:
        process = self._processes[w]
        process.join(1.0)
        envs = ", ".join(map(str, self.assignment[w]))
        self._broken = f"env pool worker {w} (sub-envs {envs}) died (exit code {process.exitcode})"
        return EnvPoolError(self._broken)

    def _gather(self, what: str, count: list[int] | None = None, fatal: bool = False) -> list[Any]:
        """Each worker's reply (`count[w]` replies from worker w: a list), in worker order.

        Waits on all workers at once, and on their deaths. A failure is raised once every live worker
        has answered, so that no stale reply is left for the next command; with several, the lowest
        worker's. `fatal`: a sub-env that raised leaves the pool unusable (its sub-envs went out of step).
        """
        need = [1] * self.workers if count is None else list(count)
        got: list[list[Any]] = [[] for _ in range(self.workers)]
        failures: dict[int, Exception] = {}
        waiting = {w for w in range(self.workers) if need[w] > 0}
        while waiting:
            handles = {self._pipes[w]: w for w in waiting} | {self._processes[w].sentinel: w for w in waiting}
            for w in sorted({handles[h] for h in wait(list(handles))}):
                pipe, gone = self._pipes[w], False
                while w in waiting and pipe.poll():  # a reply sent just before dying still counts
                    try:
                        status, payload = pipe.recv()
                    except (EOFError, OSError):  # closed, or reset when it died with a command unread
                        gone = True
                        break
                    if status == "ok":
                        got[w].append(payload)
                    else:
                        failures.setdefault(w, _worker_error(w, what, *payload))
                    need[w] -= 1
                    if need[w] == 0:
                        waiting.discard(w)
                if w in waiting and (gone or not self._processes[w].is_alive()):
                    failures.setdefault(w, self._dead(w))
                    waiting.discard(w)
        if failures:
            failure = failures[min(failures)]
            if fatal or what == "make":
                self._broken = self._broken or str(failure)
            raise failure
        return [g[0] for g in got] if count is None else got

    def _in_env_order(self, per_worker: list[list[Any]]) -> list[Any]:
        ordered: list[Any] = [None] * self.num_envs
        for chunk, values in zip(self.assignment, per_worker, strict=True):
            for i, value in zip(chunk, values, strict=True):
                ordered[i] = value
        return ordered

    def _merge_infos(
        self, per_worker: list[list[dict]], final_obs: np.ndarray | None = None, done: np.ndarray | None = None
    ) -> dict[str, Any]:
        """The sub-envs' infos batched as gymnasium's vector envs batch them (`VectorEnv._add_info`)."""
        infos = self._in_env_order(per_worker)
        if done is not None:
            for i in np.flatnonzero(done):
                # the worker left the final observation in shared memory and its dtype in the info
                infos[i]["final_obs"] = final_obs[i].astype(infos[i]["final_obs"])
        batched = _batch_flat_infos(infos)
        if batched is None:
            batched = {}
            for i, info in enumerate(infos):
                batched = self._add_info(batched, info, i)
        return batched


def _batch_flat_infos(infos: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`_add_info`'s result in one array per key, when every sub-env reported the same keys with plain
    numbers (the usual step, where no episode ended); None otherwise.

    gymnasium fills an array of the first value's type element by element. `np.array(values, dtype=type)`
    casts the same way, at a fraction of the cost for large K, when the values share that type or,
    for a float array, are any real numbers (Meta-World mixes floats, bools and ints under one key).
    """
    keys = infos[0].keys()
    if any(info.keys() != keys for info in infos):
        return None
    batched: dict[str, Any] = {}
    for key in keys:
        values = [info[key] for info in infos]
        kind = type(values[0])
        if not (kind in (int, float, bool) or issubclass(kind, np.number)):
            return None
        if issubclass(kind, float | np.floating):
            if not all(isinstance(v, _REAL) for v in values):
                return None
        elif any(type(v) is not kind for v in values):
            return None
        batched[key] = np.array(values, dtype=kind)
        batched[f"_{key}"] = np.ones(len(infos), dtype=np.bool_)
    return batched


def _worker_error(w: int, what: str, index: int | None, exc_type: Any, message: str, trace: str) -> Exception:
    where = f"sub-env {index} (env pool worker {w})" if index is not None else f"env pool worker {w}"
    text = f"{message} [in {what} of {where}]"
    try:
        err = exc_type(text) if isinstance(exc_type, type) and issubclass(exc_type, Exception) else None
    except Exception:
        err = None
    err = err if isinstance(err, Exception) else RuntimeError(f"{getattr(exc_type, '__name__', exc_type)}: {text}")
    if hasattr(err, "add_note"):  # Python >= 3.11: the worker's traceback shows under the caller's
        err.add_note(f"worker traceback:\n{trace}")
    return err


# ----- the worker process ---------------------------------------------------------------------------
class _Worker:
    """A worker's sub-envs and the commands it serves; `current` names the sub-env being run (for errors)."""

    def __init__(self) -> None:
        self.envs: list[tuple[int, gym.Env]] = []
        self.shm: SharedMemory | None = None
        self.v: dict[str, np.ndarray] = {}
        self.current: int | None = None

    def make(self, index: int, fn: bytes) -> tuple[Any, ...]:
        self.current = index
        env = pickle.loads(fn)()
        self.envs.append((index, env))
        return env.observation_space, env.action_space, dict(env.metadata), env.render_mode

    def attach(self, name: str, layout: Layout) -> None:
        self.shm = SharedMemory(name=name)
        self.v = _views(self.shm.buf, layout)

    def reset(self, seeds: list[int | None], options: dict[str, Any] | None) -> list[dict]:
        infos = []
        for (i, env), seed in zip(self.envs, seeds, strict=True):
            self.current = i
            obs, info = env.reset(seed=seed, options=options)
            self.v["obs"][i] = obs
            infos.append(info)
        return infos

    def step(self, dtype: str) -> list[dict]:
        v, infos = self.v, []
        for i, env in self.envs:
            self.current = i
            obs, reward, terminated, truncated, info = env.step(v["actions"][i].astype(dtype))
            if terminated or truncated:  # same-step autoreset, as gymnasium's AsyncVectorEnv does it
                final = np.asarray(obs)
                v["final_obs"][i] = final
                obs, reset_info = env.reset()
                info = {"final_info": info, "final_obs": final.dtype.str, **reset_info}
            v["obs"][i] = obs
            v["reward"][i] = reward
            v["terminated"][i] = terminated
            v["truncated"][i] = truncated
            infos.append(info)
        return infos

    def call(self, name: str, args: tuple, kwargs: dict) -> list[Any]:
        results = []
        for i, env in self.envs:
            self.current = i
            attr = env.get_wrapper_attr(name)
            results.append(attr(*args, **kwargs) if callable(attr) else attr)
        return results

    def setattr(self, name: str, values: list[Any]) -> None:
        for (i, env), value in zip(self.envs, values, strict=True):
            self.current = i
            env.set_wrapper_attr(name, value)

    def close(self) -> None:
        for _, env in self.envs:
            with contextlib.suppress(Exception):  # closing must go on for the other sub-envs
                env.close()
        self.v = {}
        if self.shm is not None:
            self.shm.close()


def _worker(pipe: Connection, parent_end: Connection, parent_pid: int) -> None:
    parent_end.close()
    # Ctrl-C reaches the whole process group; the parent decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = _Worker()
    try:
        while True:
            while not pipe.poll(_PARENT_CHECK_S):
                if os.getppid() != parent_pid:  # the parent died without closing the pool
                    return
            command, data = pipe.recv()
            if command == "close":
                break
            worker.current = None
            try:
                pipe.send(("ok", getattr(worker, command)(*data)))
            except Exception as err:
                exc_type: Any = type(err)
                try:
                    pickle.dumps(exc_type)
                except Exception:
                    exc_type = type(err).__name__
                message = f"{type(err).__name__}: {err}" if not str(err) else str(err)
                pipe.send(("error", (worker.current, exc_type, message, traceback.format_exc())))
    except (EOFError, OSError):  # the parent closed its end
        pass
    finally:
        worker.close()
