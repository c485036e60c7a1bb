"""Run directories for `mtrl report`: finding and reading them, and grouping them into experiments.

An experiment is a set of runs that differ only in their seed. Two runs belong to one experiment when their
*signatures* are equal: the resolved config with the keys that do not change what is trained or measured
left out (`NOT_THE_EXPERIMENT`). Each experiment is labelled by its method and the keys in which it differs
from the other experiments of its benchmark (`cagrad c=0.2`, `cagrad c=0.9`).

The *protocol* (`PROTOCOL_KEYS` and the tasks) fixes what a success rate means; experiments of different
protocols are not put on one benchmark axis unless the caller allows it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtrl.config import ConfigError
from mtrl.rundir import CONFIG_FILE, METHOD_TAGS, METRICS_FILE, read_records

SUCCESS_KEY = "eval/success/per_task"
BASELINE_METHOD = METHOD_TAGS["baseline"]

# Keys (and sections) that do not change the experiment, left out of a run's signature:
# - which run it is and where it lives: seed, run.*;
# - what is logged or saved, and how often: log.*, checkpoint.*, combiner.diagnostics_every;
# - where and how fast it computes, with the same results (to float rounding, or another random stream as a
#   seed would give): device, env.vector_strategy, env.workers, eval.vector_strategy, train.torch_threads,
#   train.compile, train.buffer_device, train.rng_device;
# - when it evaluates and for how long it runs: eval.every, train.total_steps, train.max_bad_updates. The
#   report compares seeds only at their common evaluation steps and says where seeds stop at different steps.
NOT_THE_EXPERIMENT = (
    "seed",
    "run",
    "log",
    "checkpoint",
    "device",
    "combiner.diagnostics_every",
    "env.vector_strategy",
    "env.workers",
    "eval.vector_strategy",
    "eval.every",
    "eval.video_every",
    "train.total_steps",
    "train.max_bad_updates",
    "train.torch_threads",
    "train.compile",
    "train.buffer_device",
    "train.rng_device",
)
# Keys `mtrl baseline` ignores (its --help says so): a baseline's signature leaves them out too.
# (`agent.architecture` is the newer name of `agent.variant`; an architecture's own keys go with it.)
BASELINE_IGNORES = (
    "combiner",
    "optimizer.name",
    "agent.architecture",
    "agent.shared_temperature",
    "train.buffer_device",
)
# Keys that make up the method's name (`method_name`), so a label need not repeat them.
METHOD_KEYS = ("method", "combiner.name", "optimizer.name", "agent.architecture")
# The network's key: `agent.variant` in configs written before `agent.architecture` replaced it.
ARCHITECTURE_KEY, OLD_ARCHITECTURE_KEY, DEFAULT_ARCHITECTURE = "agent.architecture", "agent.variant", "conditioned"
# What a success rate means: runs that differ here do not share a benchmark axis unless asked.
PROTOCOL_KEYS = ("env.tasks", "env.reward_version", "env.max_episode_steps", "env.num_goals", "env.toy_tasks")
COMBINER_SECTION, AGENT_SECTION = "combiner.", "agent."


@dataclass(frozen=True)
class Run:
    """One run directory: its identity and its per-task evaluation success."""

    path: Path
    benchmark: str
    method: str
    seed: int
    signature: tuple[tuple[str, Any], ...]  # sorted (dotted key, value) pairs of the experiment's config
    steps: list[int]  # ascending evaluation steps
    success: dict[str, list[float]]  # task -> success at each of `steps`


@dataclass(frozen=True)
class Experiment:
    """All seeds of one experiment on one benchmark, aligned on the evaluation steps they share."""

    benchmark: str
    method: str
    label: str  # the method and the keys in which it differs from the benchmark's other experiments
    signature: tuple[tuple[str, Any], ...]
    seeds: list[int]
    paths: list[list[Path]]  # per seed, its run directories (several when one run covers only some tasks)
    tasks: list[str]
    steps: np.ndarray  # [S] evaluation steps common to all seeds
    success: np.ndarray  # [seeds, tasks, S]
    last_steps: list[int]  # per seed, its last evaluation step (to flag seeds that ran longer than others)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.signature)


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories among `paths`: each path is a run directory or a folder searched recursively.

    A run directory holds `config.yaml` or `metrics.jsonl` (it must hold both); the search does not
    descend into one.
    """
    found: list[Path] = []
    for root in paths:
        if not root.is_dir():
            raise ConfigError(f"{root}: no such directory")
        found.extend(_walk(root))
    unique = list(dict.fromkeys(found))
    if not unique:
        names = ", ".join(str(p) for p in paths)
        raise ConfigError(f"no run directories (holding {CONFIG_FILE} and {METRICS_FILE}) found in {names}")
    return unique


