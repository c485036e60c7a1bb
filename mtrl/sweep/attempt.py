"""One attempt at a trial: the body of its Ray task, which looks after one training process.

It starts the run (`python -m mtrl train|baseline ...`), or resumes it when the run directory holds
a checkpoint, and waits for it. Meanwhile the trial's directory holds the process's pid
(`trial.pid`), its output (`train.log`) and one line per attempt start and exit
(`sweep_events.jsonl`): the driver reads those files, so on a cluster they must be on a filesystem
the driver shares. The outcome comes back as an `AttemptResult`; the driver decides about retries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrl import rundir
from mtrl.sweep.trials import Trial, saved_step

EVENTS_FILE = "sweep_events.jsonl"
PID_FILE = "trial.pid"
TRAIN_LOG = "train.log"
BAD_INPUT_EXIT = 2  # what the mtrl CLI returns for bad input: a retry would fail the same way


@dataclass(frozen=True)
class TrialJob:
    """What a Ray task needs to run an attempt at a trial: plain values, sent to the worker."""

    run_dir: Path
    command: str
    start: list[str]  # the `mtrl` arguments that start the run ...
    resume: list[str]  # ... and those that resume it
    total_steps: int
    sweep_id: str  # marks this run of the sweep in the trial's events
    num_gpus: float

    @classmethod
    def of(cls, trial: Trial, sweep_id: str, num_gpus: float) -> TrialJob:
        return cls(
            trial.run_dir, trial.command, trial.start_argv(), trial.resume_argv(), trial.total_steps, sweep_id, num_gpus
        )


@dataclass(frozen=True)
class AttemptResult:
    """How an attempt ended. `status`: finished | skipped (finished before the attempt started) | crashed
    (worth a retry) | rejected (exit code 2: a retry would fail the same way)."""

    status: str
    attempt: int = 0
    ended: str = ""  # how the process ended, e.g. "was killed by SIGKILL"
    message: str = ""  # the one line about a failure: how, at which step, where its log is


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code - 128 in (signal.SIGTERM, signal.SIGINT):
        return f"stopped on {signal.Signals(code - 128).name} (checkpoint saved)"
    if code == BAD_INPUT_EXIT:
        return "refused its input (exit code 2)"
    return f"exited with code {code}"


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """The trial's attempt starts and exits, every run of the sweep, oldest first."""
    return rundir.read_records(Path(run_dir) / EVENTS_FILE)


def _last_line(path: Path) -> str:
    """The last non-empty line of a trial's log: the exception of a crashed run."""
    with contextlib.suppress(OSError):
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        if lines and not lines[-1].startswith("### "):
            return lines[-1]
    return ""


def run_attempt(job: TrialJob) -> AttemptResult:
    """One attempt at a trial: start or resume its training process, wait for it, say how it ended."""
    run_dir = Path(job.run_dir)
    step = saved_step(job.command, run_dir)
    if step == job.total_steps:
        return AttemptResult("skipped")
    argv = job.start if step is None else job.resume
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = 1 + sum(
        e["event"] in ("start", "resume") and e.get("sweep") == job.sweep_id for e in read_events(run_dir)
    )
    env = dict(os.environ)
    if not job.num_gpus:  # Ray reserved no GPU for this trial: `device: auto` must not take one
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.time()
    host = socket.gethostname()
    log_path = run_dir / TRAIN_LOG
    with log_path.open("a") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"### {stamp} sweep {job.sweep_id} attempt {attempt} on {host}: mtrl {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mtrl", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    (run_dir / PID_FILE).write_text(f"{proc.pid}\n")
    event = {"sweep": job.sweep_id, "attempt": attempt, "host": host, "pid": proc.pid, "time": started}
    events = run_dir / EVENTS_FILE
    rundir.append_record(events, {"event": "start" if step is None else "resume", "step": step or 0, **event})
    code: int | None = None
    cancelled = False
    try:
        while code is None:
            # Waiting in short slices: Ray's cancel arrives as a KeyboardInterrupt raised between two
            # Python instructions, never inside one long wait.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=1.0)
    except KeyboardInterrupt:  # the sweep is stopping: the trainer saves a checkpoint on SIGTERM and exits
        cancelled = True
        proc.terminate()
        code = proc.wait()
        raise
    finally:
        (run_dir / PID_FILE).unlink(missing_ok=True)
        reached = saved_step(job.command, run_dir) or 0
        exit_event = {"event": "exit", "code": code, "step": reached, "cancelled": cancelled}
        rundir.append_record(events, {**exit_event, **event, "time": time.time()})
    if code == 0 and reached == job.total_steps:
        return AttemptResult("finished", attempt)
    ended = describe_exit(code) if code else f"exited at step {reached} of {job.total_steps}"
    where = f"see {log_path}"
    if code == BAD_INPUT_EXIT:
        return AttemptResult("rejected", attempt, ended, f"attempt {attempt} {ended}; {where}")
    if code == 0:
        return AttemptResult("crashed", attempt, ended, f"attempt {attempt} {ended}; {where}")
    cause = f" ({line})" if code > 0 and (line := _last_line(log_path)) else ""
    return AttemptResult("crashed", attempt, ended, f"attempt {attempt} {ended} at step {reached}{cause}; {where}")
