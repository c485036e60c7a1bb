"""`mtrl sweep SPEC.yaml`: a grid of presets x overrides x seeds, one Ray task per trial.

A trial is one `mtrl train` (or `mtrl baseline`) run in its own directory, `ROOT/<trial name>`.
Ray places the trials on the CPUs and (fractional) GPUs each asks for and retries a failed one;
every attempt resumes from the trial's own latest checkpoint, so a retry loses at most the steps
since that checkpoint. A trial whose latest checkpoint is at its `train.total_steps` is finished,
and running the sweep again skips it.

Each Ray task only looks after one training process (`python -m mtrl train ...`): it writes the
process's pid to `trial.pid`, appends the attempt's start and exit to `sweep_events.jsonl` and the
process's output to `train.log`, all in the trial's directory. The driver reads those files and the
trials' `metrics.jsonl` to report progress and to write `ROOT/summary.md` and `ROOT/summary.json`,
so on a multi-node cluster ROOT must be on a filesystem that the driver and every node share.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtrl.config import Config, ConfigError

COMMANDS = ("train", "baseline")
SPEC_KEYS = ("name", "root", "command", "presets", "overrides", "grid", "seeds", "resources", "max_retries")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
# Set by the sweep for every trial: the seed from `seeds`, the run directory from `root`.
RESERVED_KEYS = {"seed": "the trial's seed comes from `seeds`", "run.dir": "the run directory is ROOT/<trial name>"}
# Keys that say how a trial runs, not what it learns: they may change between runs of a sweep
# (a longer train.total_steps extends finished trials) and are passed again on every resume.
RUNTIME_KEYS = ("run.dir", "log.progress", "train.torch_threads", "train.total_steps")

EVENTS_FILE = "sweep_events.jsonl"
PID_FILE = "trial.pid"
TRAIN_LOG = "train.log"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
BAD_INPUT_EXIT = 2  # what the mtrl CLI returns for bad input: a retry would fail the same way
MAX_NAME = 120  # characters of a trial name, well under the 255 of a file name
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_DOTTED_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_POLL_SECONDS = 0.5
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the driver stops the sweep on these
_STOP_TIMEOUT = 120.0  # seconds for stopped trials to write their checkpoints (a replay buffer can be large)

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
ROOT/summary.json hold the final table. More in docs/sweep.md.
"""


class TrialCrashed(RuntimeError):
    """A training process ended before its last step (killed, preempted, crashed): worth a retry."""


class TrialRejected(RuntimeError):
    """A training process refused its input (exit code 2): a retry would fail the same way."""


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    @property
    def torch_threads(self) -> int:
        """Torch threads per trial: its CPU share, so trials side by side do not oversubscribe the cores."""
        return max(1, math.floor(self.num_cpus))


@dataclass
class SweepSpec:
    name: str
    root: Path
    presets: list[Path]
    seeds: list[int]
    source: Path
    command: str = "train"
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    max_retries: int = 2


@dataclass
class Trial:
    name: str
    command: str  # train | baseline
    preset: Path
    point: dict[str, Any]  # this trial's grid values
    seed: int
    run_dir: Path
    overrides: list[str]  # the `key=value` arguments after `--config preset`
    config: Config

    @property
    def total_steps(self) -> int:
        return self.config.train.total_steps

    def start_argv(self) -> list[str]:
        """The `mtrl` arguments that start this trial's run."""
        return [self.command, "--config", str(self.preset), *self.overrides]

    def resume_argv(self) -> list[str]:
        """The `mtrl` arguments that resume it: the saved config, with the keys a sweep may change between runs."""
        cfg = self.config
        return [
            self.command,
            "--resume",
            str(self.run_dir),
            f"train.total_steps={cfg.train.total_steps}",
            f"train.torch_threads={cfg.train.torch_threads}",
            "log.progress=false",
        ]


# ----- the spec -------------------------------------------------------------------------------
def _spec_error(source: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"sweep spec {source}: {key}: {message}")


def _read_yaml(path: Path) -> Any:
    if path.is_dir():
        raise ConfigError(f"sweep spec {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"sweep spec not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"malformed YAML in sweep spec {path}{where}: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read sweep spec {path}: not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"cannot read sweep spec {path}: {err.strerror or err}") from None


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _is_value(value: Any) -> bool:
    """A config value: a scalar or a list of scalars (mappings go through dotted keys instead)."""
    return _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value))


