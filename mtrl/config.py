"""Typed run configuration: YAML presets + dotted overrides, validated by OmegaConf.

Every field carries a `help` string; `mtrl train --help` prints them all. Unknown keys and
ill-typed values are rejected by OmegaConf's structured configs; range checks live in
`validate` so that every impossible value fails before anything is written.

The `combiner` section holds the common keys of `CombinerConfig` plus the hyper-parameters of the
chosen combiner only, typed as that combiner declares them (`combiner_section`); the `agent`
section likewise holds the chosen architecture's own keys (`agent_section`). A preset may
build on others through a `defaults:` list (`preset_layers`); docs/config.md describes both.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class EnvConfig:
    benchmark: str = _f("MT10", "MT1 | MT10 | MT25 | MT50 | custom | toy (built-in, no MuJoCo)")
    tasks: list[str] = _f([], "MT1: one task name (e.g. reach-v3); custom: the task names; toy: unused")
    toy_tasks: int = _f(4, "number of tasks of the toy benchmark")
    vector_strategy: str = _f("sync", "training envs: sync | async | pool (several tasks per worker process)")
    workers: int = _f(0, "worker processes of vector_strategy=pool (0: min(tasks, usable cores))")
    reward_version: str = _f("v2", "Meta-World reward function: v2 (default) or v1 (paper protocol)")
    max_episode_steps: int = _f(500, "episode length (time limit); the paper protocol uses 150")
    num_goals: int = _f(50, "goals per task drawn on reset; the paper protocol uses 1")


@dataclass
class AgentConfig:
    architecture: str = _f("conditioned", "network of actor and critics (docs/architectures.md)")
    hidden_sizes: list[int] = _f([400, 400, 400], "hidden layer widths of actor and critics")
    actor_lr: float = _f(3e-4, "Adam learning rate of the actor")
    critic_lr: float = _f(3e-4, "Adam learning rate of the critics")
    alpha_lr: float = _f(3e-4, "Adam learning rate of the log-temperature")
    gamma: float = _f(0.99, "discount factor")
    tau: float = _f(0.005, "Polyak rate of the target critics, applied every update")
    init_temperature: float = _f(1.0, "initial entropy temperature alpha")
    target_entropy: float | None = _f(None, "target entropy; null means -|A|")
    shared_temperature: bool = _f(False, "one temperature for all tasks (the authors' harness) instead of one per task")
    log_std_min: float = _f(-20.0, "lower clamp of the policy log-std")
    log_std_max: float = _f(2.0, "upper clamp of the policy log-std")

    def hyper_parameters(self) -> dict[str, Any]:
        """The architecture's own keys and values: the one place its build arguments come from."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _COMMON_AGENT_KEYS}


_COMMON_AGENT_KEYS = frozenset(f.name for f in dataclasses.fields(AgentConfig))


