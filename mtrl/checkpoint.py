"""Checkpoint files: atomic writes, keep-last-N and best-by-success, loads that execute no code.

This module handles files only; what a checkpoint holds is `mtrl.runstate`'s business.

A checkpoint is written by `mtrl.rundir.atomic_write` (a temporary next to it, flushed, renamed
over its final name): a reader sees either the previous file or the complete new one, never half
of one. A file whose `format` is not `FORMAT_VERSION` is refused. Loading uses
`torch.load(weights_only=True)`, which refuses any pickle that would import or call arbitrary objects.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtrl import rundir

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
CKPT_DIR = rundir.CHECKPOINT_DIR
BEST = rundir.BEST_CHECKPOINT
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive,
_PICKLE_PROTOCOL = b"\x80"  # or, in its legacy format, a pickle (protocol 2 and later open with this opcode)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe or from another config."""


def atomic_save(obj: Any, path: Path) -> None:
    import torch  # here, not at the top: the file-naming helpers below serve processes that never load a model

    rundir.atomic_write(path, lambda f: torch.save(obj, f))


def resolve(path: str | Path) -> Path:
    """`path` itself, or the latest periodic checkpoint when it is a run directory."""
    path = Path(path)
    if not path.is_dir():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint found in {path}")
    return latest


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dictionary in a checkpoint file (or the latest of a run directory); see `mtrl.runstate` for its contents."""
    import torch

    path = resolve(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as file:
        if not file.read(len(_ZIP_MAGIC)).startswith((_ZIP_MAGIC, _PICKLE_PROTOCOL)):
            raise CheckpointError(f"{path} is not an mtrl checkpoint (not a file written by torch.save)")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of files it is about to refuse anyway.
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises loading the file with `weights_only=False`, which would run its code.
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"the Python object {named.group(1)}" if named else "Python objects"
        raise CheckpointError(
            f"refused to load {path}: not a safe checkpoint (it holds {what}; an mtrl checkpoint holds only "
            "tensors and plain values)"
        ) from None
    except Exception as err:  # whatever the parser trips on (IndexError, KeyError, ...), the file is unreadable
        raise CheckpointError(
            f"cannot read checkpoint {path}: corrupt or truncated file ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an mtrl checkpoint (format {FORMAT_VERSION})")
    return state


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Periodic checkpoints of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if rundir.STEP_CHECKPOINT.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The step a periodic checkpoint was taken at, read from its name (no need to load it)."""
    match = rundir.STEP_CHECKPOINT.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not a periodic checkpoint (step_<step>.pt)")
    return int(match.group(1))


def save(state: dict[str, Any], run_dir: Path, step: int, keep_last: int, is_best: bool) -> Path:
    """Write `step_<step>.pt` (and `best.pt` if best), then prune to the newest `keep_last`."""
    state = {"format": FORMAT_VERSION, **state}
    d = checkpoint_dir(run_dir)
    path = d / rundir.step_checkpoint_name(step)
    atomic_save(state, path)
    if is_best:
        atomic_save(state, d / BEST)
    for old in step_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def remove_partial_writes(run_dir: Path) -> int:
    """Delete temporaries left by a process killed mid-write; returns how many."""
    return rundir.remove_temporaries(checkpoint_dir(run_dir))
