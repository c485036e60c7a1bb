"""The driver: one `mtrl sweep` per root, the plan, the Ray loop, retries and stopping.

Each trial's attempt is one Ray task (`attempt.run_attempt`) with the resources of the spec. Ray
places the tasks; the driver decides about retries: an attempt that crashed, or whose Ray worker
died, is submitted again (at the back of Ray's queue) while the trial has retries left, and resumes
from the trial's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtrl.config import ConfigError
from mtrl.sweep.attempt import AttemptResult, TrialJob, run_attempt
from mtrl.sweep.monitor import SUMMARY_MD, Monitor, write_summary
from mtrl.sweep.spec import SweepSpec
from mtrl.sweep.trials import Trial, expand, run_progress

LOCK_FILE = "sweep.lock"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the driver stops the sweep on these
_POLL_SECONDS = 0.5
_STOP_TIMEOUT = 120.0  # seconds for stopped trials to write their checkpoints (a replay buffer can be large)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours the tracebacks it formats


# ----- one driver per root --------------------------------------------------------------------
def _holder(path: Path) -> tuple[int, str] | None:
    """The pid and host written in a lock file, or None when it holds neither (cut short by a kill)."""
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """Hold ROOT/sweep.lock (this driver's pid and host) while the sweep runs; refuse when another driver
    holds it. A lock whose driver is gone (same host, no such pid) is taken over. On the way out the lock
    goes, and so does ROOT when the lock created it and nothing else was written there."""
    path = root / LOCK_FILE
    made_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    try:
        while True:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(path)
                if holder is not None and holder[1] != host:
                    raise ConfigError(
                        f"{root} is in use by the `mtrl sweep` of pid {holder[0]} on {holder[1]}; if no sweep runs "
                        f"there any more, remove {path}"
                    ) from None
                if holder is not None and _alive(holder[0]):
                    raise ConfigError(
                        f"{root} is in use by another `mtrl sweep` (pid {holder[0]}); wait for it to end or stop it"
                    ) from None
                path.unlink(missing_ok=True)  # its driver is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {host}\n")
            break
    except BaseException:
        if made_root:
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if made_root:
            with contextlib.suppress(OSError):  # not empty: the sweep wrote there
                root.rmdir()


# ----- Ray ------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None, num_gpus: int | None) -> Iterator[Any]:
    """An initialised Ray: a local instance of our own (no dashboard), or the cluster at `address`."""
    # A new local Ray turns token authentication on unless RAY_AUTH_MODE says otherwise, and warns about it
    # on every start. Asking for that same default explicitly keeps the protection and the log quiet. Ray
    # reads the variable once, when it is imported: set later, it would disagree with the cluster it starts.
    # Ray leaves it set once it turned authentication on; so does the sweep.
    if address is None and "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise ConfigError("mtrl sweep needs Ray: pip install 'mtrl[sweep]'") from None
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # trial output goes to train.log
    if address is None:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **quiet)
    else:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as err:
            raise ConfigError(f"--address {address}: {str(err).splitlines()[0]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_cluster(ray: Any, spec: SweepSpec, local: bool) -> None:
    from mtrl.logger import log

    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    need = spec.resources
    if need.num_cpus <= cpus and need.num_gpus <= gpus:
        return
    message = (
        f"resources: a trial needs num_cpus={need.num_cpus:g} and num_gpus={need.num_gpus:g}, the Ray cluster has "
        f"CPU {cpus:g} and GPU {gpus:g}"
    )
    if local:
        raise ConfigError(f"{message}; lower resources in the spec or pass --num-cpus / --num-gpus")
    log.warning("%s; trials wait until the cluster grows", message)


def _lost(ray: Any, err: Exception, attempt: int) -> AttemptResult:
    """An attempt that returned nothing: its worker or node died, or the task itself raised."""
    cause = getattr(err, "cause", None) or err
    line = _ANSI.sub("", str(cause)).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(err, ray.exceptions.RayTaskError):
        return AttemptResult("rejected", attempt, f"raised {type(cause).__name__}", f"attempt {attempt}: {line}")
    return AttemptResult("crashed", attempt, "lost its Ray worker", f"attempt {attempt} lost its Ray worker: {line}")


def _stop(ray: Any, pending: dict[Any, Trial], signals: list[signal.Signals]) -> None:
    """Cancel the unfinished trials; the running ones stop their training process with SIGTERM, which saves a
    checkpoint. Waits for that (the summary then shows it), unless a second signal asks to kill them at once."""
    from mtrl.logger import log

    log.warning(
        "%s: stopping %d unfinished trials, each saving a checkpoint (again to kill them at once); run the sweep "
        "again to resume them",
        signals[0].name,
        len(pending),
    )
    for ref in pending:
        ray.cancel(ref)
    left, deadline = list(pending), time.monotonic() + _STOP_TIMEOUT
    while left and len(signals) == 1 and time.monotonic() < deadline:
        _, left = ray.wait(left, num_returns=len(left), timeout=_POLL_SECONDS)
    for ref in left:
        ray.cancel(ref, force=True)


def execute(
    ray: Any, spec: SweepSpec, trials: list[Trial], monitor: Monitor, status_every: float, local: bool
) -> signal.Signals | None:
    """Run the trials as Ray tasks, retrying crashed attempts; returns the signal that stopped the sweep, if one did."""
    _check_cluster(ray, spec, local)
    # Retries are the driver's (max_retries=0): it logs them, shows the waiting ones, and Ray prints nothing.
    task = ray.remote(num_cpus=spec.resources.num_cpus, num_gpus=spec.resources.num_gpus, max_retries=0)(run_attempt)

    def submit(trial: Trial) -> Any:
        job = TrialJob.of(trial, monitor.sweep_id, spec.resources.num_gpus)
        return task.options(name=f"mtrl-{trial.name}").remote(job)

    pending = {submit(t): t for t in trials}
    next_status = time.monotonic() + status_every
    # A signal only sets a flag: raising inside ray.wait (compiled code) would corrupt the call.
    stop: list[signal.Signals] = []
    previous = {s: signal.signal(s, lambda signum, _: stop.append(signal.Signals(signum))) for s in STOP_SIGNALS}
    try:
        while pending and not stop:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_POLL_SECONDS)
            monitor.poll()
            for ref in done:
                trial = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    result = _lost(ray, err, monitor.tracked[trial.name].attempts)
                if monitor.ended(trial.name, result):
                    pending[submit(trial)] = trial
            if time.monotonic() >= next_status:
                monitor.status()
                next_status = time.monotonic() + status_every
        if stop:
            _stop(ray, pending, stop)
            monitor.poll()
            for trial in pending.values():
                monitor.finish(trial.name, "interrupted")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return stop[0] if stop else None


# ----- the sweep ------------------------------------------------------------------------------
def _plan_line(trial: Trial, step: int | None) -> str:
    if step == trial.total_steps:
        return f"{trial.name}: finished (step {step}), skipped"
    if step is not None:
        return f"{trial.name}: resume from step {step}: mtrl {' '.join(trial.resume_argv())}"
    return f"{trial.name}: start: mtrl {' '.join(trial.start_argv())}"


def run_sweep(
    spec: SweepSpec,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    status_every: float = 60.0,
    dry_run: bool = False,
) -> int:
    """Check every trial, then run the unfinished ones on Ray.

    Returns 0 when every trial is finished, 1 when one failed, 128 + the signal when a signal stopped the sweep.
    """
    trials = expand(spec)
    if dry_run:
        for t in trials:
            print(_plan_line(t, run_progress(t)))
        return 0
    with root_lock(spec.root):
        return _run(spec, trials, address, num_cpus, num_gpus, status_every)


def _run(
    spec: SweepSpec,
    trials: list[Trial],
    address: str | None,
    num_cpus: int | None,
    num_gpus: int | None,
    status_every: float,
) -> int:
    from mtrl.logger import log

    progress = {t.name: run_progress(t) for t in trials}
    done = [t for t in trials if progress[t.name] == t.total_steps]
    todo = [t for t in trials if progress[t.name] != t.total_steps]
    resuming = sum(progress[t.name] is not None for t in todo)
    log.info(
        "sweep %s: %d trials (%d presets x %d grid points x %d seeds): %d finished already, %d to resume, %d to start",
        spec.name,
        len(trials),
        len(spec.presets),
        math.prod(len(v) for v in spec.grid.values()),
        len(spec.seeds),
        len(done),
        resuming,
        len(todo) - resuming,
    )
    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    monitor = Monitor(trials, sweep_id, spec.max_retries)
    for t in done:
        monitor.tracked[t.name].status = "skipped"
    stopped_by = None
    if todo:
        with ray_session(address, num_cpus, num_gpus) as ray:
            stopped_by = execute(ray, spec, todo, monitor, status_every, local=address is None)
    rows = monitor.rows()
    print(write_summary(spec, rows), end="")
    log.info("summary: %s", spec.root / SUMMARY_MD)
    if stopped_by is not None:
        return 128 + stopped_by
    return 1 if any(r["status"] == "failed" for r in rows) else 0