def _walk(directory: Path) -> list[Path]:
    has_config, has_metrics = (directory / CONFIG_FILE).is_file(), (directory / METRICS_FILE).is_file()
    if has_config or has_metrics:
        if not (has_config and has_metrics):
            missing = METRICS_FILE if has_config else CONFIG_FILE
            raise ConfigError(f"{directory}: no {missing} (a run directory holds {CONFIG_FILE} and {METRICS_FILE})")
        return [directory]
    return [run for child in sorted(directory.iterdir()) if child.is_dir() for run in _walk(child)]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to values; lists become tuples, so that a signature can be compared and hashed."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = tuple(value) if isinstance(value, list) else value
    return flat


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def _with_architecture(flat: dict[str, Any]) -> dict[str, Any]:
    """`agent.variant` renamed to `agent.architecture`, so that runs from before and after the rename compare."""
    flat = dict(flat)
    if OLD_ARCHITECTURE_KEY in flat:
        flat.setdefault(ARCHITECTURE_KEY, flat.pop(OLD_ARCHITECTURE_KEY))
    return flat


@functools.cache
def _defaults() -> dict[str, Any]:
    from mtrl.config import Config, to_dict

    defaults = _with_architecture(flatten(to_dict(Config())))
    return {k: v for k, v in defaults.items() if k != "combiner.name"}


def signature(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The experiment a run's config describes: its dotted keys and values without `NOT_THE_EXPERIMENT`
    (and, for a baseline run, without the keys the baseline ignores). A key the config lacks (written by an
    older mtrl) takes today's default."""
    flat = {**_defaults(), **_with_architecture(flatten(config))}
    if flat.get("method") == BASELINE_METHOD:
        dropped = NOT_THE_EXPERIMENT + BASELINE_IGNORES
        return tuple(sorted((k, v) for k, v in flat.items() if not _under(k, dropped) and not _architecture_own(k)))
    return tuple(sorted((k, v) for k, v in flat.items() if not _under(k, NOT_THE_EXPERIMENT)))


def method_name(config: dict) -> str | None:
    """A top-level `method` if the config names one, else `adatask` or the combiner; `-<architecture>`
    appended unless the architecture is the default one (`-multihead`)."""
    flat = _with_architecture(flatten(config))
    name = flat.get("method")
    if name is None:
        name = "adatask" if flat.get("optimizer.name") == "adatask" else flat.get("combiner.name")
    if name is None:
        return None
    architecture = flat.get(ARCHITECTURE_KEY, DEFAULT_ARCHITECTURE)
    return str(name) if architecture == DEFAULT_ARCHITECTURE else f"{name}-{architecture}"


def benchmark_name(config: dict) -> str | None:
    """`env.benchmark`; for MT1, with its task (different MT1 tasks are different benchmarks)."""
    flat = flatten(config)
    benchmark, tasks = flat.get("env.benchmark"), flat.get("env.tasks")
    if benchmark == "MT1" and isinstance(tasks, tuple) and len(tasks) == 1:
        return f"MT1 {tasks[0]}"
    return None if benchmark is None else str(benchmark)


def load_run(path: Path) -> Run:
    import yaml

    config_path, metrics_path = path / CONFIG_FILE, path / METRICS_FILE
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: not a mapping of config keys")
    benchmark, method, seed = benchmark_name(config), method_name(config), config.get("seed")
    if benchmark is None:
        raise ConfigError(f"{config_path}: no env.benchmark")
    if method is None:
        raise ConfigError(f"{config_path}: no method, optimizer.name or combiner.name to name the method by")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{config_path}: seed must be an integer, found {seed!r}")

    by_step: dict[int, dict[str, float]] = {}
    for record in read_records(metrics_path):  # skips a last line cut short by a kill
        if record.get("kind") != "eval":
            continue
        per_task, step = record.get(SUCCESS_KEY), record.get("step")
        if not isinstance(per_task, dict) or not per_task or not isinstance(step, int):
            raise ConfigError(f"{metrics_path}: an eval record without a step or {SUCCESS_KEY}: {str(record)[:80]}")
        for task, value in per_task.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"{metrics_path}: step {step}: success of {task} is {value!r}, not a number")
        by_step[step] = per_task
    if not by_step:
        raise ConfigError(f"{metrics_path}: no evaluation records (kind 'eval' with {SUCCESS_KEY})")
    steps = sorted(by_step)
    tasks = list(by_step[steps[0]])
    for step in steps:
        if set(by_step[step]) != set(tasks):
            raise ConfigError(f"{metrics_path}: step {step} reports other tasks than step {steps[0]}")
    success = {task: [float(by_step[step][task]) for step in steps] for task in tasks}
    return Run(path, benchmark, method, seed, signature(config), steps, success)