@dataclass
class CombinerConfig:
    """The keys every combiner has; `combiner_section(name)` adds the hyper-parameters of combiner `name`."""

    name: str = _f("mean", "gradient combiner")
    networks: list[str] = _f(["critic", "actor"], "which losses are combined: any of critic, actor, alpha")
    diagnostics_every: int = _f(1000, "updates between combiner diagnostics in TensorBoard (0 = never)")

    def hyper_parameters(self) -> dict[str, Any]:
        """The combiner's own keys and values: the one place its build arguments come from."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _COMMON_COMBINER_KEYS}


_COMMON_COMBINER_KEYS = frozenset(f.name for f in dataclasses.fields(CombinerConfig))


def _extended(base: type, parameters: type, class_name: str, reduce: Any) -> type:
    """`base` plus the fields of the dataclass `parameters`, with their types, defaults and help."""
    own = dataclasses.fields(parameters)
    if not own:
        return base
    types = typing.get_type_hints(parameters)
    fields = [
        (f.name, types[f.name], field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
        for f in own
    ]
    return dataclasses.make_dataclass(
        class_name, fields, bases=(base,), namespace={"__module__": __name__, "__reduce__": reduce}
    )


@functools.cache
def combiner_section(name: str) -> type[CombinerConfig]:
    """The `combiner` section of combiner `name`: CombinerConfig plus the hyper-parameters the combiner
    declares (`mtrl.combiners`), with their types, defaults and help. A ValueError for an unknown name."""
    from mtrl.combiners import combiner_class

    cls = combiner_class(name)
    return _extended(CombinerConfig, cls.Parameters, f"{cls.__name__}Config", _reduce_section)


def _reduce_section(section: CombinerConfig) -> tuple[Any, ...]:
    # The generated classes are no module attributes: a pickle rebuilds them from the combiner's name.
    return _rebuild_section, (dataclasses.asdict(section),)


def _rebuild_section(values: dict[str, Any]) -> CombinerConfig:
    return combiner_section(values["name"])(**values)


@functools.cache
def agent_section(architecture: str) -> type[AgentConfig]:
    """The `agent` section of architecture `architecture`: AgentConfig plus the hyper-parameters the
    architecture declares (`mtrl.networks`). A ValueError for an unknown name."""
    from mtrl.networks import architecture_class

    cls = architecture_class(architecture)
    return _extended(AgentConfig, cls.Parameters, f"{cls.__name__}AgentConfig", _reduce_agent_section)


def _reduce_agent_section(section: AgentConfig) -> tuple[Any, ...]:
    return _rebuild_agent_section, (dataclasses.asdict(section),)


def _rebuild_agent_section(values: dict[str, Any]) -> AgentConfig:
    return agent_section(values["architecture"])(**values)


@dataclass
class OptimizerConfig:
    name: str = _f("adam", "adam | adatask (task-wise Adam on the shared parameters; combiner must be mean)")


@dataclass
class TrainConfig:
    total_steps: int = _f(2_000_000, "vector env steps to train for (one step = one transition per task)")
    warmup_steps: int = _f(1500, "vector steps of uniform random actions before learning starts")
    updates_per_step: int = _f(1, "gradient updates per vector step once learning has started")
    batch_per_task: int = _f(128, "transitions sampled per task per update (batch = K x this)")
    buffer_capacity: int = _f(1_000_000, "replay capacity in transitions, split equally over tasks")
    buffer_device: str = _f("auto", "auto (training device when it fits) | cpu | the training device")
    rng_device: str = _f(
        "auto",
        "where replay indices and policy noise are drawn: auto (the training device) | cpu (a CUDA run then "
        "draws exactly what a CPU run draws: for checks, slower)",
    )
    grad_clip_norm: float | None = _f(None, "clip each network's gradient to this norm (null = off)")
    q_target_clip: float | None = _f(
        None, "clip critic targets to [-x, x]; null = off, as in the reference recipe (a valve for diverging critics)"
    )
    max_bad_updates: int = _f(100, "stop the run after this many consecutive non-finite updates")
    overlap: bool = _f(
        False,
        "step the envs while the updates of the previous step run (async/pool envs: in parallel); each update "
        "then samples the replay without the transition still in flight",
    )
    torch_threads: int = _f(
        0, "CPU threads for torch; 0 = half the cores (leaves the rest to the envs: oversubscribed threads stall)"
    )
    compile: str = _f(
        "none",
        "none | default | reduce-overhead: run each update, steps included, as one torch.compile'd function whose "
        "skip decision stays on the device; reduce-overhead replays it as CUDA graphs (GPU). Compiling takes "
        "minutes at the first update; results equal the eager update's to float rounding",
    )


@dataclass
class EvalConfig:
    every: int = _f(50_000, "vector steps between evaluations (0 = only at the end)")
    episodes: int = _f(50, "evaluation episodes per task (the Meta-World protocol uses 50)")
    vector_strategy: str = _f("sync", "sync | async vectorisation of the evaluation envs")
    video_every: int = _f(
        0, "evaluations between videos of the evaluation episodes, in run.dir/videos/step_<step>/ (0 = none)"
    )
    video_episodes: int = _f(1, "evaluation episodes per task in each video")
    video_fps: float = _f(20.0, "video frame rate; only the frames kept are rendered (Meta-World steps at 80/s)")
    video_width: int = _f(256, "video width in pixels (even)")
    video_height: int = _f(256, "video height in pixels (even)")
    video_camera: str | None = _f(None, "camera of the videos; null = the benchmark's default (Meta-World: corner)")


@dataclass
class LogConfig:
    every: int = _f(1000, "vector steps between scalar logs (TensorBoard, metrics.jsonl)")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    progress: bool = _f(True, "show a progress bar")
    wandb: bool = _f(False, "also log to Weights & Biases (the wandb extra; WANDB_MODE=offline logs locally)")
    wandb_project: str = _f("mtrl", "W&B project")
    wandb_entity: str | None = _f(None, "W&B entity (user or team); null = your default entity")
    wandb_group: str | None = _f(None, "W&B run group (e.g. one per sweep); null = none")
    wandb_tags: list[str] = _f([], "W&B run tags")


@dataclass
class CheckpointConfig:
    every: int = _f(50_000, "vector steps between checkpoints (0 = at the end only)")
    keep_last: int = _f(3, "how many of the latest checkpoints to keep")
    keep_best: bool = _f(True, "also keep best.pt, the checkpoint with the best eval success")
    save_buffer: bool = _f(False, "store the replay buffer in checkpoints (exact resume of learning)")


@dataclass
class RunConfig:
    dir: str = _f("", "run directory (metrics, TensorBoard, checkpoints, config); empty = runs/<preset>-<time>")


@dataclass
class Config:
    seed: int = _f(0, "seed of every generator (envs, torch, sampling)")
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    combiner: CombinerConfig = field(default_factory=CombinerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _one_line(err: Exception) -> str:
    if isinstance(err, OmegaConfBaseException):
        msg = getattr(err, "msg", None) or str(err).splitlines()[0]
        key = getattr(err, "full_key", None)
        msg = msg.splitlines()[0]
        return f"{key}: {msg}" if key and key not in msg else msg
    return str(err).splitlines()[0]


def read_yaml(path: Path, what: str, prefix: str = "") -> Any:
    """The YAML document in `path` (a `what`, e.g. "config file"); every way of failing is one
    `ConfigError` line, `prefix` coming before the path in read errors."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"malformed YAML in {prefix}{path}{where}: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {prefix}{path}: not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"cannot read {prefix}{path}: {err.strerror or err}") from None


