"""The training loop: collect -> update -> evaluate -> log -> checkpoint, with hooks (`Callback`).

`mtrl.build` makes the run's parts and `mtrl.runstate` captures and restores their state; this
module only runs them. Randomness flows from two explicit generators seeded from `cfg.seed` (one on
the CPU for warm-up actions and the combiners, one on the training device for sampling and policy
noise), plus the envs' own seeded RNGs. A checkpoint holds all of their states, so resuming from a
checkpoint taken at an episode boundary continues bit for bit; from any other step, the episode
that was in progress restarts from its beginning with the same goal.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mtrl import checkpoint as ckpt
from mtrl.buffer import Batch
from mtrl.build import Parts, build, open_run_dir
from mtrl.callbacks import Callback, phase
from mtrl.config import Config
from mtrl.evaluation import EvalResult
from mtrl.logger import log
from mtrl.policy import Policy
from mtrl.runstate import Progress, RunState, load_latest
from mtrl.video import EvalVideos


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite updates in a row)."""


class _Episode:
    """Every task's running training episode (they all end together): its length, return and success so far."""

    def __init__(self, num_tasks: int):
        self.steps, self.ret, self.success = 0, np.zeros(num_tasks), np.zeros(num_tasks, dtype=bool)

    def add(self, reward: np.ndarray, success: np.ndarray) -> None:
        self.steps += 1
        self.ret += reward
        self.success |= success

    def finish(self) -> dict[str, np.ndarray]:
        """The ended episode's train-log values; the next episode starts from zero."""
        stats = {"train/episode_return": self.ret, "train/success": self.success.astype(float)}
        self.steps, self.ret, self.success = 0, np.zeros_like(self.ret), np.zeros_like(self.success)
        return stats


