"""Experiment tracking in Weights & Biases (`log.wandb: true`), next to TensorBoard and metrics.jsonl.

The tracker gets every record of the run log (`mtrl.logger.MetricLogger`): the scalars TensorBoard
gets, per-task values under `key/<task>`, at the same env step, train and eval records alike; the
resolved config is the W&B run's config. The W&B run id is kept in the run directory
(`wandb_run_id`), so `mtrl train --resume` continues the same W&B run. W&B's local files go to
`$WANDB_DIR` when set, else into the run directory (`wandb/`), so that an offline run
(`WANDB_MODE=offline`) travels with it and `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later.

W&B's steps only increase. A run killed between two checkpoints resumes from the older one and
logs the steps after it again: metrics.jsonl and TensorBoard drop the first attempt's records of
those steps, W&B keeps them and ignores the repeated ones (it warns once per step).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from mtrl.config import Config, to_dict

WANDB_ID_FILE = "wandb_run_id"


class WandbTracker:
    """One W&B run for one run directory: created on the first start, resumed on the next ones."""

    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            tmp = id_file.with_name(f".{WANDB_ID_FILE}.tmp")
            tmp.write_text(run_id + "\n")
            os.replace(tmp, id_file)  # kept before the run starts: a kill cannot lose it
        log = cfg.log
        self.run = wandb.init(
            project=log.wandb_project,
            entity=log.wandb_entity,
            group=log.wandb_group,
            tags=list(log.wandb_tags),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
        )
        # set after init: a resume may change some keys (e.g. train.total_steps), which init's config refuses
        self.run.config.update(to_dict(cfg), allow_val_change=True)

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: dict[str, Any]) -> None:
        """A run-log record: `step`, `kind`, scalars (None where not finite) and `key/per_task` mappings."""
        values: dict[str, float] = {}
        for key, value in record.items():
            if key in ("step", "kind"):
                continue
            if key.endswith("/per_task"):
                base = key.removesuffix("/per_task")
                values.update({f"{base}/{task}": v for task, v in value.items() if v is not None})
            elif value is not None:
                values[key] = value
        self.run.log(values, step=record["step"])

    def log_videos(self, step: int, videos: dict[str, Path]) -> None:
        """Evaluation videos, one per task, under `video/<task>`."""
        import wandb

        self.run.log(
            {f"video/{task}": wandb.Video(str(path), format="mp4") for task, path in videos.items()},
            step=step,
        )

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: Config, run_dir: Path) -> list[WandbTracker]:
    """The trackers `cfg.log` asks for (none by default)."""
    return [WandbTracker(cfg, run_dir)] if cfg.log.wandb else []
