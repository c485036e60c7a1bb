"""Run logging: TensorBoard scalars, a JSON-lines metrics file and a console summary."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from mtrl import rundir

log = logging.getLogger("mtrl")


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record is emitted, not as it was when the handler was
    made: a redirected or captured stderr (pytest's `capsys`) receives the records logged after."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # always the current sys.stderr


def setup_console(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


class Tracker(Protocol):
    """A further sink of the run log's records (W&B: `mtrl.tracking.WandbTracker`)."""

    def log(self, record: dict[str, Any]) -> None: ...

    def log_videos(self, step: int, videos: dict[str, Path]) -> None: ...

    def close(self) -> None: ...


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


class MetricLogger:
    """Writes each record to TensorBoard and `metrics.jsonl`.

    Values may be scalars or per-task vectors; a vector is logged as its (nan-ignoring) mean under
    its key and per task under `key/<task>`. On resume, records after the checkpoint's step are
    dropped from both sinks, so a run's metrics never hold gaps or duplicates.
    """

    def __init__(
        self,
        run_dir: Path,
        task_names: list[str],
        tensorboard: bool,
        resume_step: int | None = None,
        trackers: Sequence[Tracker] = (),
    ):
        self.path = Path(run_dir) / rundir.METRICS_FILE
        self.task_names = task_names
        self.trackers = list(trackers)  # further sinks of every record (mtrl.tracking)
        if resume_step is not None:
            rundir.drop_records_after(self.path, resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / rundir.TENSORBOARD_DIR), purge_step=purge)

    def log(self, step: int, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step, "kind": kind}
        for key, value in values.items():
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim == 0:
                record[key] = _finite_or_none(float(arr))
                if self.writer is not None:
                    self.writer.add_scalar(key, float(arr), step)
                continue
            mean = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
            record[key] = _finite_or_none(mean)
            names = self.task_names if arr.shape[0] == len(self.task_names) else [str(i) for i in range(len(arr))]
            record[f"{key}/per_task"] = {n: _finite_or_none(float(v)) for n, v in zip(names, arr, strict=True)}
            if self.writer is not None:
                self.writer.add_scalar(key, mean, step)
                for n, v in zip(names, arr, strict=True):
                    if math.isfinite(v):
                        self.writer.add_scalar(f"{key}/{n}", float(v), step)
        rundir.append_record(self.path, record)
        for tracker in self.trackers:
            tracker.log(record)
        return record

    def log_videos(self, step: int, videos: dict[str, Path]) -> None:
        """Evaluation videos (task -> mp4 file): to the trackers that take videos (W&B)."""
        for tracker in self.trackers:
            tracker.log_videos(step, videos)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close()
