"""Single-task baseline: one Stable-Baselines3 SAC agent per task, evaluated like the multi-task runs.

`mtrl baseline --config PRESET [key=value ...]` reads the same presets and overrides as `mtrl train`
and trains K independent SB3 SAC agents, agent k on task k alone: the upper bound that multi-task
methods are compared against.

What is shared with the multi-task runs:
- Agent k trains on sub-env k of the multi-task training envs (`make_backend(cfg.env, cfg.seed,
  evaluation=False)`): the same goal set, time limit, one-hot observation and reward version. Meta-World's
  MT1 with the same seed would not do: MT10/MT50 draw every task's goals from one seeded stream
  across the benchmark, so task k inside MT10 holds other goals than MT1 of that task. Its first
  reset is seeded with `seed + k`, as the trainer's vectorised reset seeds sub-env k, so task k sees
  the goals in the same order as in a multi-task run of the same seed.
- Evaluation: `mtrl.evaluation.evaluate` on evaluation envs built with the same seed (the training
  goal sets), deterministic actions, logged under the trainer's keys (`eval/mean_success`, ...).
- Network widths (`agent.hidden_sizes`, actor and both critics), learning rate, gamma, tau, batch
  (`train.batch_per_task`), replay capacity (`train.buffer_capacity // K` per task), updates per step,
  warm-up (`train.warmup_steps` uniform random steps), automatic temperature (initial
  `agent.init_temperature`, target entropy `agent.target_entropy` or -|A|), the step budget
  (`train.total_steps` steps per task). Time limits are truncations: SB3's replay buffer keeps the
  true final observation and, with `handle_timeout_termination`, bootstraps through them.

Seeds: agent k's weights, policy noise, replay sampling and warm-up actions use the seed
`task_seed(seed, k)`, the first 32-bit word of `numpy.random.SeedSequence([seed, k])`. SB3 draws
from the process-wide torch and numpy generators; every agent learns inside its own saved copy of
their states, so the agents neither see each other's draws nor leave the process's generators changed.

Schedule and checkpoints: all agents advance in lockstep chunks that end at every multiple of
`eval.every` and `checkpoint.every` and at `train.total_steps`. After each chunk the run evaluates (at
multiples of `eval.every` and at the end) and saves every agent into RUN_DIR/baseline/ as one commit:
the files are written into baseline/.pending/, its state.json marks the commit complete, then they
are moved into place. `--resume RUN_DIR` continues from the last committed chunk. With
`checkpoint.save_buffer=true` and chunks that end at episode boundaries, the resumed run repeats the
uninterrupted one exactly; without the buffer, each agent refills an empty buffer with
`train.warmup_steps` random steps before learning again.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtrl import rundir
from mtrl.config import Config, ConfigError, load_config, to_yaml

if TYPE_CHECKING:
    import gymnasium as gym
    import torch

    from mtrl.envs.vector import VectorEnvBackend

METHOD = rundir.METHOD_TAGS["baseline"]
BASELINE_DIR, STATE_FILE, PENDING_DIR = rundir.BASELINE_DIR, rundir.BASELINE_STATE, rundir.PENDING_DIR
# SB3's SAC clamps the policy's log-std to these constants; no argument changes them.
SB3_LOG_STD = (-20.0, 2.0)
# Config sections a resume may not change: the saved agents and buffers were built for them.
FIXED_ON_RESUME = ("seed", "env", "agent", "train.buffer_capacity")


def task_seed(seed: int, task_index: int) -> int:
    """Seed of task `task_index`'s agent: distinct per task, fixed by the run's seed."""
    return int(np.random.SeedSequence([seed, task_index]).generate_state(1)[0])


def check_supported(cfg: Config) -> None:
    """Settings SB3's SAC cannot reproduce are refused rather than silently ignored."""
    agent = cfg.agent
    if not agent.actor_lr == agent.critic_lr == agent.alpha_lr:
        raise ConfigError(
            "baseline: SB3's SAC uses one learning rate; agent.actor_lr, agent.critic_lr and agent.alpha_lr must be "
            f"equal, found {agent.actor_lr}, {agent.critic_lr}, {agent.alpha_lr}"
        )
    if (agent.log_std_min, agent.log_std_max) != SB3_LOG_STD:
        raise ConfigError(
            f"baseline: SB3's SAC clamps the log-std to {list(SB3_LOG_STD)}; agent.log_std_min/max must be those, "
            f"found {[agent.log_std_min, agent.log_std_max]}"
        )
    for key in ("grad_clip_norm", "q_target_clip"):
        if getattr(cfg.train, key) is not None:
            raise ConfigError(f"baseline: SB3's SAC has no train.{key}; set it to null")


