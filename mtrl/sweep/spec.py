"""The sweep spec: a YAML file checked against the structured config `SweepSpec`.

OmegaConf checks the keys and the types (an unknown key, a string where a number goes, a scalar
where a list goes); `_check` adds what types cannot say (non-empty, distinct, >= 0, reserved keys).
Every problem is one `ConfigError` line, `sweep spec PATH: KEY: ...`, raised before anything is
written.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, KeyValidationError, MissingMandatoryValue, OmegaConfBaseException

from mtrl.config import ConfigError, read_yaml

# Set by the sweep for every trial: the seed from `seeds`, the run directory from `root`.
RESERVED_KEYS = {"seed": "the trial's seed comes from `seeds`", "run.dir": "the run directory is ROOT/<trial name>"}
_DOTTED_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class Command(StrEnum):
    """The `mtrl` subcommand every trial runs."""

    train = "train"
    baseline = "baseline"


def _f(default: Any, expected: str, **kwargs: Any) -> Any:
    """A spec field; `expected` ends the message of a value of the wrong type ("expected <it>, found ...")."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"expected": expected}, **kwargs)
    return field(default=default, metadata={"expected": expected}, **kwargs)


@dataclass
class Resources:
    """What one trial asks Ray for."""

    num_cpus: float = _f(1.0, "a number >= 0")
    num_gpus: float = _f(0.0, "a number >= 0")

    @property
    def torch_threads(self) -> int:
        """Torch threads per trial: its CPU share, so trials side by side do not oversubscribe the cores."""
        return max(1, math.floor(self.num_cpus))


@dataclass
class SweepSpec:
    name: str = _f(MISSING, "a non-empty string")
    root: Path = _f(MISSING, "a directory path")
    command: Command = _f(Command.train, "one of train, baseline")
    presets: list[Path] = _f(MISSING, "a non-empty list of config file paths")
    overrides: dict[str, Any] = _f({}, "a mapping of dotted config keys")
    grid: dict[str, list[Any]] = _f({}, "a mapping of dotted config keys")
    seeds: list[int] = _f(MISSING, "a non-empty list of distinct integers >= 0")
    resources: Resources = field(
        default_factory=Resources, metadata={"expected": "a mapping with num_cpus and num_gpus"}
    )
    max_retries: int = _f(2, "an integer >= 0")
    # The file the spec was read from, for the messages; not a key of the file.
    source: Path = field(default=Path("sweep.yaml"), metadata={"omegaconf_ignore": True})


SPEC_KEYS = tuple(f.name for f in dataclasses.fields(SweepSpec) if not f.metadata.get("omegaconf_ignore"))
# What each value of `overrides` / `grid` must be, in the messages about one entry.
_ENTRY = {"overrides": "a scalar or a list of scalars", "grid": "a non-empty list of values"}


def spec_error(source: Path, key: str, message: str) -> ConfigError:
    return ConfigError(f"sweep spec {source}: {key}: {message}")


def yaml_value(value: Any) -> str:
    """A spec value written back as the YAML of a `key=value` override (what the CLI parses)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


def _type_error(source: Path, data: dict[str, Any], err: OmegaConfBaseException, top: str) -> ConfigError:
    """OmegaConf's error about the value of key `top`, as one line that names the key and the value found."""
    path = re.sub(r"\[\d+\]", "", getattr(err, "full_key", None) or top)  # seeds[1] -> seeds: the list is the value
    if isinstance(err, ConfigKeyError):
        section, _, key = path.rpartition(".")
        schema = Resources if section == "resources" else SweepSpec
        known = ", ".join(f.name for f in dataclasses.fields(schema) if not f.metadata.get("omegaconf_ignore"))
        return spec_error(source, path, f"unknown key; expected one of {known}")
    if isinstance(err, KeyValidationError):
        return spec_error(source, path, "not a dotted config key (e.g. combiner.c)")
    if top in _ENTRY and path != top:  # one entry of overrides / grid: its key holds dots of its own
        value = data[top][path.removeprefix(f"{top}.")]
        if isinstance(value, dict):
            return spec_error(source, path, "found a mapping; give each key in dotted form (e.g. train.total_steps)")
        return spec_error(source, path, f"expected {_ENTRY[top]}, found {value!r}")
    if path.startswith("resources.") and isinstance(data[top], dict):
        key = path.removeprefix("resources.")
        expected = {f.name: f.metadata["expected"] for f in dataclasses.fields(Resources)}[key]
        return spec_error(source, path, f"expected {expected}, found {data[top][key]!r}")
    expected = {f.name: f.metadata.get("expected") for f in dataclasses.fields(SweepSpec)}[top]
    return spec_error(source, top, f"expected {expected}, found {data[top]!r}")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _is_value(value: Any) -> bool:
    """A config value: a scalar or a list of scalars (mappings go through dotted keys instead)."""
    return _is_scalar(value) or (isinstance(value, list) and all(_is_scalar(v) for v in value))


