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

Where each part lives:
- `state`: RUN_DIR/baseline/, its commits and what a resume reads back (`read_state`, `saved_step`);
- `rng`: each agent's own copy of the process-wide random state, and its JSON form;
- `agent`: one task's SB3 SAC agent, its step callback, its files; the K agents behind the evaluator;
- `training`: `BaselineRun`, the lockstep chunks with their logging, evaluation and commits;
- here: the `mtrl baseline` command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mtrl import rundir
from mtrl.baseline.agent import SB3_LOG_STD, PerTaskPolicies, check_supported, task_seed
from mtrl.baseline.state import (
    BASELINE_DIR,
    FIXED_ON_RESUME,
    METHOD,
    PENDING_DIR,
    STATE_FILE,
    check_resumable,
    is_finished,
    read_state,
    recover,
    saved_step,
)
from mtrl.baseline.training import BaselineRun
from mtrl.config import Config, ConfigError, load_config, to_yaml

__all__ = [
    "BASELINE_DIR",
    "FIXED_ON_RESUME",
    "METHOD",
    "PENDING_DIR",
    "SB3_LOG_STD",
    "STATE_FILE",
    "BaselineRun",
    "PerTaskPolicies",
    "add_parser",
    "check_resumable",
    "check_supported",
    "is_finished",
    "read_state",
    "recover",
    "run",
    "saved_step",
    "task_seed",
]


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