# ----- the run directory -----------------------------------------------------------------------
def _promote(baseline_dir: Path) -> None:
    """Finish a commit: move the staged files into place, state.json last."""
    stage = baseline_dir / PENDING_DIR
    state = json.loads((stage / STATE_FILE).read_text())
    for path in sorted(stage.iterdir()):
        if path.name != STATE_FILE and not path.name.endswith(".tmp"):
            rundir.move_into_place(path, baseline_dir / path.name)
    rundir.move_into_place(stage / STATE_FILE, baseline_dir / STATE_FILE)
    shutil.rmtree(stage)
    if not state["buffer_saved"]:  # buffers of an older chunk would not match the agents
        for stale in baseline_dir.glob("*.buffer.npz"):
            stale.unlink()
    rundir.sync_dir(baseline_dir)


def recover(run_dir: Path) -> None:
    """Complete a commit that a kill interrupted after its state.json, or drop one that it cut short."""
    stage = Path(run_dir) / BASELINE_DIR / PENDING_DIR
    if (stage / STATE_FILE).is_file():
        _promote(stage.parent)
    elif stage.exists():
        shutil.rmtree(stage)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The last committed chunk of a baseline run (read-only), or None when RUN_DIR holds none.

    `state["step"] == state["total_steps"]` (and `state["finished"]`) marks a finished run.
    """
    from mtrl.checkpoint import CheckpointError

    base = Path(run_dir) / BASELINE_DIR
    for path in (base / PENDING_DIR / STATE_FILE, base / STATE_FILE):
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"cannot read {path}: {type(err).__name__}") from None
            if not isinstance(state, dict) or state.get("method") != METHOD:
                raise CheckpointError(f"{path} is not the state of an `mtrl baseline` run")
            return state
    return None


def saved_step(run_dir: Path) -> int | None:
    """The step a baseline run resumes from (its last committed chunk), or None when RUN_DIR holds none."""
    state = read_state(run_dir)
    return None if state is None else int(state["step"])


def is_finished(run_dir: Path) -> bool:
    """Whether RUN_DIR holds a baseline run that reached its step budget."""
    state = read_state(run_dir)
    return state is not None and state["step"] >= state["total_steps"]


def check_resumable(saved: dict[str, Any], cfg: Config) -> None:
    """A resume may change the budget, evaluation, logging and checkpoint settings, not what the agents are."""
    from mtrl.config import to_dict

    new = to_dict(cfg)
    for key in FIXED_ON_RESUME:
        old_value, new_value = saved, new
        for part in key.split("."):
            old_value, new_value = old_value.get(part), new_value[part]
        if old_value != new_value:
            raise ConfigError(f"{key} cannot change on resume: the saved agents were built for the run's value")


# ----- per-task random state ----------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fresh_rng(seed: int, device: torch.device) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {
        "torch": torch.Generator().manual_seed(seed).get_state(),
        "numpy": np.random.RandomState(seed).get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return state


def _capture_rng(device: torch.device) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _install_rng(state: dict[str, Any], device: torch.device) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out: dict[str, Any] = {
        "torch": _b64(state["torch"].numpy().tobytes()),
        "numpy": [kind, _b64(np.asarray(keys, dtype="<u4").tobytes()), int(pos), int(has_gauss), float(cached)],
    }
    if "cuda" in state:
        out["cuda"] = _b64(state["cuda"].numpy().tobytes())
    return out


def _rng_from_json(data: dict[str, Any]) -> dict[str, Any]:
    import torch

    def tensor(text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())

    kind, keys, pos, has_gauss, cached = data["numpy"]
    state: dict[str, Any] = {
        "torch": tensor(data["torch"]),
        "numpy": (kind, np.frombuffer(base64.b64decode(keys), dtype="<u4").astype(np.uint32), pos, has_gauss, cached),
    }
    if "cuda" in data:
        state["cuda"] = tensor(data["cuda"])
    return state


# ----- one task ----------------------------------------------------------------------------------
class _Watcher:
    """SB3 step callback of one task: episode statistics, the env state the next reset starts from,
    the progress bar, and stop requests (returning False ends `learn`)."""

    def __init__(self, index: int, episode_steps: int, run: BaselineRun):
        self.index, self.episode_steps, self.run = index, episode_steps, run
        self.in_episode = 0  # steps taken in the current episode
        self.ep_return, self.ep_success = 0.0, False
        self.finished: list[tuple[float, bool]] = []  # (return, success) of the episodes ended this chunk
        self.env_state: str | None = None  # None: the first reset, seeded

    def __call__(self, locals_: dict[str, Any], _globals: dict[str, Any]) -> bool:
        info = locals_["infos"][0]
        self.ep_return += float(locals_["rewards"][0])
        self.ep_success |= bool(info.get("success", 0.0))
        if locals_["dones"][0]:
            self.finished.append((self.ep_return, self.ep_success))
            self.ep_return, self.ep_success, self.in_episode = 0.0, False, 0
        else:
            self.in_episode += 1
            if self.in_episode == self.episode_steps - 1:  # the next step ends the episode: remember
                # the RNG state its reset will use
                self.env_state = self.run.train_backend.get_state(tasks=[self.index])
        self.run.bar.update(1)
        return self.run.stop_signal is None


class _Task:
    """Task k's SB3 SAC agent on sub-env k of the multi-task training envs."""

    def __init__(self, index: int, name: str, env: gym.Env, cfg: Config, num_tasks: int, run: BaselineRun):
        from stable_baselines3 import SAC
        from stable_baselines3.common.logger import Logger

        self.index, self.name, self.cfg, self.run = index, name, cfg, run
        self.device = run.device
        self.seed = task_seed(cfg.seed, index)
        self.rng = _fresh_rng(self.seed, self.device)
        agent, train = cfg.agent, cfg.train
        act_dim = int(np.prod(env.action_space.shape))
        with self.own_rng():
            self.model = SAC(
                "MlpPolicy",
                env,
                learning_rate=agent.actor_lr,
                buffer_size=max(1, train.buffer_capacity // num_tasks),
                learning_starts=train.warmup_steps,
                batch_size=train.batch_per_task,
                tau=agent.tau,
                gamma=agent.gamma,
                train_freq=1,
                gradient_steps=train.updates_per_step,
                replay_buffer_kwargs={"handle_timeout_termination": True},
                ent_coef=f"auto_{agent.init_temperature}",
                target_entropy=-float(act_dim) if agent.target_entropy is None else agent.target_entropy,
                policy_kwargs={"net_arch": {"pi": list(agent.hidden_sizes), "qf": list(agent.hidden_sizes)}},
                device=self.device,
                verbose=0,
            )
        # SB3 otherwise creates a logging folder in the temp dir at every `learn`.
        self.model.set_logger(Logger(folder=None, output_formats=[]))
        self.model.action_space.seed(self.seed)
        self.watcher = _Watcher(index, cfg.env.max_episode_steps, run)

    def seed_first_reset(self) -> None:
        """Seed the next reset with `seed + k`, as the trainer's vectorised reset seeds sub-env k."""
        self.model.get_env().seed(self.cfg.seed + self.index)

    def own_rng(self) -> _RngScope:
        return _RngScope(self.rng, self.device)

    def learn(self, steps: int) -> None:
        with self.own_rng():
            self.model.learn(steps, callback=self.watcher, reset_num_timesteps=False, log_interval=None)

    def alpha(self) -> float:
        return float(self.model.log_ent_coef.detach().exp().item())

    # ----- checkpoints ----------------------------------------------------------------------------
    def save(self, directory: Path, with_buffer: bool) -> None:
        import io

        data = io.BytesIO()
        self.model.save(data)
        rundir.atomic_write(directory / f"{self.name}.zip", data.getvalue())
        if with_buffer:
            buf = self.model.replay_buffer
            n = buf.buffer_size if buf.full else buf.pos
            arrays = {key: getattr(buf, key)[:n] for key in _BUFFER_ARRAYS}
            data = io.BytesIO()
            np.savez(data, pos=np.int64(buf.pos), full=np.bool_(buf.full), **arrays)
            rundir.atomic_write(directory / f"{self.name}.buffer.npz", data.getvalue())
        state = {
            "step": int(self.model.num_timesteps),
            "n_updates": int(self.model._n_updates),
            "learning_starts": int(self.model.learning_starts),
            "rng": _rng_to_json(self.rng),
            "action_space_rng": self.model.action_space.np_random.bit_generator.state,
            "env_state": self.watcher.env_state,
        }
        rundir.atomic_write(directory / f"{self.name}.state.json", json.dumps(state).encode())

    def restore(self, directory: Path, step: int, with_buffer: bool) -> None:
        from stable_baselines3.common.save_util import load_from_zip_file

        from mtrl.checkpoint import CheckpointError

        path = directory / f"{self.name}.zip"
        try:
            # Only the tensors: `load_data=False` skips SB3's pickled attributes, and tensors
            # load with `weights_only=True`, so no code from the file runs.
            _, params, variables = load_from_zip_file(path, load_data=False, device=self.device)
            self.model.set_parameters(params, exact_match=True, device=self.device)
            self.model.log_ent_coef.data.copy_(variables["log_ent_coef"].data)
            state = json.loads((directory / f"{self.name}.state.json").read_text())
            if state["step"] != step:
                raise ValueError(f"its state is at step {state['step']}, the run's at step {step}")
            if with_buffer:
                self._load_buffer(directory / f"{self.name}.buffer.npz")
        except Exception as err:  # noqa: BLE001 - whatever a damaged file trips on, it is unusable
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(
                f"cannot restore task {self.name} from {directory}: {type(err).__name__} {first}"
            ) from None
        self.model.num_timesteps = state["step"]
        self.model._n_updates = state["n_updates"]
        # An empty buffer is refilled with random steps before learning resumes.
        refill = state["step"] + self.cfg.train.warmup_steps
        self.model.learning_starts = state["learning_starts"] if with_buffer else refill
        self.rng = _rng_from_json(state["rng"])
        # The episode in progress restarts: the reset at the next `learn` draws its goal again.
        if state["env_state"] is None:
            self.seed_first_reset()
        else:
            self.run.train_backend.set_state(state["env_state"], tasks=[self.index])
        self.watcher.env_state = state["env_state"]
        self.model.action_space.np_random.bit_generator.state = state["action_space_rng"]

    def _load_buffer(self, path: Path) -> None:
        buf = self.model.replay_buffer
        with np.load(path, allow_pickle=False) as saved:
            pos, full = int(saved["pos"]), bool(saved["full"])
            for key in _BUFFER_ARRAYS:
                target = getattr(buf, key)
                n = saved[key].shape[0]
                if saved[key].shape[1:] != target.shape[1:] or n > target.shape[0]:
                    raise ValueError(f"buffer {key} has shape {saved[key].shape}, expected at most {target.shape}")
                target[:n] = saved[key]
        buf.pos, buf.full = pos, full


_BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


class _RngScope:
    """Installs a task's generator states in torch and numpy, and puts back the previous ones after."""

    def __init__(self, state: dict[str, Any], device: torch.device):
        self.state, self.device = state, device

    def __enter__(self) -> None:
        self.outer = _capture_rng(self.device)
        _install_rng(self.state, self.device)

    def __exit__(self, *exc: object) -> None:
        self.state.update(_capture_rng(self.device))
        _install_rng(self.outer, self.device)


class PerTaskPolicies:
    """The K agents behind the evaluator's interface: row k of the observations goes to agent k."""

    def __init__(self, models: list[Any]):
        self.models = models

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        pairs = zip(self.models, observations, strict=True)
        return np.stack([model.predict(obs, deterministic=True)[0] for model, obs in pairs])

    def reset(self, env_mask: np.ndarray) -> None:
        """The policies keep no state across steps."""


# ----- the run -------------------------------------------------------------------------------------
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
                _Task(k, name, sub_envs[k], cfg, len(self.tasks), self) for k, name in enumerate(self.tasks)
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
        """Commit every task's files for `self.step` at once (see the module docstring)."""
        stage = self.baseline_dir / PENDING_DIR
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        with_buffer = self.cfg.checkpoint.save_buffer
        for task in self.task_agents:
            task.save(stage, with_buffer)
        state = {
            "method": METHOD,
            "step": self.step,
            "total_steps": self.cfg.train.total_steps,
            "finished": self.step >= self.cfg.train.total_steps,
            "tasks": self.tasks,
            "seeds": [t.seed for t in self.task_agents],
            "buffer_saved": with_buffer,
            "last_eval": self.last_eval,
        }
        rundir.atomic_write(stage / STATE_FILE, json.dumps(state).encode())  # the commit point
        rundir.sync_dir(stage)
        _promote(self.baseline_dir)


# ----- command line ----------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "baseline",
        help="train one Stable-Baselines3 SAC agent per task (the single-task baseline)",
        description="Train one SB3 SAC agent per task of a preset, with the preset's networks, learning rate, "
        "budget per task and goal sets, evaluated with mtrl's evaluator. Writes config.yaml (with "
        f"method: {METHOD}), metrics.jsonl, tb/ and baseline/ (one SB3 model per task, state.json) into run.dir.",
        epilog="Overrides are the config keys of `mtrl train --help`. The combiner, optimizer.name, "
        "agent.architecture, agent.shared_temperature and train.buffer_device have no meaning for single-task SAC "
        "and are ignored. `--resume RUN_DIR` continues from the last completed chunk (multiples of eval.every "
        "and checkpoint.every); on a finished run it does nothing.",
    )
    parser.add_argument("--config", type=Path, help="YAML preset, e.g. configs/mt10_mtsac.yaml")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the baseline run in RUN_DIR")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit, training and writing nothing",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _print_config(cfg: Config) -> int:
    """`--print-config`: the config the run would use, once SB3 is known to support it."""
    check_supported(cfg)
    print(to_yaml(cfg), end="")
    return 0