def _check_sections(schema: DictConfig, layer: DictConfig) -> None:
    """A section (`train`, `agent`, ...) given a plain value: OmegaConf's merge error would not name it."""
    for key in layer:
        if OmegaConf.is_dict(schema.get(key)) and not OmegaConf.is_dict(layer[key]):
            raise ConfigError(f"{key} must be a mapping of {key}.* keys, found {layer[key]!r}")


def preset_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The mappings preset `path` stands for, lowest first: the presets its `defaults:` list names (paths
    relative to `path`'s directory, each with its own bases), then its own keys. `chain` is the presets
    that led here, for the messages and to refuse cycles."""
    what = f"{chain[-1]}: defaults: base preset" if chain else "config file"
    data = read_yaml(path, what)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, found {type(data).__name__}")
    bases = data.pop("defaults", [])
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(
            f"{path}: defaults must be a list of preset files (relative to the preset's directory), found {bases!r}"
        )
    layers: list[dict[str, Any]] = []
    for entry in bases:
        base = path.parent / entry
        if any(base.resolve() == seen.resolve() for seen in (*chain, path)):
            raise ConfigError(f"{path}: defaults: cycle {' -> '.join(map(str, (*chain, path, base)))}")
        layers += preset_layers(base, (*chain, path))
    return [*layers, data]


def _typed_combiner(combiner: dict[str, Any]) -> type[CombinerConfig]:
    """The section class of the combiner `combiner` names, once its hyper-parameter keys are checked.

    A null hyper-parameter is unset, so the combiner's default applies: it is dropped from `combiner`.
    """
    from mtrl.combiners import check_hyper_parameter_names

    name = combiner["name"]
    for key in [k for k, v in combiner.items() if v is None and k not in _COMMON_COMBINER_KEYS]:
        del combiner[key]
    try:
        section = combiner_section(name)
        check_hyper_parameter_names(name, [k for k in combiner if k not in _COMMON_COMBINER_KEYS])
    except ValueError as err:
        raise ConfigError(f"combiner: {err}") from None
    return section


def _typed_agent(agent: dict[str, Any]) -> type[AgentConfig]:
    """The section class of the architecture `agent` names, once its own keys are checked (nulls dropped,
    as for the combiner)."""
    from mtrl.networks import check_architecture_parameter_names

    if "variant" in agent:
        raise ConfigError(
            f"agent.variant was replaced by agent.architecture (agent.architecture={agent['variant']} "
            "does what agent.variant did)"
        )
    name = agent["architecture"]
    for key in [k for k, v in agent.items() if v is None and k not in _COMMON_AGENT_KEYS]:
        del agent[key]
    try:
        section = agent_section(name)
        check_architecture_parameter_names(name, [k for k in agent if k not in _COMMON_AGENT_KEYS])
    except ValueError as err:
        raise ConfigError(f"agent: {err}") from None
    return section


def _saved_before_architectures(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config (checkpoint, config.yaml) from before `agent.architecture` names its network by
    `agent.variant` (conditioned | multihead): the same network under the new key."""
    agent = saved.get("agent")
    if not isinstance(agent, dict) or "variant" not in agent:
        return saved
    agent = dict(agent)
    agent.setdefault("architecture", agent.pop("variant"))
    return {**saved, "agent": agent}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults < `base` (a saved config) < YAML preset (after its bases) < dotted overrides, then validated."""
    schema = OmegaConf.structured(Config)
    sources: list[dict[str, Any]] = [] if base is None else [_saved_before_architectures(base)]
    if path is not None:
        sources += preset_layers(Path(path))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        layers = [*map(OmegaConf.create, sources), OmegaConf.from_dotlist(list(overrides))]
        for layer in layers:
            _check_sections(schema, layer)
        # First every key but the combiner's and the architecture's own (which stay untyped), to learn
        # which combiner and architecture it is; then everything again, on the schema of their sections.
        OmegaConf.set_struct(schema.combiner, False)
        OmegaConf.set_struct(schema.agent, False)
        merged = typing.cast(dict[str, Any], OmegaConf.to_container(OmegaConf.merge(schema, *layers), resolve=True))
        section = _typed_combiner(merged["combiner"])
        agent = _typed_agent(merged["agent"])
        typed = OmegaConf.merge(OmegaConf.structured(Config(agent=agent(), combiner=section())), merged)
        cfg: Config = OmegaConf.to_object(typed)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {_one_line(err)}") from None
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict` (checkpoints, run directories)."""
    return load_config(base=data)


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    hint = " (YAML reads on/off/yes/no as a boolean)" if value in ("True", "False", True, False) else ""
    _check(value in choices, f"{key} must be one of {', '.join(choices)}; found {value!r}{hint}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express."""
    from mtrl.combiners import check_hyper_parameters, combiner_class  # local: keeps config import light
    from mtrl.networks import check_architecture

    _check(cfg.seed >= 0, f"seed must be >= 0, found {cfg.seed}")
    _check(
        cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
        f"device must be auto, cpu, cuda or cuda:N; found {cfg.device!r}",
    )
    env = cfg.env
    from mtrl import envs  # local: the backend registry, which builds nothing

    _choice("env.benchmark", env.benchmark, envs.benchmarks())
    _choice("env.vector_strategy", env.vector_strategy, ("sync", "async", "pool"))
    _check(env.workers >= 0, f"env.workers must be >= 0, found {env.workers}")
    _choice("eval.vector_strategy", cfg.eval.vector_strategy, ("sync", "async"))
    _choice("env.reward_version", env.reward_version, ("v1", "v2"))
    _check(env.max_episode_steps > 0, f"env.max_episode_steps must be > 0, found {env.max_episode_steps}")
    _check(1 <= env.num_goals <= 50, f"env.num_goals must be in [1, 50], found {env.num_goals}")
    _check(env.toy_tasks >= 1, f"env.toy_tasks must be >= 1, found {env.toy_tasks}")
    if env.benchmark == "MT1":
        _check(len(env.tasks) == 1, f"env.tasks must name exactly one task for MT1, found {env.tasks}")
    if env.benchmark == "custom":
        _check(len(env.tasks) >= 1, "env.tasks must name at least one task for the custom benchmark")
        _check(len(set(env.tasks)) == len(env.tasks), f"env.tasks has duplicates: {env.tasks}")
    try:
        envs.check_task_names(env.benchmark, env.tasks)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    agent = cfg.agent
    _check(
        len(agent.hidden_sizes) >= 1 and all(h > 0 for h in agent.hidden_sizes),
        f"agent.hidden_sizes must be a non-empty list of positive widths, found {agent.hidden_sizes}",
    )
    try:
        check_architecture(agent.architecture, agent.hyper_parameters(), agent.hidden_sizes)
    except ValueError as err:
        raise ConfigError(f"agent: {err}") from None
    for key in ("actor_lr", "critic_lr", "alpha_lr", "init_temperature"):
        value = getattr(agent, key)
        _check(value > 0, f"agent.{key} must be > 0, found {value}")
    _check(0 <= agent.gamma <= 1, f"agent.gamma must be in [0, 1], found {agent.gamma}")
    _check(0 < agent.tau <= 1, f"agent.tau must be in (0, 1], found {agent.tau}")
    _check(
        agent.log_std_min < agent.log_std_max,
        f"agent.log_std_min must be < agent.log_std_max, found {agent.log_std_min} >= {agent.log_std_max}",
    )

    comb = cfg.combiner
    for net in comb.networks:
        _choice("combiner.networks entries", net, ("critic", "actor", "alpha"))
    _check(
        comb.diagnostics_every >= 0,
        f"combiner.diagnostics_every must be >= 0, found {comb.diagnostics_every}",
    )
    try:
        check_hyper_parameters(comb.name, comb.hyper_parameters())
        combiner_class(comb.name).check_networks(comb.networks)
    except ValueError as err:
        raise ConfigError(f"combiner: {err}") from None
    _choice("optimizer.name", cfg.optimizer.name, ("adam", "adatask"))
    _check(
        cfg.optimizer.name != "adatask" or comb.name == "mean",
        f"optimizer.name=adatask replaces the combiner: combiner.name must be mean, found {comb.name!r}",
    )

    train = cfg.train
    _check(train.total_steps > 0, f"train.total_steps must be > 0, found {train.total_steps}")
    _check(train.warmup_steps >= 0, f"train.warmup_steps must be >= 0, found {train.warmup_steps}")
    _check(train.updates_per_step >= 1, f"train.updates_per_step must be >= 1, found {train.updates_per_step}")
    _check(train.batch_per_task >= 1, f"train.batch_per_task must be >= 1, found {train.batch_per_task}")
    _check(train.buffer_capacity >= 1, f"train.buffer_capacity must be >= 1, found {train.buffer_capacity}")
    _check(
        not train.overlap or train.warmup_steps >= 2,
        "train.overlap needs train.warmup_steps >= 2: its first update runs while the last warm-up step is in "
        f"flight and samples the ones before, found {train.warmup_steps}",
    )
    _check(train.torch_threads >= 0, f"train.torch_threads must be >= 0, found {train.torch_threads}")
    _check(train.max_bad_updates >= 1, f"train.max_bad_updates must be >= 1, found {train.max_bad_updates}")
    for key in ("grad_clip_norm", "q_target_clip"):
        value = getattr(train, key)
        _check(value is None or value > 0, f"train.{key} must be > 0 or null, found {value}")
    _choice("train.rng_device", train.rng_device, ("auto", "cpu"))
    _choice("train.compile", train.compile, ("none", "default", "reduce-overhead"))
    _check(
        train.compile == "none" or combiner_class(comb.name).supports_compile,
        f"train.compile must be none for combiner {comb.name!r} (it learns from each step outside the compiled "
        f"update), found {train.compile!r}",
    )
    _check(
        train.buffer_device in ("auto", "cpu") or train.buffer_device.startswith("cuda"),
        f"train.buffer_device must be auto, cpu or a cuda device, found {train.buffer_device!r}",
    )
    _check(cfg.eval.every >= 0, f"eval.every must be >= 0, found {cfg.eval.every}")
    _check(cfg.eval.episodes >= 1, f"eval.episodes must be >= 1, found {cfg.eval.episodes}")
    _check_videos(cfg.eval)
    _check(cfg.log.every >= 1, f"log.every must be >= 1, found {cfg.log.every}")
    _check_tracking(cfg.log)
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0, found {cfg.checkpoint.every}")
    _check(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, found {cfg.checkpoint.keep_last}")


def _check_videos(ev: EvalConfig) -> None:
    _check(ev.video_every >= 0, f"eval.video_every must be >= 0, found {ev.video_every}")
    _check(ev.video_episodes >= 1, f"eval.video_episodes must be >= 1, found {ev.video_episodes}")
    _check(ev.video_fps > 0, f"eval.video_fps must be > 0, found {ev.video_fps}")
    for key in ("video_width", "video_height"):
        value = getattr(ev, key)
        _check(value >= 2 and value % 2 == 0, f"eval.{key} must be a positive even number (H.264), found {value}")


def _check_tracking(log: LogConfig) -> None:
    """`log.wandb` needs the optional wandb package: refused at config time rather than at the first log."""
    if not log.wandb:
        return
    _check(
        importlib.util.find_spec("wandb") is not None,
        "log.wandb=true needs the wandb package: pip install 'mtrl[wandb]' (or set log.wandb=false)",
    )
    _check(bool(log.wandb_project), "log.wandb_project must not be empty")


def describe_options() -> str:
    """Every config key with its type, default and help: the body of `mtrl train --help`.

    The combiner's own keys are listed for each combiner, marked with the `combiner.name` they belong to.
    """
    from mtrl.combiners import COMBINERS
    from mtrl.networks import ARCHITECTURES

    lines: list[str] = []

    def describe(key: str, f: dataclasses.Field[Any], owner: str = "") -> None:
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        help_text = f.metadata.get("help", "")
        if key == "combiner.name":
            help_text += f": {' | '.join(COMBINERS)}"
        if key == "agent.architecture":
            help_text += f": {' | '.join(ARCHITECTURES)}"
        kind = f.type.__name__ if type(f.type) is type else str(f.type)  # a class, or an annotation's text
        lines.append(f"  {key} ({kind}, default {default}{owner}): {help_text}")

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
                walk(globals()[f.type] if isinstance(f.type, str) else f.type, key + ".")
                continue
            describe(key, f)
        if cls is CombinerConfig:
            for name, combiner in COMBINERS.items():
                for f in dataclasses.fields(combiner.Parameters):
                    describe(f"{prefix}{f.name}", f, f", combiner.name={name}")
        if cls is AgentConfig:
            for name, architecture in ARCHITECTURES.items():
                for f in dataclasses.fields(architecture.Parameters):
                    describe(f"{prefix}{f.name}", f, f", agent.architecture={name}")

    walk(Config, "")
    return "\n".join(lines)
