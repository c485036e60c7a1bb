"""The training loop: collect -> update -> evaluate -> log -> checkpoint.

Randomness flows from two explicit generators seeded from `cfg.seed` (one on the CPU for
warm-up actions and the combiners, one on the training device for sampling and policy noise),
plus the envs' own seeded RNGs. A checkpoint holds all of their states, so resuming from a
checkpoint taken at an episode boundary continues bit for bit; from any other step, the
episode that was in progress restarts from its beginning with the same goal.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtrl import checkpoint as ckpt
from mtrl.buffer import Batch, MultiTaskReplayBuffer
from mtrl.combiners import make_combiner
from mtrl.config import Config, ConfigError, config_from_dict, to_dict, to_yaml
from mtrl.envs import env_checkpoint, load_env_checkpoint, make_envs, task_names
from mtrl.evaluation import EvalResult, Evaluator, reported
from mtrl.logger import MetricLogger, log
from mtrl.optim import Optimization
from mtrl.policy import Policy
from mtrl.sac import MTSAC, SACUpdate, UpdateResult


class Callback:
    """Hooks into the loop, as in Stable-Baselines3: subclass and override what you need.

    `on_update` sees every update's result (finite or not) before the trainer acts on it,
    `on_eval` every evaluation's result, `on_checkpoint` the path of every checkpoint written.
    """

    def on_update(self, trainer: Trainer, result: UpdateResult) -> None:
        return None

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        return None

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        return None


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite updates in a row)."""


@dataclass
class Counters:
    env_steps: int = 0  # vector steps
    updates: int = 0
    bad_updates: int = 0  # non-finite updates skipped, in total
    bad_streak: int = 0  # ... in a row
    episodes: int = 0  # per task (all tasks end their episodes together in training)
    best_success: float = -1.0


