"""A run directory: the names of its files, and the one place where they are written and read.

    RUN_DIR/
      config.yaml        the run's resolved config; a baseline run's starts with `method: sac_single_task`
      metrics.jsonl      one JSON record per line, appended as the run logs
      tb/                TensorBoard event files
      checkpoints/       `mtrl train`: step_<step>.pt (the newest `checkpoint.keep_last`) and best.pt
      baseline/          `mtrl baseline`: one SB3 agent per task and state.json, committed through .pending/

Every file that must survive a kill is written by `atomic_write`: into a hidden temporary next to
its target (`.<name>.<random>.tmp`), flushed to disk, renamed over the target, and the directory
flushed too. A reader sees the previous file or the complete new one, never half of one;
`remove_temporaries` deletes what a killed writer left. `metrics.jsonl` is only appended to, so a
kill can cut its last line short: `read_records` skips lines that are not JSON records.

Public API
- Names: `CONFIG_FILE`, `METRICS_FILE`, `TENSORBOARD_DIR`, `CHECKPOINT_DIR`, `BEST_CHECKPOINT`,
  `step_checkpoint_name(step)`, `STEP_CHECKPOINT` (the pattern of those names), `BASELINE_DIR`,
  `BASELINE_STATE`, `PENDING_DIR`, `METHOD_TAGS` (command -> the `method` tag its config.yaml holds).
- Durable writes: `atomic_write(path, data)` (bytes, text, or a function writing into a binary
  file), `move_into_place(source, target)` (an atomic rename, for files staged elsewhere),
  `sync_dir(path)`, `remove_temporaries(directory) -> int`.
- Metrics: `append_record(path, record)`, `parse_records(lines)`, `read_records(path)`,
  `drop_records_after(path, step)`.
- Config: `write_config(run_dir, cfg, command)`, `read_config(run_dir, command) -> dict` (without the
  tag; a `ConfigError` for an unreadable file or another command's run).
- Starting or resuming (`mtrl train` and `mtrl baseline`): `check_start_or_resume(preset, resume)`,
  `holds_run(run_dir)`, `default_run_dir(preset, command)`, `new_run_dir(run_dir, preset, command)`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtrl.config import Config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.pt"
STEP_CHECKPOINT = re.compile(r"^step_(\d{10})\.pt$")
BASELINE_DIR = "baseline"
BASELINE_STATE = "state.json"
PENDING_DIR = ".pending"
# The `method` key a run's config.yaml starts with, by the command that wrote it (none: `mtrl train`).
METHOD_TAGS: dict[str, str | None] = {"train": None, "baseline": "sac_single_task"}


def step_checkpoint_name(step: int) -> str:
    return f"step_{step:010d}.pt"


# ----- durable writes ---------------------------------------------------------------------------
def sync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Write `data` (bytes, UTF-8 text, or a function that writes into the open binary file) to `path`
    so that readers see the previous file or the complete new one; makes the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def move_into_place(source: Path, target: Path) -> None:
    """Rename `source` (written durably, on the same file system) over `target`, atomically."""
    os.replace(source, target)


def remove_temporaries(directory: Path) -> int:
    """Delete the temporaries of `atomic_write`s that a kill cut short; returns how many."""
    stale = list(Path(directory).glob(".*.tmp"))  # nothing when the directory does not exist
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# ----- metrics.jsonl ------------------------------------------------------------------------------
def append_record(path: Path, record: dict[str, Any]) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def _records_and_lines(lines: Iterable[str | bytes]) -> Iterator[tuple[dict[str, Any], str | bytes]]:
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(record, dict):
            yield record, line


def parse_records(lines: Iterable[str | bytes]) -> Iterator[dict[str, Any]]:
    """The JSON records among `lines`, skipping what does not parse (a last line cut short by a kill)."""
    return (record for record, _ in _records_and_lines(lines))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (`metrics.jsonl`); none when it does not exist."""
    path = Path(path)
    return list(parse_records(path.read_text().splitlines())) if path.is_file() else []


def drop_records_after(path: Path, step: int) -> None:
    """Keep only the records logged at or before `step` (and drop lines cut short): a resumed run's
    metrics then hold neither gaps nor duplicates."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for record, line in _records_and_lines(path.read_text().splitlines()) if record.get("step", 0) <= step]
    atomic_write(path, "".join(f"{line}\n" for line in kept))


# ----- config.yaml ----------------------------------------------------------------------------
def write_config(run_dir: Path, cfg: Config, command: str = "train") -> None:
    """The run's resolved config, tagged with its method when `command` is not `train`."""
    from mtrl.config import to_yaml

    tag = METHOD_TAGS[command]
    header = "" if tag is None else f"method: {tag}\n"
    atomic_write(Path(run_dir) / CONFIG_FILE, header + to_yaml(cfg))


def read_config(run_dir: Path, command: str = "train") -> dict[str, Any]:
    """The config a run of `command` saved in `run_dir`, as a dict without its method tag; a
    ConfigError when it cannot be read or belongs to a run of another command."""
    import yaml

    from mtrl.config import ConfigError

    path = Path(run_dir) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the run's config {path}: {type(err).__name__}") from None
    if not isinstance(data, dict) or data.pop("method", None) != METHOD_TAGS[command]:
        raise ConfigError(f"{path} is not the config of an `mtrl {command}` run")
    return data


# ----- starting or resuming a run -------------------------------------------------------------
def check_start_or_resume(preset: Path | None, resume: Path | None) -> None:
    """`--config PRESET` starts a run, `--resume RUN_DIR` continues one with its saved config."""
    from mtrl.config import ConfigError

    if resume is not None and preset is not None:
        raise ConfigError("--resume takes the config saved in the run; drop --config (overrides are allowed)")
    if resume is None and preset is None:
        raise ConfigError("give --config PATH (e.g. configs/quickstart.yaml) or --resume RUN_DIR")


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds something to resume: a periodic checkpoint or a baseline commit."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.is_dir() and any(STEP_CHECKPOINT.match(p.name) for p in checkpoints.iterdir()):
        return True
    baseline = run_dir / BASELINE_DIR
    return (baseline / BASELINE_STATE).is_file() or (baseline / PENDING_DIR / BASELINE_STATE).is_file()


def default_run_dir(preset: Path | None, command: str = "train") -> Path:
    """runs/<preset>[-<method>]-<date>-<time>, relative to the working directory."""
    parts = [preset.stem if preset is not None else "run", METHOD_TAGS[command], time.strftime("%Y%m%d-%H%M%S")]
    return Path("runs") / "-".join(part for part in parts if part)


def new_run_dir(run_dir: str | Path | None, preset: Path | None, command: str = "train") -> Path:
    """Where a new run goes: `run.dir`, or the default name; a ConfigError when it already holds a run."""
    from mtrl.config import ConfigError

    path = Path(run_dir) if run_dir else default_run_dir(preset, command)
    if holds_run(path):
        raise ConfigError(f"{path} already holds a run; continue it with --resume {path} or pick another run.dir")
    return path