class Trainer:
    """One run: `parts` (built from the config, see `mtrl.build`) and `progress` (the loop's state)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        state: RunState | None = None,
        callbacks: Sequence[Callback] = (),
        parts: Parts | None = None,
    ):
        """A run of `cfg` in `run_dir`, from its start or from `state` (`Trainer.resume` reads it from the run);
        `parts`: built by `mtrl.build.build(cfg)` beforehand (by default here)."""
        self.cfg, self.run_dir, self.callbacks = cfg, Path(run_dir), list(callbacks)
        self.parts = build(cfg) if parts is None else parts
        if state is None:
            self.progress = Progress(learning_starts=cfg.train.warmup_steps)
        else:
            self.progress = state.restore(cfg, self.parts)
            log.info("resumed from %s at step %d", state.source, self.counters.env_steps)
        self.videos = EvalVideos(cfg) if cfg.eval.video_every else None
        self.logger = open_run_dir(cfg, self.run_dir, self.parts.tasks, self.counters.env_steps)
        self._stop_signal: int | None = None

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: Sequence[str] = (), callbacks: Sequence[Callback] = ()) -> Trainer:
        """The run in `run_dir`, continued from its latest checkpoint, in one "restore" phase: read the
        checkpoint, apply `overrides` to the config it holds, build the parts and load its state into them."""
        with phase(callbacks, "restore"):
            saved = load_latest(Path(run_dir))
            cfg = saved.resumed_config(run_dir, overrides)
            return cls(cfg, run_dir, saved, callbacks)

    # The parts and progress most often read, as the trainer's own attributes.
    agent = property(lambda self: self.parts.agent)
    combiner = property(lambda self: self.parts.combiner)
    learner = property(lambda self: self.parts.learner)
    optimization = property(lambda self: self.parts.optimization)
    buffer = property(lambda self: self.parts.buffer)
    device = property(lambda self: self.parts.device)
    tasks = property(lambda self: self.parts.tasks)
    obs_dim = property(lambda self: self.parts.obs_dim)
    envs = property(lambda self: self.parts.envs)
    counters = property(lambda self: self.progress.counters)

    def policy(self) -> Policy:
        return Policy(self.parts.agent.actor, self.parts.device)

    # ----- the loop ------------------------------------------------------------------------
    def train(self) -> int:
        """Train to `train.total_steps`; returns the exit code (0, or 128 + signal if interrupted)."""
        cfg, c = self.cfg, self.counters
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=cfg.train.total_steps,
            initial=c.env_steps,
            disable=not cfg.log.progress,
            unit="step",
            dynamic_ncols=True,
        )
        self._window = {"time": time.perf_counter(), "steps": c.env_steps, "updates": c.updates}
        # A resumed run restarts the episode that was in progress at its checkpoint.
        obs, episode = self._reset_envs(), _Episode(self.parts.num_tasks)
        try:
            while c.env_steps < cfg.train.total_steps and self._stop_signal is None:
                if cfg.train.overlap:  # the updates run while the envs step
                    obs = self._collect(obs, episode, during=self._learn)
                else:
                    obs = self._collect(obs, episode)
                    self._learn()
                bar.update(1)
                last = c.env_steps == cfg.train.total_steps
                if c.env_steps % cfg.log.every == 0:
                    self._log_train(bar)
                if (cfg.eval.every and c.env_steps % cfg.eval.every == 0) or last:
                    self.evaluate(bar)
                    if self._video_due(last):
                        self.record_videos()
                if (cfg.checkpoint.every and c.env_steps % cfg.checkpoint.every == 0) or last:
                    self.save_checkpoint()
                if not all(callback.on_step(self) is not False for callback in self.callbacks) and not last:
                    self.save_checkpoint()
                    return 0
            if self._stop_signal is None:
                return 0
            self.save_checkpoint()
            name = signal.Signals(self._stop_signal).name
            log.info(
                "%s at step %d: checkpoint saved; resume with: mtrl train --resume %s", name, c.env_steps, self.run_dir
            )
            return 128 + self._stop_signal
        finally:
            bar.close()
            self.logger.close()
            if self.videos is not None:
                self.videos.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _collect(self, obs: np.ndarray, episode: _Episode, during: Callable[[], None] | None = None) -> np.ndarray:
        """One vector step into the buffer, running `during` while the envs step; returns the observations
        to act on next."""
        c, p, envs = self.counters, self.progress, self.parts.envs
        if episode.steps == self.cfg.env.max_episode_steps - 1:  # this step ends every task's episode:
            p.episode_start = envs.get_state()  # remember the state the reset will start from
        with phase(self.callbacks, "collect"):
            action = self._act(obs)
            envs.step_async(action)
            if during is not None:
                during()
            step = envs.step_wait()
        self.parts.buffer.add(Batch(obs, action, step.reward, step.next_obs, step.terminated, step.truncated))
        c.env_steps += 1
        episode.add(step.reward, step.success)
        if step.done.all():
            c.episodes += 1
            p.train_stats = episode.finish()
        elif step.done.any():
            raise TrainingError("training episodes ended out of step; the trainer expects synchronous time limits")
        return step.obs

    def _on_signal(self, signum: int, _frame) -> None:
        self._stop_signal = signum  # acted on at the end of the step

    def _act(self, obs: np.ndarray) -> np.ndarray:
        """Uniform random actions during warm-up, then samples of the policy."""
        parts = self.parts
        if self.counters.env_steps < self.cfg.train.warmup_steps:
            u = torch.rand(parts.num_tasks, parts.act_dim, generator=parts.gen_cpu)
            return (parts.action_low + u * (parts.action_high - parts.action_low)).numpy()
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=parts.device)
        return parts.agent.act(obs_t, parts.gen_device).cpu().numpy()

    def _reset_envs(self) -> np.ndarray:
        """The first observations: from the seed, or from the state the running episode began in."""
        envs, start = self.parts.envs, self.progress.episode_start
        if start is None:
            return envs.reset(seed=self.cfg.seed)
        envs.set_state(start)
        return envs.reset()

    # ----- update, log, evaluate, checkpoint -----------------------------------------------
    def _learn(self) -> None:
        """`train.updates_per_step` updates, once the buffer holds `learning_starts` vector steps. With
        `train.overlap` they run before the step in flight is counted: the same steps update as without."""
        pending = 1 if self.cfg.train.overlap else 0
        if self.counters.env_steps + pending >= self.progress.learning_starts:
            for _ in range(self.cfg.train.updates_per_step):
                self.update()

    def update(self) -> dict[str, torch.Tensor] | None:
        """One update; its metrics, or None if it was not finite and was skipped."""
        c, cfg, parts = self.counters, self.cfg, self.parts
        batch = parts.buffer.sample(cfg.train.batch_per_task, parts.gen_device, parts.device)
        for callback in self.callbacks:
            batch = callback.on_batch(self, batch) or batch
        every = cfg.combiner.diagnostics_every
        with phase(self.callbacks, "update"):
            result = parts.learner(batch, parts.gen_device, parts.gen_cpu, bool(every) and c.updates % every == 0)
        for callback in self.callbacks:
            callback.on_update(self, result)
        if result.finite:
            c.updates += 1
            c.bad_streak = 0
            self.progress.update_metrics.update(result.metrics)
            return result.metrics
        c.bad_updates += 1
        c.bad_streak += 1
        log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)", c.env_steps, c.bad_streak)
        if c.bad_streak >= cfg.train.max_bad_updates:
            self.save_checkpoint()
            raise TrainingError(
                f"{c.bad_streak} non-finite updates in a row at step {c.env_steps}; stopped. The last good state is "
                f"checkpointed in {ckpt.checkpoint_dir(self.run_dir)}; consider train.grad_clip_norm or "
                "train.q_target_clip"
            )
        return None

    def _log_train(self, bar: tqdm) -> None:
        c, p, window = self.counters, self.progress, self._window
        now = time.perf_counter()
        elapsed = max(now - window["time"], 1e-9)
        values: dict = {
            "perf/env_steps_per_s": (c.env_steps - window["steps"]) / elapsed,
            "perf/updates_per_s": (c.updates - window["updates"]) / elapsed,
            "train/bad_updates": c.bad_updates,
            "train/episodes": c.episodes,
            **p.train_stats,
            **{key: value.detach().cpu().numpy() for key, value in p.update_metrics.items()},
        }
        record = self.logger.log(c.env_steps, "train", values)
        for key in [k for k in p.update_metrics if k.startswith("combiner/")]:
            del p.update_metrics[key]  # a diagnostics update's metrics reach exactly one log
        window.update(time=now, steps=c.env_steps, updates=c.updates)
        postfix = {"steps/s": f"{record['perf/env_steps_per_s']:.0f}"}
        if p.last_eval is not None:
            postfix["success"] = f"{p.last_eval.mean_success:.2f}"
        bar.set_postfix(postfix, refresh=False)

    def evaluate(self, bar: tqdm | None = None) -> EvalResult:
        """Evaluate the current policy (the protocol, on the evaluation envs) and log the result."""
        start = time.perf_counter()
        with phase(self.callbacks, "eval"):
            result = self.parts.evaluator(self.policy())
        self.progress.last_eval = result
        for callback in self.callbacks:
            callback.on_eval(self, result)
        values = {**result.metrics(self.parts.tasks), "perf/eval_seconds": time.perf_counter() - start}
        self.logger.log(self.counters.env_steps, "eval", values)
        self.logger.flush()
        if bar is not None:
            bar.set_postfix({"success": f"{result.mean_success:.2f}"}, refresh=False)
        tqdm.write(result.summary(self.counters.env_steps, self.cfg.eval.episodes))
        return result

    def _video_due(self, last: bool) -> bool:
        """Videos go with every `eval.video_every`-th evaluation (counted from the run's start, so a resume
        keeps the schedule) and with the last one."""
        every = self.cfg.eval.every
        evaluations = self.counters.env_steps // every if every else 1
        return self.videos is not None and (last or evaluations % self.cfg.eval.video_every == 0)

    def record_videos(self) -> dict[str, Path]:
        """Videos of the current policy's evaluation episodes in `run_dir/videos/step_<step>/<task>.mp4`."""
        step = self.counters.env_steps
        out_dir = self.run_dir / "videos" / f"step_{step:010d}"
        videos = self.videos(self.policy(), out_dir, progress=self.cfg.log.progress)
        paths = {task: video.path for task, video in videos.items()}
        self.logger.log_videos(step, paths)
        tqdm.write(f"step {step}: videos of the evaluation episodes in {out_dir}")
        return paths

    def save_checkpoint(self) -> Path:
        """Write the run's state as `step_<step>.pt`; also as `best.pt` if its last evaluation is the best yet."""
        c, last = self.counters, self.progress.last_eval
        success = -1.0 if last is None else last.mean_success
        is_best = self.cfg.checkpoint.keep_best and success > c.best_success
        if is_best:
            c.best_success = success
        state = RunState.capture(self.cfg, self.parts, self.progress).to_dict()
        with phase(self.callbacks, "checkpoint"):
            path = ckpt.save(state, self.run_dir, c.env_steps, self.cfg.checkpoint.keep_last, is_best)
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)
        return path