def set_cpu_threads(requested: int = 0) -> int:
    """Torch's intra-op threads; 0 means half the cores.

    Torch's worker threads spin-wait for each other: when envs or other processes hold the cores
    they wait on, an update can take 100x longer (measured: 7 ms -> 1.3 s on 2 busy cores).
    """
    threads = requested or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    return threads


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, callbacks: Sequence[Callback] = ()):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.callbacks = list(callbacks)
        self.device = resolve_device(cfg.device)
        # Tiny activations late in training turn into subnormal floats, which x86 CPUs compute
        # many times slower; flushing them to zero changes no result that matters.
        torch.set_flush_denormal(True)
        set_cpu_threads(cfg.train.torch_threads)
        self.tasks = task_names(cfg.env)
        self.num_tasks = len(self.tasks)
        self.counters = Counters()

        self.envs = make_envs(cfg.env, cfg.seed, evaluation=False)
        # The evaluation envs are separate instances holding the same goal sets (the same seed):
        # MT10/MT50 measure how well the agent solves the tasks it trains on.
        self.evaluator = Evaluator(
            make_envs(cfg.env, cfg.seed, evaluation=True, vector_strategy=cfg.eval.vector_strategy),
            self.tasks,
            cfg.eval.episodes,
        )
        self.eval_envs = self.evaluator.envs
        if self.envs.num_envs != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} sub-envs, found {self.envs.num_envs}")
        self.obs_dim = int(np.prod(self.envs.single_observation_space.shape))
        self.act_dim = int(np.prod(self.envs.single_action_space.shape))
        self.act_low = torch.as_tensor(self.envs.single_action_space.low, dtype=torch.float32)
        self.act_high = torch.as_tensor(self.envs.single_action_space.high, dtype=torch.float32)

        self.gen_cpu = torch.Generator().manual_seed(cfg.seed)
        self.gen_device = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.combiner = make_combiner(cfg.combiner.name, **cfg.combiner.hyper_parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # weight initialisation only; the global RNG is restored after
            self.agent = MTSAC(self.obs_dim, self.act_dim, self.num_tasks, cfg.agent).to(self.device)
        self.optimization = Optimization(
            self.agent.params, cfg.optimizer.name, self.agent.learning_rates, self.num_tasks, cfg.train.grad_clip_norm
        )
        self.learner = SACUpdate(
            self.agent, self.optimization, self.combiner, cfg.combiner.networks, cfg.train.q_target_clip
        )
        self.buffer = MultiTaskReplayBuffer(
            self.num_tasks,
            max(1, cfg.train.buffer_capacity // self.num_tasks),
            self.obs_dim,
            self.act_dim,
            self._buffer_device(),
        )
        self.learning_starts = cfg.train.warmup_steps  # no update before the buffer holds this many steps
        self.episode_start_env_state: str | None = None  # None: the first reset, from the seed
        self.last_eval: EvalResult | None = None
        self._stop_signal: int | None = None

        # A fresh run starts at step 0: like a resume, it drops whatever was logged after its
        # starting step, here by an attempt that was killed before its first checkpoint.
        start_step = self._restore() if resume else 0
        # Only now that the run will start (a rejected resume writes nothing): temporaries of
        # checkpoint writes cut short by a kill.
        ckpt.remove_partial_writes(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_tmp = self.run_dir / ".config.yaml.tmp"
        config_tmp.write_text(to_yaml(cfg))
        os.replace(config_tmp, self.run_dir / "config.yaml")
        self.logger = MetricLogger(self.run_dir, self.tasks, cfg.log.tensorboard, start_step)

    # ----- set-up helpers ------------------------------------------------------------------
    def _buffer_device(self) -> torch.device:
        choice = self.cfg.train.buffer_device
        if choice != "auto":
            return torch.device(choice)
        if self.device.type != "cuda":
            return self.device
        per_task = max(1, self.cfg.train.buffer_capacity // self.num_tasks)
        need = MultiTaskReplayBuffer.nbytes(self.num_tasks, per_task, self.obs_dim, self.act_dim)
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < 0.5 * free else torch.device("cpu")

    def state(self) -> dict:
        c = self.counters
        state = {
            "config": to_dict(self.cfg),
            "dims": {"obs": self.obs_dim, "act": self.act_dim, "tasks": self.num_tasks},
            "task_names": list(self.tasks),
            "counters": dict(vars(c)),
            "agent": self.agent.state_dict(),
            "optimizers": self.optimization.state_dict(),
            "combiner": self.combiner.state_dict(),
            "rng": {"cpu": self.gen_cpu.get_state(), "device": self.gen_device.get_state()},
            "env_state": self.episode_start_env_state,
            "last_eval": None if self.last_eval is None else self.last_eval.to_dict(),
        }
        if self.cfg.checkpoint.save_buffer:
            state["buffer"] = self.buffer.state_dict()
        return state

    def _restore(self) -> int:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise ckpt.CheckpointError(f"no checkpoint to resume from in {self.run_dir}")
        state = ckpt.load(path, map_location="cpu")
        saved_cfg = config_from_dict(state["config"])
        if state["task_names"] != self.tasks or state["dims"] != {
            "obs": self.obs_dim,
            "act": self.act_dim,
            "tasks": self.num_tasks,
        }:
            raise ckpt.CheckpointError(f"{path} was saved for other tasks or dimensions than this config")
        if saved_cfg.agent != self.cfg.agent or saved_cfg.combiner.name != self.cfg.combiner.name:
            raise ckpt.CheckpointError(f"{path} was saved with another agent or combiner config")
        step = state["counters"]["env_steps"]
        if step > self.cfg.train.total_steps:
            raise ConfigError(
                f"train.total_steps must be >= the step of the checkpoint ({step}), found {self.cfg.train.total_steps}"
            )
        try:
            self.agent.load_state_dict(state["agent"])
            self.optimization.load_state_dict(state["optimizers"])
            self.combiner.load_state_dict(state["combiner"])
            if "buffer" in state:
                self.buffer.load_state_dict(state["buffer"])
            else:  # the replay buffer starts empty: refill it before learning again
                self.learning_starts = step + self.cfg.train.warmup_steps
        except (RuntimeError, KeyError, ValueError) as err:
            raise ckpt.CheckpointError(f"{path} does not match this config: {str(err).splitlines()[0]}") from None
        self.gen_cpu.set_state(state["rng"]["cpu"])
        self.gen_device.set_state(state["rng"]["device"].to("cpu"))
        self.counters = Counters(**state["counters"])
        self.episode_start_env_state = state["env_state"]
        if state.get("last_eval"):
            self.last_eval = EvalResult(**state["last_eval"])
        log.info("resumed from %s at step %d", path, self.counters.env_steps)
        return self.counters.env_steps

    def policy(self) -> Policy:
        return Policy(self.agent.actor, self.device)

    # ----- the loop ------------------------------------------------------------------------
    def _reset_envs(self) -> np.ndarray:
        if self.episode_start_env_state is None:
            obs, _ = self.envs.reset(seed=self.cfg.seed)
        else:
            load_env_checkpoint(self.envs, self.episode_start_env_state)
            obs, _ = self.envs.reset()
        return obs

    def _act(self, obs: np.ndarray) -> np.ndarray:
        if self.counters.env_steps < self.cfg.train.warmup_steps:
            u = torch.rand(self.num_tasks, self.act_dim, generator=self.gen_cpu)
            return (self.act_low + u * (self.act_high - self.act_low)).numpy()
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        return self.agent.act(obs_t, self.gen_device).cpu().numpy()

    def _on_signal(self, signum: int, _frame) -> None:
        self._stop_signal = signum

    def train(self) -> int:
        """Train to `train.total_steps`; returns the exit code (0, or 128 + signal if interrupted)."""
        cfg, c = self.cfg, self.counters
        ep_len = cfg.env.max_episode_steps
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        obs = self._reset_envs()
        step_in_episode = 0  # a resumed run restarts the episode that was in progress
        ep_return = np.zeros(self.num_tasks)
        ep_success = np.zeros(self.num_tasks, dtype=bool)
        window = {"time": time.perf_counter(), "steps": c.env_steps, "updates": c.updates}
        train_stats: dict[str, np.ndarray] = {}
        update_metrics: dict = {}
        bar = tqdm(
            total=cfg.train.total_steps,
            initial=c.env_steps,
            disable=not cfg.log.progress,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            while c.env_steps < cfg.train.total_steps and self._stop_signal is None:
                if step_in_episode == ep_len - 1:  # this step ends every task's episode: remember
                    self.episode_start_env_state = env_checkpoint(self.envs)  # the RNG the reset will use
                action = self._act(obs)
                next_obs, reward, terminated, truncated, info = self.envs.step(action)
                done = np.logical_or(terminated, truncated)
                real_next = np.array(next_obs, dtype=np.float32, copy=True)
                for i in np.flatnonzero(done):
                    real_next[i] = info["final_obs"][i]
                self.buffer.add(Batch(obs, action, reward, real_next, terminated, truncated))
                obs = next_obs
                c.env_steps += 1
                step_in_episode = (step_in_episode + 1) % ep_len
                ep_return += reward
                ep_success |= _success(info, done, self.num_tasks)
                if done.all():
                    c.episodes += 1
                    train_stats = {
                        "train/episode_return": ep_return.copy(),
                        "train/success": ep_success.astype(float),
                    }
                    ep_return[:] = 0
                    ep_success[:] = False
                elif done.any():
                    raise TrainingError(
                        "training episodes ended out of step; the trainer expects synchronous time limits"
                    )

                if c.env_steps >= self.learning_starts:
                    for _ in range(cfg.train.updates_per_step):
                        update_metrics.update(self._update() or {})
                bar.update(1)

                if c.env_steps % cfg.log.every == 0:
                    self._log_train(window, train_stats, update_metrics, bar)
                is_last = c.env_steps == cfg.train.total_steps
                if (cfg.eval.every and c.env_steps % cfg.eval.every == 0) or is_last:
                    self._evaluate(bar)
                if (cfg.checkpoint.every and c.env_steps % cfg.checkpoint.every == 0) or is_last:
                    self.save_checkpoint()
            if self._stop_signal is not None:
                self.save_checkpoint()
                name = signal.Signals(self._stop_signal).name
                log.info(
                    "%s at step %d: checkpoint saved; resume with: mtrl train --resume %s",
                    name,
                    c.env_steps,
                    self.run_dir,
                )
                return 128 + self._stop_signal
            return 0
        finally:
            bar.close()
            self.logger.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _update(self) -> dict | None:
        c, cfg = self.counters, self.cfg
        batch = self.buffer.sample(cfg.train.batch_per_task, self.gen_device, self.device)
        every = cfg.combiner.diagnostics_every
        diagnostics = bool(every) and c.updates % every == 0
        result = self.learner(batch, self.gen_device, self.gen_cpu, diagnostics=diagnostics)
        for callback in self.callbacks:
            callback.on_update(self, result)
        if not result.finite:
            c.bad_updates += 1
            c.bad_streak += 1
            log.warning(
                "non-finite loss or gradient at step %d: update skipped (%d in a row)",
                c.env_steps,
                c.bad_streak,
            )
            if c.bad_streak >= cfg.train.max_bad_updates:
                self.save_checkpoint()
                raise TrainingError(
                    f"{c.bad_streak} non-finite updates in a row at step {c.env_steps}; stopped. The last good "
                    f"state is checkpointed in {ckpt.checkpoint_dir(self.run_dir)}; consider train.grad_clip_norm "
                    "or train.q_target_clip"
                )
            return None
        c.updates += 1
        c.bad_streak = 0
        return result.metrics

    def _log_train(self, window: dict, train_stats: dict, update_metrics: dict, bar: tqdm) -> None:
        c = self.counters
        now = time.perf_counter()
        elapsed = max(now - window["time"], 1e-9)
        values: dict = {
            "perf/env_steps_per_s": (c.env_steps - window["steps"]) / elapsed,
            "perf/updates_per_s": (c.updates - window["updates"]) / elapsed,
            "train/bad_updates": c.bad_updates,
            "train/episodes": c.episodes,
            **train_stats,
        }
        for key, value in update_metrics.items():
            values[key] = value.detach().cpu().numpy()
        record = self.logger.log(c.env_steps, "train", values)
        for key in [k for k in update_metrics if k.startswith("combiner/")]:
            del update_metrics[key]  # a diagnostics update's metrics reach exactly one log
        window.update(time=now, steps=c.env_steps, updates=c.updates)
        postfix = {"steps/s": f"{record['perf/env_steps_per_s']:.0f}"}
        if self.last_eval is not None:
            postfix["success"] = f"{self.last_eval.mean_success:.2f}"
        bar.set_postfix(postfix, refresh=False)

    def _evaluate(self, bar: tqdm) -> EvalResult:
        c = self.counters
        start = time.perf_counter()
        result = self.evaluator(self.policy())
        self.last_eval = result
        for callback in self.callbacks:
            callback.on_eval(self, result)
        values = {**result.metrics(self.tasks), "perf/eval_seconds": time.perf_counter() - start}
        self.logger.log(c.env_steps, "eval", values)
        self.logger.flush()
        bar.set_postfix({"success": f"{result.mean_success:.2f}"}, refresh=False)
        tqdm.write(result.summary(c.env_steps, self.cfg.eval.episodes))
        return result

    def save_checkpoint(self) -> Path:
        c = self.counters
        success = -1.0 if self.last_eval is None else self.last_eval.mean_success
        is_best = self.cfg.checkpoint.keep_best and success > c.best_success
        if is_best:
            c.best_success = success
        path = ckpt.save(self.state(), self.run_dir, c.env_steps, self.cfg.checkpoint.keep_last, is_best)
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)
        return path


def _success(info: dict, done: np.ndarray, n: int) -> np.ndarray:
    """Which sub-envs reported success this step (the final step's info for those that ended)."""
    out = reported(info, "success", n)
    if done.any() and "final_info" in info:
        out |= reported(info["final_info"], "success", n)
    return out
