"""The parts of a training run, built from a validated config, apart from the loop that uses them.

`build(cfg)` makes everything the loop works with (device, generators, envs, evaluator, combiner,
agent, replay buffer) and writes nothing. `open_run_dir` then prepares the run directory and
opens the logger, once the run is known to start: a rejected resume leaves the directory as it was.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mtrl import checkpoint as ckpt
from mtrl import rundir
from mtrl.buffer import MultiTaskReplayBuffer
from mtrl.combiners import Combiner, make_combiner
from mtrl.compiled import CompiledUpdate, make_learner
from mtrl.config import Config, ConfigError
from mtrl.envs import EnvBackend, make_backend
from mtrl.evaluation import Evaluator
from mtrl.logger import MetricLogger
from mtrl.optim import Optimization
from mtrl.sac import MTSAC, SACUpdate
from mtrl.tracking import open_trackers


def set_cpu_threads(requested: int = 0) -> int:
    """Torch's intra-op threads; 0 means half the cores.

    Torch's worker threads spin-wait for each other: when envs or other processes hold the cores
    they wait on, an update can take many times longer than on idle cores.
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


@dataclass
class Parts:
    """Everything a run is made of. Their states are what `mtrl.runstate.RunState` captures."""

    device: torch.device
    tasks: list[str]  # sub-env i of the training and evaluation envs is task `tasks[i]`
    obs_dim: int
    act_dim: int
    action_low: torch.Tensor  # [act_dim], the bounds of warm-up actions
    action_high: torch.Tensor
    envs: EnvBackend  # training envs
    make_evaluator: Callable[[], Evaluator]  # see `evaluator`
    gen_cpu: torch.Generator  # warm-up actions and the combiners' draws
    gen_device: torch.Generator  # replay sampling and policy noise, on the training device (or `train.rng_device`)
    combiner: Combiner
    agent: MTSAC
    # One update: (batch, noise generator, combiner generator, diagnostics?) -> result.
    learner: SACUpdate | CompiledUpdate
    optimization: Optimization
    buffer: MultiTaskReplayBuffer

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        """The evaluator on its own envs, built at its first use and reused: a run that never evaluates
        (a benchmark, a run stopped early) never pays for the evaluation envs."""
        return self.make_evaluator()


def build(cfg: Config, envs: EnvBackend | None = None) -> Parts:
    """The parts of a run of `cfg`; `envs`: training envs built before for the same `cfg.env` and seed,
    reused as they are (benchmarks compare learners on one set of envs)."""
    device = resolve_device(cfg.device)
    # Tiny activations late in training turn into subnormal floats, which x86 CPUs compute
    # many times slower; flushing them to zero changes no result that matters.
    torch.set_flush_denormal(True)
    set_cpu_threads(cfg.train.torch_threads)
    if envs is None:
        envs = make_backend(cfg.env, cfg.seed, evaluation=False)
    tasks, obs_dim, act_dim = list(envs.task_names), envs.obs_dim, envs.act_dim

    def make_evaluator() -> Evaluator:
        # Separate instances holding the training envs' goal sets (the same seed): MT10/MT50
        # measure how well the agent solves the tasks it trains on.
        backend = make_backend(cfg.env, cfg.seed, evaluation=True, vector_strategy=cfg.eval.vector_strategy)
        return Evaluator(backend, cfg.eval.episodes)

    combiner = make_combiner(cfg.combiner.name, **cfg.combiner.hyper_parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # weight initialisation only; the global RNG is restored after
        agent = MTSAC(obs_dim, act_dim, len(tasks), cfg.agent).to(device)
    optimization = Optimization(
        agent.params, cfg.optimizer.name, agent.learning_rates, len(tasks), cfg.train.grad_clip_norm
    )
    update = SACUpdate(agent, optimization, combiner, cfg.combiner.networks, cfg.train.q_target_clip)
    rng_device = device if cfg.train.rng_device == "auto" else torch.device(cfg.train.rng_device)
    per_task = max(1, cfg.train.buffer_capacity // len(tasks))
    buffer_device = _buffer_device(cfg.train.buffer_device, device, len(tasks), per_task, obs_dim, act_dim)
    return Parts(
        device=device,
        tasks=tasks,
        obs_dim=obs_dim,
        act_dim=act_dim,
        action_low=torch.as_tensor(envs.action_low, dtype=torch.float32),
        action_high=torch.as_tensor(envs.action_high, dtype=torch.float32),
        envs=envs,
        make_evaluator=make_evaluator,
        gen_cpu=torch.Generator().manual_seed(cfg.seed),
        gen_device=torch.Generator(device=rng_device).manual_seed(cfg.seed + 1),
        combiner=combiner,
        agent=agent,
        learner=make_learner(update, cfg.train.compile),
        optimization=optimization,
        buffer=MultiTaskReplayBuffer(len(tasks), per_task, obs_dim, act_dim, buffer_device),
    )


def _buffer_device(
    choice: str, device: torch.device, num_tasks: int, per_task: int, obs_dim: int, act_dim: int
) -> torch.device:
    """`auto`: the training device, unless the buffer would take more than half of a GPU's free memory."""
    if choice != "auto":
        return torch.device(choice)
    if device.type != "cuda":
        return device
    need = MultiTaskReplayBuffer.nbytes(num_tasks, per_task, obs_dim, act_dim)
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.5 * free else torch.device("cpu")


def open_run_dir(cfg: Config, run_dir: Path, tasks: list[str], start_step: int) -> MetricLogger:
    """Make `run_dir` ready for a run that (re)starts at `start_step`, and open its logger.

    Removes the temporaries of writes cut short by a kill (checkpoints, config.yaml), writes
    `config.yaml`, and drops metrics logged after `start_step` (a fresh run starts at 0: it drops
    what an attempt killed before its first checkpoint logged).
    """
    run_dir = Path(run_dir)
    ckpt.remove_partial_writes(run_dir)
    rundir.remove_temporaries(run_dir)
    rundir.write_config(run_dir, cfg)
    return MetricLogger(run_dir, tasks, cfg.log.tensorboard, start_step, trackers=open_trackers(cfg, run_dir))