def _check_entries(source: Path, section: str, entries: dict[str, Any]) -> None:
    for name, value in entries.items():
        where = f"{section}.{name}"
        if not _DOTTED_KEY.match(name):
            raise spec_error(source, where, "not a dotted config key (e.g. combiner.c)")
        if name in RESERVED_KEYS:
            raise spec_error(source, where, f"set by the sweep: {RESERVED_KEYS[name]}")
        values = value if section == "grid" else [value]
        if section == "grid" and not values:
            raise spec_error(source, where, f"expected a non-empty list of values, found {value!r}")
        bad = next((v for v in values if not _is_value(v)), None)
        if isinstance(bad, dict) and section == "overrides":
            raise spec_error(source, where, "found a mapping; give each key in dotted form (e.g. train.total_steps)")
        if bad is not None:
            raise spec_error(source, where, f"values must be scalars or lists of scalars, found {bad!r}")
        written = [yaml_value(v) for v in values]
        if len(set(written)) != len(written):
            raise spec_error(source, where, f"duplicate values in {value!r}")


def _check(spec: SweepSpec, data: dict[str, Any]) -> None:
    """What the types cannot say."""
    source = spec.source
    if not spec.name.strip():
        raise spec_error(source, "name", f"expected a non-empty string, found {data['name']!r}")
    if not str(data["root"]).strip():
        raise spec_error(source, "root", f"expected a directory path, found {data['root']!r}")
    if not spec.presets or not all(str(p).strip() for p in data["presets"]):
        raise spec_error(
            source, "presets", f"expected a non-empty list of config file paths, found {data['presets']!r}"
        )
    stems: dict[str, Path] = {}
    for p in spec.presets:
        if p.stem in stems:
            raise spec_error(
                source,
                "presets",
                f"{stems[p.stem]} and {p} share the file name {p.stem!r}, which names their trials; rename one",
            )
        stems[p.stem] = p
    seeds = spec.seeds
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise spec_error(
            source, "seeds", f"expected a non-empty list of distinct integers >= 0, found {data['seeds']!r}"
        )
    _check_entries(source, "overrides", spec.overrides)
    _check_entries(source, "grid", spec.grid)
    both = next((k for k in spec.grid if k in spec.overrides), None)
    if both is not None:
        raise spec_error(source, f"grid.{both}", "also set in overrides; give it in one place")
    res = spec.resources
    for key in ("num_cpus", "num_gpus"):
        value = getattr(res, key)
        if not math.isfinite(value) or value < 0:
            raise spec_error(source, f"resources.{key}", f"expected a number >= 0, found {data['resources'][key]!r}")
    if res.num_cpus == 0 and res.num_gpus == 0:
        raise spec_error(source, "resources", "a trial needs num_cpus > 0 or num_gpus > 0")
    if res.num_gpus > 1 and not res.num_gpus.is_integer():
        # Ray shares a GPU between tasks only below one whole device.
        raise spec_error(source, "resources.num_gpus", f"above 1 it must be a whole number, found {res.num_gpus}")
    if spec.max_retries < 0:
        raise spec_error(source, "max_retries", f"expected an integer >= 0, found {spec.max_retries}")


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; every problem is one ConfigError line naming the key.

    Relative paths (`root`, `presets`) are made absolute against the current directory.
    """
    source = Path(path)
    data = read_yaml(source, "sweep spec", prefix="sweep spec ")
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {source}: expected a mapping of {', '.join(SPEC_KEYS)}")
    data = {k: v for k, v in data.items() if v is not None}  # `key:` with nothing after it is unset
    schema = OmegaConf.structured(SweepSpec)
    # Key by key, so that an error always names its key (a merge of a whole mapping may not).
    for key, value in data.items():
        if not isinstance(key, str) or key not in SPEC_KEYS:
            raise spec_error(source, str(key), f"unknown key; expected one of {', '.join(SPEC_KEYS)}")
        try:
            schema = OmegaConf.merge(schema, {key: value})
        except (OmegaConfBaseException, TypeError) as err:
            if not isinstance(err, OmegaConfBaseException):  # a list merged into a mapping: no key in the error
                err = OmegaConfBaseException(str(err))
            raise _type_error(source, data, err, key) from None
    try:
        spec: SweepSpec = OmegaConf.to_object(schema)  # type: ignore[assignment]
    except MissingMandatoryValue as err:
        raise spec_error(source, str(err.full_key), "missing (required)") from None
    spec.source = source
    _check(spec, data)
    spec.root = spec.root.absolute()
    spec.presets = [p.absolute() for p in spec.presets]
    return spec