def format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "null"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _combiner_own(key: str) -> bool:
    """A combiner's own hyper-parameter (`combiner.c`), which means something else in another combiner."""
    from mtrl.config import CombinerConfig

    return (
        key.startswith(COMBINER_SECTION)
        and key.removeprefix(COMBINER_SECTION) not in CombinerConfig.__dataclass_fields__
    )


def _architecture_own(key: str) -> bool:
    """An architecture's own key (a number of experts), which means something else in another architecture."""
    from mtrl.config import AgentConfig

    common = set(AgentConfig.__dataclass_fields__) | {ARCHITECTURE_KEY.removeprefix(AGENT_SECTION)}
    return key.startswith(AGENT_SECTION) and key.removeprefix(AGENT_SECTION) not in common


def label_keys(experiments: list[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    """For each (method, config) of one benchmark, the keys its label shows.

    A key is shown when its value differs among the experiments of the same method (a key only some of them
    have counts as differing), or, unless it is part of the method's name or a combiner's or architecture's
    own key (CAGrad's `c` is not ConicGrad's `c`), among all experiments that have it. Experiments
    of one method then always get different labels.
    """
    keys = sorted({k for _, config in experiments for k in config})
    missing = object()

    def differ(k: str, members: list[dict[str, Any]], count_missing: bool) -> bool:
        values = [c.get(k, missing) for c in members if count_missing or k in c]
        return len({"<missing>" if v is missing else repr(v) for v in values}) > 1

    shown = []
    for method, config in experiments:
        same_method = [c for m, c in experiments if m == method]
        everyone = [c for _, c in experiments]
        shown.append(
            [
                k
                for k in keys
                if k in config
                and (
                    differ(k, same_method, count_missing=True)
                    or (
                        not _under(k, METHOD_KEYS) and not _combiner_own(k) and differ(k, everyone, count_missing=False)
                    )
                )
            ]
        )
    return shown


def labels(experiments: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """`method key=value ...` for each (method, config) of one benchmark (see `label_keys`).

    Keys are shortened to their last part (`combiner.c` -> `c`) unless two shown keys share it.
    """
    shown = label_keys(experiments)
    all_shown = {k for ks in shown for k in ks}
    last = [k.rsplit(".", 1)[-1] for k in all_shown]
    short = {k: (k.rsplit(".", 1)[-1] if last.count(k.rsplit(".", 1)[-1]) == 1 else k) for k in all_shown}
    return [
        " ".join([method, *(f"{short[k]}={format_value(config[k])}" for k in ks)])
        for (method, config), ks in zip(experiments, shown, strict=True)
    ]


def protocol(experiment: Experiment) -> tuple[tuple[str, Any], ...]:
    """What one success rate of the experiment means: `PROTOCOL_KEYS` and its tasks."""
    config = experiment.config
    return (*((k, config.get(k)) for k in PROTOCOL_KEYS), ("tasks", tuple(sorted(experiment.tasks))))


def check_one_protocol(benchmark: str, experiments: list[Experiment]) -> None:
    """A ConfigError naming the first difference when the experiments of a benchmark differ in protocol."""
    first = protocol(experiments[0])
    for other in experiments[1:]:
        for (key, value), (_, other_value) in zip(first, protocol(other), strict=True):
            if value == other_value:
                continue
            if key == "tasks":
                differing = ", ".join(sorted(set(value) ^ set(other_value))[:3])
                shown = f"{len(value)} tasks vs {len(other_value)}, differing in {differing}"
            else:
                shown = f"{format_value(value)} vs {format_value(other_value)}"
            raise ConfigError(
                f"{benchmark}: '{experiments[0].label}' and '{other.label}' differ in protocol ({key}: {shown}); "
                "report them separately, or pass --mix-protocols to put them on one axis"
            )


def group_runs(runs: list[Run], mix_protocols: bool = False) -> dict[str, list[Experiment]]:
    """Runs by benchmark (sorted), then by experiment (sorted by label); runs of one experiment with one seed
    are merged.

    Merging lets a baseline trained as one run per task count as one seed; the runs must then report
    disjoint tasks. Each experiment keeps the evaluation steps common to all its seeds. Experiments of
    different protocols on one benchmark are refused unless `mix_protocols`.
    """
    by_key: dict[tuple[str, tuple[tuple[str, Any], ...]], dict[int, list[Run]]] = {}
    for run in runs:
        by_key.setdefault((run.benchmark, run.signature), {}).setdefault(run.seed, []).append(run)

    grouped: dict[str, list[Experiment]] = {}
    for benchmark in sorted({b for b, _ in by_key}):
        keys = [key for key in by_key if key[0] == benchmark]
        methods = [next(iter(by_key[key].values()))[0].method for key in keys]
        names = labels([(m, dict(sig)) for m, (_, sig) in zip(methods, keys, strict=True)])
        experiments = [
            _experiment(benchmark, method, name, signature_, by_key[(benchmark, signature_)])
            for method, name, (_, signature_) in zip(methods, names, keys, strict=True)
        ]
        experiments.sort(key=lambda e: e.label)
        if not mix_protocols:
            check_one_protocol(benchmark, experiments)
        grouped[benchmark] = experiments
    return grouped


def _experiment(
    benchmark: str, method: str, label: str, signature_: tuple[tuple[str, Any], ...], by_seed: dict[int, list[Run]]
) -> Experiment:
    where = f"{label} on {benchmark}"
    seeds = sorted(by_seed)
    merged = [_merge_seed(by_seed[s], where) for s in seeds]
    tasks = list(merged[0][0])
    for s, (series, _) in zip(seeds, merged, strict=True):
        if set(series) != set(tasks):
            differ = sorted(set(series) ^ set(tasks))
            raise ConfigError(f"{where}: seed {s} and seed {seeds[0]} report different tasks ({', '.join(differ)})")
    common = sorted(set.intersection(*(set(steps) for _, steps in merged)))
    if not common:
        raise ConfigError(f"{where}: no evaluation step is common to all its runs (seeds {seeds})")
    return Experiment(
        benchmark=benchmark,
        method=method,
        label=label,
        signature=signature_,
        seeds=seeds,
        paths=[[r.path for r in by_seed[s]] for s in seeds],
        tasks=tasks,
        steps=np.array(common),
        success=np.array([[[series[t][step] for step in common] for t in tasks] for series, _ in merged]),
        last_steps=[max(steps) for _, steps in merged],
    )


def _merge_seed(runs: list[Run], where: str) -> tuple[dict[str, dict[int, float]], list[int]]:
    """Per-task success by step of one seed's runs, and the steps all those runs evaluated."""
    series: dict[str, dict[int, float]] = {}
    owner: dict[str, Path] = {}
    for run in runs:
        for task, values in run.success.items():
            if task in series:
                raise ConfigError(
                    f"{owner[task]} and {run.path} are both seed {run.seed} of {where} and both report {task}; "
                    "pass only one of them"
                )
            series[task] = dict(zip(run.steps, values, strict=True))
            owner[task] = run.path
    common = sorted(set.intersection(*(set(run.steps) for run in runs)))
    return series, common