def yaml_value(value: Any) -> str:
    """A spec value written back as the YAML of a `key=value` override (what the CLI parses)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


def _dotted_mapping(source: Path, key: str, data: Any, lists: bool) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _spec_error(source, key, f"expected a mapping of dotted config keys, found {data!r}")
    out: dict[str, Any] = {}
    for name, value in data.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not _DOTTED_KEY.match(name):
            raise _spec_error(source, where, "not a dotted config key (e.g. combiner.c)")
        if name in RESERVED_KEYS:
            raise _spec_error(source, where, f"set by the sweep: {RESERVED_KEYS[name]}")
        if isinstance(value, dict):
            raise _spec_error(source, where, "found a mapping; give each key in dotted form (e.g. train.total_steps)")
        if lists:
            if not isinstance(value, list) or not value:
                raise _spec_error(source, where, f"expected a non-empty list of values, found {value!r}")
            bad = next((v for v in value if not _is_value(v)), None)
            if bad is not None:
                raise _spec_error(source, where, f"values must be scalars or lists of scalars, found {bad!r}")
            written = [yaml_value(v) for v in value]
            if len(set(written)) != len(written):
                raise _spec_error(source, where, f"duplicate values in {value!r}")
        elif not _is_value(value):
            raise _spec_error(source, where, f"expected a scalar or a list of scalars, found {value!r}")
        out[name] = value
    return out


def _number(source: Path, key: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise _spec_error(source, key, f"expected a number >= 0, found {value!r}")
    return float(value)


def _resources(source: Path, data: Any) -> Resources:
    if data is None:
        return Resources()
    if not isinstance(data, dict):
        raise _spec_error(source, "resources", f"expected a mapping with num_cpus and num_gpus, found {data!r}")
    for key in data:
        if key not in RESOURCE_KEYS:
            raise _spec_error(source, f"resources.{key}", f"unknown key; expected one of {', '.join(RESOURCE_KEYS)}")
    res = Resources(
        _number(source, "resources.num_cpus", data.get("num_cpus"), Resources.num_cpus),
        _number(source, "resources.num_gpus", data.get("num_gpus"), Resources.num_gpus),
    )
    if res.num_cpus == 0 and res.num_gpus == 0:
        raise _spec_error(source, "resources", "a trial needs num_cpus > 0 or num_gpus > 0")
    if res.num_gpus > 1 and not res.num_gpus.is_integer():
        # Ray shares a GPU between tasks only below one whole device.
        raise _spec_error(source, "resources.num_gpus", f"above 1 it must be a whole number, found {res.num_gpus}")
    return res


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; every problem is one ConfigError line naming the key."""
    source = Path(path)
    data = _read_yaml(source)
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {source}: expected a mapping of {', '.join(SPEC_KEYS)}")
    for key in data:
        if key not in SPEC_KEYS:
            raise _spec_error(source, str(key), f"unknown key; expected one of {', '.join(SPEC_KEYS)}")
    for key in ("name", "root", "presets", "seeds"):
        if data.get(key) is None:
            raise _spec_error(source, key, "missing (required)")

    name, root = data["name"], data["root"]
    if not isinstance(name, str) or not name.strip():
        raise _spec_error(source, "name", f"expected a non-empty string, found {name!r}")
    if not isinstance(root, str) or not root.strip():
        raise _spec_error(source, "root", f"expected a directory path, found {root!r}")
    command = data.get("command", "train")
    if command not in COMMANDS:
        raise _spec_error(source, "command", f"must be one of {', '.join(COMMANDS)}; found {command!r}")

    presets = data["presets"]
    if not isinstance(presets, list) or not presets or not all(isinstance(p, str) and p for p in presets):
        raise _spec_error(source, "presets", f"expected a non-empty list of config file paths, found {presets!r}")
    paths = [Path(p) for p in presets]
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise _spec_error(
                source,
                "presets",
                f"{stems[p.stem]} and {p} share the file name {p.stem!r}, which names their trials; rename one",
            )
        stems[p.stem] = p

    seeds = data["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise _spec_error(source, "seeds", f"expected a non-empty list of distinct integers >= 0, found {seeds!r}")

    overrides = _dotted_mapping(source, "overrides", data.get("overrides"), lists=False)
    grid = _dotted_mapping(source, "grid", data.get("grid"), lists=True)
    both = next((k for k in grid if k in overrides), None)
    if both is not None:
        raise _spec_error(source, f"grid.{both}", "also set in overrides; give it in one place")

    retries = data.get("max_retries", SweepSpec.max_retries)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise _spec_error(source, "max_retries", f"expected an integer >= 0, found {retries!r}")

    return SweepSpec(
        name=name,
        root=Path(root).absolute(),
        presets=[p.absolute() for p in paths],
        seeds=list(seeds),
        source=source,
        command=command,
        overrides=overrides,
        grid=grid,
        resources=_resources(source, data.get("resources")),
        max_retries=retries,
    )


# ----- the grid -------------------------------------------------------------------------------
def _name_value(value: Any) -> str:
    if isinstance(value, list):
        return "_".join(_name_value(v) for v in value)
    if value is None or isinstance(value, bool):
        return yaml_value(value)
    return str(value)


def trial_name(preset_stem: str, point: dict[str, Any], seed: int) -> str:
    """`<stem>[-<key>=<value>...]-s<seed>` in file-name-safe characters; long names end in a short hash."""
    body = "-".join([preset_stem, *(f"{k}={_name_value(v)}" for k, v in point.items())])
    safe = _UNSAFE.sub("_", body)
    if len(safe) > MAX_NAME:
        digest = hashlib.sha1(body.encode()).hexdigest()[:10]
        safe = f"{safe[: MAX_NAME - len(digest) - 1]}-{digest}"
    return f"{safe}-s{seed}"


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep, its config loaded and checked: presets x grid points x seeds."""
    from mtrl.config import load_config

    keys = list(spec.grid)
    fixed = [f"{k}={yaml_value(v)}" for k, v in spec.overrides.items()]
    trials: list[Trial] = []
    seen: dict[str, Trial] = {}
    for preset in spec.presets:
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            for seed in spec.seeds:
                name = trial_name(preset.stem, point, seed)
                run_dir = spec.root / name
                overrides = [
                    *fixed,
                    *(f"{k}={yaml_value(v)}" for k, v in point.items()),
                    f"seed={seed}",
                    f"run.dir={run_dir}",
                    "log.progress=false",
                ]
                try:
                    cfg = load_config(preset, overrides)
                except ConfigError as err:
                    raise ConfigError(f"sweep spec {spec.source}: trial {name}: {err}") from None
                if cfg.train.torch_threads == 0:
                    overrides.append(f"train.torch_threads={spec.resources.torch_threads}")
                    cfg.train.torch_threads = spec.resources.torch_threads
                if spec.resources.num_gpus == 0 and cfg.device.startswith("cuda"):
                    raise ConfigError(
                        f"sweep spec {spec.source}: trial {name}: device={cfg.device} needs a GPU; set "
                        "resources.num_gpus (e.g. 0.25) or use device=auto"
                    )
                if name in seen:
                    raise _spec_error(
                        spec.source, "grid", f"two trials get the name {name}: {seen[name].point} and {point}"
                    )
                trial = Trial(name, spec.command, preset, point, seed, run_dir, overrides, cfg)
                seen[name] = trial
                trials.append(trial)
    return trials


# ----- existing runs --------------------------------------------------------------------------
def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(run: Config, trial: Config) -> list[str]:
    from mtrl.config import to_dict

    a, b = _flatten(to_dict(run)), _flatten(to_dict(trial))
    keys = sorted(k for k in a.keys() | b.keys() if k not in RUNTIME_KEYS and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} in the sweep" for k in keys]


def saved_step(command: str, run_dir: Path) -> int | None:
    """The step a run can resume from (its latest checkpoint), or None when it holds none.

    Read from file names and small state files only: checkpoints are large when they hold the replay buffer.
    """
    if command == "baseline":
        from mtrl.baseline import read_state

        state = read_state(run_dir)
        return None if state is None else int(state["step"])
    from mtrl import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir)
    return None if latest is None else ckpt.checkpoint_step(latest)


def _saved_config(command: str, run_dir: Path) -> Config:
    """The run's config.yaml (written before its first checkpoint); a baseline run's also names its method."""
    from mtrl.config import config_from_dict

    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {path}: {type(err).__name__}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a run config")
    if (data.pop("method", None) is None) != (command == "train"):
        raise ConfigError(f"{path} is not the config of an `mtrl {command}` run")
    return config_from_dict(data)


def run_progress(trial: Trial) -> int | None:
    """The step the trial's run can resume from (None: nothing to resume), after checking it is this trial's run."""
    where = f"trial {trial.name}: {trial.run_dir}"
    step = saved_step(trial.command, trial.run_dir)
    if step is None and not (trial.run_dir / "config.yaml").is_file():
        return None
    try:
        saved = _saved_config(trial.command, trial.run_dir)
    except ConfigError as err:
        raise ConfigError(f"{where} holds another run: {err}; move it away or change root") from None
    if step is None:  # started, but killed before its first checkpoint: it starts again
        return None
    diff = _differences(saved, trial.config)
    if diff:
        more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
        raise ConfigError(
            f"{where} holds a run with another config ({'; '.join(diff[:2])}{more}); move it away or change root"
        )
    if step > trial.total_steps:
        raise ConfigError(f"{where} is at step {step}, beyond train.total_steps={trial.total_steps}")
    return step


# ----- one attempt, inside a Ray task ---------------------------------------------------------
def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    if code - 128 in (signal.SIGTERM, signal.SIGINT):
        return f"stopped on {signal.Signals(code - 128).name} (checkpoint saved)"
    if code == BAD_INPUT_EXIT:
        return "refused its input (exit code 2)"
    return f"exited with code {code}"


def _append_event(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / EVENTS_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """One attempt at a trial (the body of its Ray task): start or resume its training process, wait for it.

    Raises TrialCrashed (which Ray retries) or TrialRejected (which it does not) when the process fails.
    """
    command, run_dir = job["command"], Path(job["run_dir"])
    step = saved_step(command, run_dir)
    if step == job["total_steps"]:
        return {"status": "skipped"}
    argv = job["start"] if step is None else job["resume"]
    run_dir.mkdir(parents=True, exist_ok=True)
    attempt = 1 + sum(
        e["event"] in ("start", "resume") and e.get("sweep") == job["sweep_id"] for e in read_events(run_dir)
    )
    env = dict(os.environ)
    if not job["num_gpus"]:  # Ray reserved no GPU for this trial: `device: auto` must not take one
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.time()
    host = socket.gethostname()
    with (run_dir / TRAIN_LOG).open("a") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"### {stamp} sweep {job['sweep_id']} attempt {attempt} on {host}: mtrl {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "mtrl", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    (run_dir / PID_FILE).write_text(f"{proc.pid}\n")
    event = {"sweep": job["sweep_id"], "attempt": attempt, "host": host, "pid": proc.pid, "time": started}
    _append_event(run_dir, {"event": "start" if step is None else "resume", "step": step or 0, **event})
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
        _append_event(run_dir, {"event": "exit", "code": code, "cancelled": cancelled, **event, "time": time.time()})
    reached = saved_step(command, run_dir) or 0
    if code == 0 and reached == job["total_steps"]:
        return {"status": "finished"}
    where = f"see {run_dir / TRAIN_LOG}"
    if code == BAD_INPUT_EXIT:
        raise TrialRejected(f"attempt {attempt} {describe_exit(code)}; {where}")
    if code == 0:
        raise TrialCrashed(f"attempt {attempt} exited at step {reached} of {job['total_steps']}; {where}")
    raise TrialCrashed(f"attempt {attempt} {describe_exit(code)} at step {reached}; {where}")


# ----- the driver's view of a trial -----------------------------------------------------------
class MetricsTail:
    """Reads a run's metrics.jsonl incrementally: latest step, last and best eval success.

    A resume rewrites the file without the records after its checkpoint (a new file): then it is
    read again from the start.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._reset(None)

    def _reset(self, inode: int | None) -> None:
        self.inode, self.offset = inode, 0
        self.step = 0
        self.final_success: float | None = None
        self.best_success: float | None = None

    def update(self) -> MetricsTail:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return self
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self._reset(stat.st_ino)
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.step = max(self.step, int(record.get("step", 0)))
            success = record.get("eval/mean_success")
            if record.get("kind") == "eval" and success is not None:
                self.final_success = success
                self.best_success = success if self.best_success is None else max(self.best_success, success)
        return self


def wall_seconds(events: list[dict[str, Any]]) -> float:
    """Time spent in the trial's attempts, all runs of the sweep together."""
    starts = {(e.get("sweep"), e["attempt"]): e["time"] for e in events if e["event"] in ("start", "resume")}
    return sum(
        e["time"] - starts[(e.get("sweep"), e["attempt"])]
        for e in events
        if e["event"] == "exit" and (e.get("sweep"), e["attempt"]) in starts
    )


def _fmt_success(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _fmt_duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class _Tracked:
    trial: Trial
    status: str = "queued"  # queued | running | finished | skipped | failed | interrupted
    attempts: int = 0
    error: str = ""
    events_seen: int = 0
    metrics: MetricsTail = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = MetricsTail(self.trial.run_dir)


class Monitor:
    """Logs the trials' starts, resumes and failures from their event files, and their progress."""

    def __init__(self, trials: list[Trial], sweep_id: str, max_retries: int):
        from mtrl.logger import log

        self.log = log
        self.sweep_id, self.max_retries = sweep_id, max_retries
        self.tracked = {t.name: _Tracked(t) for t in trials}
        self.stopped_by: signal.Signals | None = None  # the signal that stopped the sweep

    def poll(self) -> None:
        for tr in self.tracked.values():
            if tr.status not in ("queued", "running"):
                continue
            events = read_events(tr.trial.run_dir)
            for e in events[tr.events_seen :]:
                if e.get("sweep") == self.sweep_id:
                    self._on_event(tr, e)
            tr.events_seen = len(events)

    def _on_event(self, tr: _Tracked, e: dict[str, Any]) -> None:
        name, attempt = tr.trial.name, e["attempt"]
        where = f"attempt {attempt}, pid {e['pid']} on {e['host']}"
        if e["event"] == "start":
            tr.status, tr.attempts = "running", attempt
            self.log.info("[%s] started (%s)", name, where)
        elif e["event"] == "resume":
            tr.status, tr.attempts = "running", attempt
            self.log.info("[%s] resumed from step %d (%s)", name, e["step"], where)
        elif e["event"] == "exit" and e["code"] not in (0, None) and not e.get("cancelled"):
            tr.status = "queued"
            if e["code"] == BAD_INPUT_EXIT:
                then = "not retried"
            elif attempt <= self.max_retries:
                then = "Ray retries it from its last checkpoint"
            else:
                then = "no retries left"
            self.log.warning("[%s] attempt %d %s; %s", name, attempt, describe_exit(e["code"]), then)

    def status(self) -> None:
        for tr in self.tracked.values():
            if tr.status != "running":
                continue
            m = tr.metrics.update()
            success = "no evaluation yet"
            if m.final_success is not None:
                success = f"eval success {m.final_success:.3f} (best {m.best_success:.3f})"
            self.log.info("[%s] step %d/%d, %s", tr.trial.name, m.step, tr.trial.total_steps, success)

    def finish(self, name: str, status: str, error: str = "") -> None:
        tr = self.tracked[name]
        tr.status, tr.error = status, error
        m = tr.metrics.update()
        if status == "finished":
            self.log.info(
                "[%s] finished: %d steps, eval success %s (best %s)",
                name,
                tr.trial.total_steps,
                _fmt_success(m.final_success),
                _fmt_success(m.best_success),
            )
        elif status == "failed":
            self.log.error("[%s] failed: %s", name, error)

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for tr in self.tracked.values():
            t = tr.trial
            m = tr.metrics.update()
            rows.append(
                {
                    "trial": t.name,
                    "status": tr.status,
                    "attempts": tr.attempts,
                    "steps": saved_step(t.command, t.run_dir) or 0,
                    "total_steps": t.total_steps,
                    "final_success": m.final_success,
                    "best_success": m.best_success,
                    "wall_seconds": round(wall_seconds(read_events(t.run_dir)), 3),
                    "preset": str(t.preset),
                    "grid": t.point,
                    "seed": t.seed,
                    "run_dir": str(t.run_dir),
                    "error": tr.error,
                }
            )
        return rows


# ----- the summary ----------------------------------------------------------------------------
def summary_markdown(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "skipped", "failed", "interrupted")}
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [
        f"# Sweep {spec.name}",
        "",
        f"`mtrl {spec.command}`, {len(rows)} trials in `{spec.root}`: {tally}. "
        "Skipped trials had finished before this run; wall time adds up all attempts.",
        "",
        "| trial | status | attempts | steps | final success | best success | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trial']} | {r['status']} | {r['attempts']} | {r['steps']}/{r['total_steps']} | "
            f"{_fmt_success(r['final_success'])} | {_fmt_success(r['best_success'])} | "
            f"{_fmt_duration(r['wall_seconds'])} |"
        )
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r['trial']}`: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def write_summary(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    text = summary_markdown(spec, rows)
    spec.root.mkdir(parents=True, exist_ok=True)
    payload = {"name": spec.name, "command": spec.command, "root": str(spec.root), "trials": rows}
    for name, content in ((SUMMARY_MD, text), (SUMMARY_JSON, json.dumps(payload, indent=2) + "\n")):
        tmp = spec.root / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, spec.root / name)
    return text


# ----- running the sweep ----------------------------------------------------------------------
def _job(spec: SweepSpec, trial: Trial, sweep_id: str) -> dict[str, Any]:
    return {
        "run_dir": str(trial.run_dir),
        "command": trial.command,
        "start": trial.start_argv(),
        "resume": trial.resume_argv(),
        "total_steps": trial.total_steps,
        "sweep_id": sweep_id,
        "num_gpus": spec.resources.num_gpus,
    }


def _check_cluster(spec: SweepSpec, local: bool) -> None:
    import ray

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


def _stop(pending: dict[Any, Trial], signals: list[signal.Signals]) -> None:
    """Cancel the unfinished trials; the running ones stop their training process with SIGTERM, which saves a
    checkpoint. Waits for that (the summary then shows it), unless a second signal asks to kill them at once."""
    import ray

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


def execute(spec: SweepSpec, trials: list[Trial], monitor: Monitor, status_every: float, local: bool) -> None:
    """Run the trials as Ray tasks on the initialised Ray, logging their progress through `monitor`."""
    import ray

    _check_cluster(spec, local)
    task = ray.remote(
        num_cpus=spec.resources.num_cpus,
        num_gpus=spec.resources.num_gpus,
        max_retries=spec.max_retries,
        retry_exceptions=[TrialCrashed],
    )(run_trial)
    pending = {task.options(name=f"mtrl-{t.name}").remote(_job(spec, t, monitor.sweep_id)): t for t in trials}
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
                    cause = getattr(err, "cause", None) or err
                    monitor.finish(trial.name, "failed", str(cause).strip().splitlines()[0])
                else:
                    monitor.finish(trial.name, result["status"])
            if time.monotonic() >= next_status:
                monitor.status()
                next_status = time.monotonic() + status_every
        if stop:
            monitor.stopped_by = stop[0]
            _stop(pending, stop)
            monitor.poll()
            for trial in pending.values():
                monitor.finish(trial.name, "interrupted")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
    from mtrl.logger import log

    trials = expand(spec)
    progress = {t.name: run_progress(t) for t in trials}
    done = [t for t in trials if progress[t.name] == t.total_steps]
    todo = [t for t in trials if progress[t.name] != t.total_steps]
    if dry_run:
        for t in trials:
            print(_plan_line(t, progress[t.name]))
        return 0
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
    if todo:
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
            execute(spec, todo, monitor, status_every, local=address is None)
        finally:
            ray.shutdown()
    rows = monitor.rows()
    print(write_summary(spec, rows), end="")
    log.info("summary: %s", spec.root / SUMMARY_MD)
    if monitor.stopped_by is not None:
        return 128 + monitor.stopped_by
    return 1 if any(r["status"] == "failed" for r in rows) else 0


# ----- command line ---------------------------------------------------------------------------
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
        help="seconds between progress lines of the running trials (default 60)",
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
