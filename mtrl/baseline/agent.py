"""One task's SB3 SAC agent: how it is built from the config, how it learns, saves and restores.

`TaskAgent` k trains on sub-env k of the multi-task training envs under its own seed (`task_seed`) and its
own random state (`mtrl.baseline.rng`); `TaskWatcher`, its SB3 step callback, keeps the episode statistics
and the env state a resume restarts from. `PerTaskPolicies` puts the K agents behind the evaluator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtrl import rundir
from mtrl.baseline.rng import RngScope, fresh_rng, rng_from_json, rng_to_json
from mtrl.config import Config, ConfigError

if TYPE_CHECKING:
    import gymnasium as gym

    from mtrl.baseline.training import BaselineRun

# SB3's SAC clamps the policy's log-std to these constants; no argument changes them.
SB3_LOG_STD = (-20.0, 2.0)
# The replay buffer arrays a checkpoint with `checkpoint.save_buffer` holds.
BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


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


class TaskWatcher:
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


class TaskAgent:
    """Task k's SB3 SAC agent on sub-env k of the multi-task training envs."""

    def __init__(self, index: int, name: str, env: gym.Env, cfg: Config, num_tasks: int, run: BaselineRun):
        from stable_baselines3 import SAC
        from stable_baselines3.common.logger import Logger

        self.index, self.name, self.cfg, self.run = index, name, cfg, run
        self.device = run.device
        self.seed = task_seed(cfg.seed, index)
        self.rng = fresh_rng(self.seed, self.device)
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
        self.watcher = TaskWatcher(index, cfg.env.max_episode_steps, run)

    def seed_first_reset(self) -> None:
        """Seed the next reset with `seed + k`, as the trainer's vectorised reset seeds sub-env k."""
        self.model.get_env().seed(self.cfg.seed + self.index)

    def own_rng(self) -> RngScope:
        return RngScope(self.rng, self.device)

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
            arrays = {key: getattr(buf, key)[:n] for key in BUFFER_ARRAYS}
            data = io.BytesIO()
            np.savez(data, pos=np.int64(buf.pos), full=np.bool_(buf.full), **arrays)
            rundir.atomic_write(directory / f"{self.name}.buffer.npz", data.getvalue())
        state = {
            "step": int(self.model.num_timesteps),
            "n_updates": int(self.model._n_updates),
            "learning_starts": int(self.model.learning_starts),
            "rng": rng_to_json(self.rng),
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
        self.rng = rng_from_json(state["rng"])
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
            for key in BUFFER_ARRAYS:
                target = getattr(buf, key)
                n = saved[key].shape[0]
                if saved[key].shape[1:] != target.shape[1:] or n > target.shape[0]:
                    raise ValueError(f"buffer {key} has shape {saved[key].shape}, expected at most {target.shape}")
                target[:n] = saved[key]
        buf.pos, buf.full = pos, full


class PerTaskPolicies:
    """The K agents behind the evaluator's interface: row k of the observations goes to agent k."""

    def __init__(self, models: list[Any]):
        self.models = models

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        pairs = zip(self.models, observations, strict=True)
        return np.stack([model.predict(obs, deterministic=True)[0] for model, obs in pairs])

    def reset(self, env_mask: np.ndarray) -> None:
        """The policies keep no state across steps."""