def run(args: argparse.Namespace) -> int:
    from mtrl import checkpoint as ckpt

    rundir.check_start_or_resume(args.config, args.resume)
    if args.resume is not None:
        run_dir = Path(args.resume)
        state = read_state(run_dir)
        if state is None:
            raise ckpt.CheckpointError(f"no completed baseline chunk to resume from in {run_dir}")
        saved = rundir.read_config(run_dir, "baseline")
        cfg = load_config(None, [*args.overrides, f"run.dir={run_dir}"], base=saved)
        check_resumable(saved, cfg)
        if args.print_config:
            return _print_config(cfg)
        if state["step"] > cfg.train.total_steps:
            raise ConfigError(
                f"train.total_steps must be >= the step of the run ({state['step']}), found {cfg.train.total_steps}"
            )
        if state["step"] == cfg.train.total_steps:
            recover(run_dir)
            print(f"{run_dir}: finished ({state['step']} steps per task); nothing to do", file=sys.stderr)
            return 0
        check_supported(cfg)
        resume = True
    else:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            return _print_config(cfg)
        check_supported(cfg)
        run_dir = rundir.new_run_dir(cfg.run.dir, args.config, "baseline")
        cfg.run.dir = str(run_dir)
        resume = False
    baseline = BaselineRun(cfg, run_dir, resume=resume)
    print(f"run directory: {run_dir}", file=sys.stderr)
    try:
        return baseline.train()
    finally:
        baseline.close()
