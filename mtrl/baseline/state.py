"""RUN_DIR/baseline/: the commit that saves every agent at once, and what a resume reads back.

A commit writes the agents' files into baseline/.pending/, then its state.json, the commit point, then
moves them into place, state.json last. A kill before the staged state.json leaves debris that `recover`
drops; a kill after it leaves a complete commit that `recover` (and `read_state`) finds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtrl import rundir
from mtrl.config import Config, ConfigError

METHOD = rundir.METHOD_TAGS["baseline"]
BASELINE_DIR, STATE_FILE, PENDING_DIR = rundir.BASELINE_DIR, rundir.BASELINE_STATE, rundir.PENDING_DIR
# Config sections a resume may not change: the saved agents and buffers were built for them.
FIXED_ON_RESUME = ("seed", "env", "agent", "train.buffer_capacity")


def commit(baseline_dir: Path, state: dict[str, Any], write_files: Callable[[Path], None]) -> None:
    """Save one chunk: `write_files(stage)` writes the agents' files, `state` becomes state.json."""
    stage = baseline_dir / PENDING_DIR
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    write_files(stage)
    rundir.atomic_write(stage / STATE_FILE, json.dumps({"method": METHOD, **state}).encode())  # the commit point
    rundir.sync_dir(stage)
    _promote(baseline_dir)


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
