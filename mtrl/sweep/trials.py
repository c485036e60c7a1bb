"""The trials of a spec (presets x grid points x seeds), their names, and what their run directories hold."""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrl import rundir
from mtrl.config import Config, ConfigError
from mtrl.sweep.spec import SweepSpec, spec_error, yaml_value

# Keys that say how a trial runs, not what it learns: they may change between runs of a sweep
# (a longer train.total_steps extends finished trials) and are passed again on every resume.
RUNTIME_KEYS = ("run.dir", "log.progress", "train.torch_threads", "train.total_steps")
MAX_NAME = 120  # characters of a trial name, well under the 255 of a file name
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


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


def _trial(spec: SweepSpec, preset: Path, point: dict[str, Any], seed: int) -> Trial:
    """One trial, its config loaded and checked."""
    from mtrl.config import load_config

    name = trial_name(preset.stem, point, seed)
    run_dir = spec.root / name
    overrides = [
        *(f"{k}={yaml_value(v)}" for k, v in spec.overrides.items()),
        *(f"{k}={yaml_value(v)}" for k, v in point.items()),
        f"seed={seed}",
        f"run.dir={run_dir}",
        "log.progress=false",
    ]
    given = len(overrides)
    try:
        cfg = load_config(preset, overrides)
        if cfg.train.torch_threads == 0:
            overrides.append(f"train.torch_threads={spec.resources.torch_threads}")
        # A tracked trial's W&B group is the sweep's name, unless its config names one. Read with
        # getattr: a config without W&B keys leaves the overrides as they are.
        if getattr(cfg.log, "wandb", False) and not getattr(cfg.log, "wandb_group", None):
            overrides.append(f"log.wandb_group={yaml_value(spec.name)}")
        if len(overrides) > given:
            cfg = load_config(preset, overrides)
    except ConfigError as err:
        raise ConfigError(f"sweep spec {spec.source}: trial {name}: {err}") from None
    if spec.resources.num_gpus == 0 and cfg.device.startswith("cuda"):
        raise ConfigError(
            f"sweep spec {spec.source}: trial {name}: device={cfg.device} needs a GPU; set "
            "resources.num_gpus (e.g. 0.25) or use device=auto"
        )
    return Trial(name, spec.command, preset, point, seed, run_dir, overrides, cfg)


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep, its config loaded and checked: presets x grid points x seeds."""
    keys = list(spec.grid)
    trials: dict[str, Trial] = {}
    for preset in spec.presets:
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            for seed in spec.seeds:
                trial = _trial(spec, preset, point, seed)
                if trial.name in trials:
                    other = trials[trial.name].point
                    raise spec_error(spec.source, "grid", f"two trials get the name {trial.name}: {other} and {point}")
                trials[trial.name] = trial
    return list(trials.values())


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
        from mtrl import baseline

        return baseline.saved_step(run_dir)
    from mtrl import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir)
    return None if latest is None else ckpt.checkpoint_step(latest)


def run_progress(trial: Trial) -> int | None:
    """The step the trial's run can resume from (None: nothing to resume), after checking it is this trial's run."""
    from mtrl.config import config_from_dict

    where = f"trial {trial.name}: {trial.run_dir}"
    step = saved_step(trial.command, trial.run_dir)
    if step is None and not (trial.run_dir / rundir.CONFIG_FILE).is_file():
        return None
    try:
        saved = config_from_dict(rundir.read_config(trial.run_dir, trial.command))
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
