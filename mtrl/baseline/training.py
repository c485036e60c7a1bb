"""The baseline run: K single-task agents advanced in lockstep chunks, evaluated and committed after each.

A chunk ends at every multiple of `eval.every` and `checkpoint.every` and at `train.total_steps`; each agent
learns the chunk's steps in turn, then the run logs, evaluates (at multiples of `eval.every` and at the end)
and commits every agent at once (`mtrl.baseline.state.commit`). SIGINT and SIGTERM stop it between SB3
steps; it then resumes from the last commit.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtrl import rundir
from mtrl.baseline.agent import PerTaskPolicies, TaskAgent, check_supported
from mtrl.baseline.state import BASELINE_DIR, check_resumable, commit, read_state, recover
from mtrl.config import Config, ConfigError


class BaselineRun:
    """K single-task agents trained in lockstep chunks, evaluated and checkpointed after each."""

    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        import torch

        from mtrl.build import resolve_device, set_cpu_threads
        from mtrl.checkpoint import CheckpointError
        from mtrl.envs import make_backend, task_names
        from mtrl.envs.vector import VectorEnvBackend
        from mtrl.evaluation import Evaluator

        check_supported(cfg)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.baseline_dir = self.run_dir / BASELINE_DIR
        self.device = resolve_device(cfg.device)
        torch.set_flush_denormal(True)  # as the trainer: subnormal floats are slow on x86
        set_cpu_threads(cfg.train.torch_threads)
        self.tasks = task_names(cfg.env)
        self.stop_signal: int | None = None
        self.bar: Any = None
        self.step = 0
        self.last_eval: dict[str, Any] | None = None

        state = None
        if resume:
            state = read_state(self.run_dir)
            if state is None:
                raise CheckpointError(f"no completed baseline chunk to resume from in {self.run_dir}")
            if state["tasks"] != self.tasks:
                raise CheckpointError(f"{self.run_dir} was trained on other tasks than this config")
            check_resumable(rundir.read_config(self.run_dir, "baseline"), cfg)
        backend = make_backend(cfg.env, cfg.seed, evaluation=False, vector_strategy="sync")
        if not isinstance(backend, VectorEnvBackend):
            backend.close()
            raise ConfigError(f"baseline: SB3 needs gymnasium envs; the {cfg.env.benchmark} backend has none")
        self.train_backend: VectorEnvBackend = backend
        self.evaluator = Evaluator(
            make_backend(cfg.env, cfg.seed, evaluation=True, vector_strategy=cfg.eval.vector_strategy),
            cfg.eval.episodes,
        )
        # The training backend is never stepped: it only builds the K sub-envs, each a full
        # gymnasium env (time limit, one-hot, episode statistics, goal selection) that SB3 steps.
        sub_envs = backend.vector_env.envs
        try:
            self.task_agents = [
                TaskAgent(k, name, sub_envs[k], cfg, len(self.tasks), self) for k, name in enumerate(self.tasks)
            ]
            if state is not None:
                recover(self.run_dir)
                for task in self.task_agents:
                    task.restore(self.baseline_dir, state["step"], with_buffer=state["buffer_saved"])
                self.step, self.last_eval = state["step"], state["last_eval"]
        except BaseException:
            self.close()
            raise
        if state is None:
            for task in self.task_agents:
                task.seed_first_reset()
            if self.baseline_dir.exists():  # debris of an attempt killed before its first commit
                shutil.rmtree(self.baseline_dir)

        from mtrl.logger import MetricLogger

        rundir.remove_temporaries(self.run_dir)
        rundir.write_config(self.run_dir, cfg, "baseline")
        self.logger = MetricLogger(self.run_dir, self.tasks, cfg.log.tensorboard, self.step)

    @property
    def models(self) -> list[Any]:
        """The SB3 SAC model of each task, in task order."""
        return [t.model for t in self.task_agents]

    def _next_boundary(self) -> int:
        cfg = self.cfg
        ends = [cfg.train.total_steps]
        for every in (cfg.eval.every, cfg.checkpoint.every):
            if every:
                ends.append((self.step // every + 1) * every)
        return min(ends)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def train(self) -> int:
        """Train every task to `train.total_steps`; returns 0, or 128 + signal if interrupted."""
        from tqdm import tqdm

        from mtrl.logger import log

        cfg, k = self.cfg, len(self.tasks)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.bar = tqdm(
            total=cfg.train.total_steps * k,
            initial=self.step * k,
            disable=not cfg.log.progress,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            while self.step < cfg.train.total_steps:
                end = self._next_boundary()
                start = time.perf_counter()
                for task in self.task_agents:
                    task.learn(end - self.step)
                    if self.stop_signal is not None:
                        name = signal.Signals(self.stop_signal).name
                        log.info(
                            "%s: stopped; resume with `mtrl baseline --resume %s` from step %d",
                            name,
                            self.run_dir,
                            self.step,
                        )
                        return 128 + self.stop_signal
                self._log_train(end, end - self.step, time.perf_counter() - start)
                self.step = end
                if (cfg.eval.every and end % cfg.eval.every == 0) or end == cfg.train.total_steps:
                    self._evaluate()
                self._save()
            return 0
        finally:
            self.bar.close()
            self.logger.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def close(self) -> None:
        self.train_backend.close()
        self.evaluator.close()

    def _log_train(self, step: int, steps: int, seconds: float) -> None:
        returns, successes = [], []
        for task in self.task_agents:
            done = task.watcher.finished
            returns.append(np.mean([r for r, _ in done]) if done else np.nan)
            successes.append(np.mean([s for _, s in done]) if done else np.nan)
            done.clear()
        values = {
            "perf/env_steps_per_s": steps / max(seconds, 1e-9),
            "train/episode_return": np.array(returns),
            "train/success": np.array(successes),
            "alpha": np.array([t.alpha() for t in self.task_agents]),
        }
        self.logger.log(step, "train", values)

    def _evaluate(self) -> None:
        from tqdm import tqdm

        start = time.perf_counter()
        result = self.evaluator(PerTaskPolicies(self.models))
        self.last_eval = result.to_dict()
        values = {**result.metrics(self.tasks), "perf/eval_seconds": time.perf_counter() - start}
        self.logger.log(self.step, "eval", values)
        self.logger.flush()
        tqdm.write(result.summary(self.step, self.cfg.eval.episodes))

    def _save(self) -> None:
        """Commit every task's files for `self.step` at once."""
        with_buffer = self.cfg.checkpoint.save_buffer
        state = {
            "step": self.step,
            "total_steps": self.cfg.train.total_steps,
            "finished": self.step >= self.cfg.train.total_steps,
            "tasks": self.tasks,
            "seeds": [t.seed for t in self.task_agents],
            "buffer_saved": with_buffer,
            "last_eval": self.last_eval,
        }

        def write_files(stage: Path) -> None:
            for task in self.task_agents:
                task.save(stage, with_buffer)

        commit(self.baseline_dir, state, write_files)
