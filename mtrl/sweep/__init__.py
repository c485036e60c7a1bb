"""`mtrl sweep SPEC.yaml`: a grid of presets x overrides x seeds, one Ray task per trial attempt.

A trial is one `mtrl train` (or `mtrl baseline`) run in its own directory, `ROOT/<trial name>`.
Ray places the trials on the CPUs and (fractional) GPUs each asks for; a failed attempt is tried
again from the trial's own latest checkpoint, so a retry loses at most the steps since that
checkpoint. A trial whose latest checkpoint is at its `train.total_steps` is finished, and running
the sweep again skips it. docs/sweep.md is the user's guide.

Where each part lives:
- `spec`: the spec file, a structured config checked by its types (`load_spec`);
- `trials`: the grid, each trial's name and config, and what its run directory already holds;
- `attempt`: what runs inside a Ray task: one training process, its pid, log and events;
- `monitor`: the driver's view, read from the trials' files: log lines and the summary;
- `driver`: one driver per root (a lock file), Ray, the loop with its retries, stopping.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mtrl.config import ConfigError
from mtrl.sweep.attempt import EVENTS_FILE, PID_FILE, TRAIN_LOG, TrialJob, read_events, run_attempt
from mtrl.sweep.driver import LOCK_FILE, run_sweep
from mtrl.sweep.monitor import SUMMARY_JSON, SUMMARY_MD, MetricsTail
from mtrl.sweep.spec import SweepSpec, load_spec
from mtrl.sweep.trials import MAX_NAME, Trial, expand, run_progress, trial_name

__all__ = [
    "EVENTS_FILE",
    "LOCK_FILE",
    "MAX_NAME",
    "PID_FILE",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "TRAIN_LOG",
    "MetricsTail",
    "SweepSpec",
    "Trial",
    "TrialJob",
    "add_parser",
    "expand",
    "load_spec",
    "read_events",
    "run",
    "run_attempt",
    "run_progress",
    "run_sweep",
    "trial_name",
]

SPEC_HELP = """\
The spec (YAML; relative paths are relative to the current directory):

  name: mt10-methods                 # used in logs and the summary
  root: runs/sweeps/mt10-methods     # trial run directories: ROOT/<preset stem>[-<key>=<value>...]-s<seed>
  command: train                     # train (default) or baseline
  presets: [configs/mt10_mtsac.yaml, configs/mt10_cagrad.yaml]
  overrides: {train.total_steps: 1000000}   # optional: the same for every trial
  grid: {agent.tau: [0.005, 0.01]}          # optional: every combination, named in the trial names
  seeds: [0, 1, 2]
  resources: {num_cpus: 2, num_gpus: 0.25}  # per trial; fractional GPUs share one device
  max_retries: 2                     # a failed trial resumes from its last checkpoint up to this often

Re-running a sweep skips finished trials and resumes the others. ROOT/summary.md and
ROOT/summary.json hold the final table and every trial's attempts. One sweep at a time per ROOT.
More in docs/sweep.md.
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of presets x overrides x seeds on Ray",
        description="Run every trial of a sweep spec as a Ray task (a local Ray by default), each in its own run "
        "directory ROOT/<trial>. Failed trials are retried from their last checkpoint; finished ones are skipped "
        "when the sweep runs again. Writes ROOT/summary.md and ROOT/summary.json.",
        epilog=SPEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", type=Path, help="sweep spec YAML, e.g. configs/sweeps/mt10_methods.yaml")
    p.add_argument(
        "--address",
        help="join an existing Ray cluster: auto (this machine's), HOST:6379, or ray://HOST:10001 (default: start a "
        "local Ray for this sweep)",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: all visible)")
    p.add_argument(
        "--status-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds between progress lines of the running and waiting trials (default 60)",
    )
    p.add_argument("--dry-run", action="store_true", help="list each trial and what it would do; start nothing")


def run(args: argparse.Namespace) -> int:
    if args.address is not None and (args.num_cpus is not None or args.num_gpus is not None):
        raise ConfigError("--num-cpus and --num-gpus size a local Ray; an existing cluster (--address) has its own")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be >= 1, found {args.num_cpus}")
    if args.num_gpus is not None and args.num_gpus < 0:
        raise ConfigError(f"--num-gpus must be >= 0, found {args.num_gpus}")
    if not args.status_every > 0:
        raise ConfigError(f"--status-every must be > 0, found {args.status_every}")
    spec = load_spec(args.spec)
    return run_sweep(spec, args.address, args.num_cpus, args.num_gpus, args.status_every, args.dry_run)
