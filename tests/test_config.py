import copy
import dataclasses
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from mtrl.cli import main
from mtrl.combiners import COMBINERS, Combiner, HyperParameters, registered
from mtrl.combiners.base import check_number, hyper_parameter
from mtrl.config import (
    CombinerConfig,
    ConfigError,
    describe_options,
    load_config,
    to_dict,
)
from mtrl.networks import ARCHITECTURES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BEFORE_COMPOSITION = yaml.safe_load(
    (Path(__file__).parent / "data" / "presets_before_composition.yaml").read_text(encoding="utf-8")
)


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("seed: 3\ntrain:\n  total_steps: 500\n  warmup_steps: 7\n")
    cfg = load_config(preset, ["train.total_steps=900"])
    assert cfg.seed == 3  # from YAML
    assert cfg.train.total_steps == 900  # override beats YAML
    assert cfg.train.warmup_steps == 7  # YAML beats default
    assert cfg.train.batch_per_task == 128  # default
    assert cfg.agent.hidden_sizes == [400, 400, 400]


def test_overrides_parse_lists_and_nulls():
    cfg = load_config(None, ["env.benchmark=custom", "env.tasks=[reach-v3,push-v3]", "agent.target_entropy=null"])
    assert cfg.env.tasks == ["reach-v3", "push-v3"] and cfg.agent.target_entropy is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.total_stepz=5"], "total_stepz"),
        (["nosuch.key=1"], "nosuch"),
        (["train.total_steps=many"], "total_steps"),
        (["seed=1.5"], "seed"),
        (["train.total_steps=-4"], "train.total_steps must be > 0, found -4"),
        (["env.benchmark=MT11"], "env.benchmark must be one of"),
        (["env.benchmark=MT1", "env.tasks=[no-such-task-v3]"], "unknown Meta-World task 'no-such-task-v3'"),
        (["env.benchmark=MT1"], "exactly one task"),
        (["combiner.name=fancy"], "unknown combiner 'fancy'"),
        (["combiner.networks=[critic,policy]"], "combiner.networks entries must be one of"),
        (["optimizer.name=adatask", "combiner.name=mgda"], "combiner.name must be mean"),
        (["agent.gamma=1.5"], "agent.gamma must be in [0, 1], found 1.5"),
        (["justakey"], "not of the form key=value"),
    ],
)
def test_bad_values_are_rejected_with_a_message_naming_them(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_and_malformed_yaml(tmp_path):
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("train:\n  bach_per_task: 3\n")
    with pytest.raises(ConfigError, match="bach_per_task"):
        load_config(bad_key)
    malformed = tmp_path / "m.yaml"
    malformed.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(malformed)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "preset", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent.name != "sweeps")
)
def test_every_shipped_preset_loads(preset):
    cfg = load_config(CONFIGS / preset)
    assert cfg.train.total_steps > 0


def test_mtsac_presets_follow_the_recipe():
    cfg = load_config(CONFIGS / "mt10_mtsac.yaml")
    assert cfg.env.benchmark == "MT10" and cfg.agent.hidden_sizes == [400, 400, 400]
    assert (cfg.agent.actor_lr, cfg.agent.critic_lr, cfg.agent.gamma, cfg.agent.tau) == (
        3e-4,
        3e-4,
        0.99,
        0.005,
    )
    assert cfg.train.batch_per_task == 128 and cfg.train.buffer_capacity == 1_000_000
    assert cfg.train.total_steps == 2_000_000 and cfg.combiner.name == "mean"
    assert load_config(CONFIGS / "mt50_mtsac.yaml").env.benchmark == "MT50"
    paper = load_config(CONFIGS / "mt10_mtsac_paper.yaml").env
    assert (paper.reward_version, paper.max_episode_steps, paper.num_goals) == ("v1", 150, 1)


@pytest.mark.parametrize("bench", ["mt10", "mt50"])
def test_method_presets_differ_from_the_baseline_only_in_the_method(bench):
    """Every method preset (one per combiner that has one, and AdaTask) differs from the recipe in its method only.
    The architecture presets (tests/test_architecture_presets.py) are not method presets."""
    baseline = to_dict(load_config(CONFIGS / f"{bench}_mtsac.yaml"))
    methods = {p.stem.removeprefix(f"{bench}_") for p in CONFIGS.glob(f"{bench}_*.yaml")} - {"mtsac", "mtsac_paper"}
    methods = {m for m in methods if not any(m == a or m.startswith(f"{a}_") for a in ARCHITECTURES)}
    shipped = {"cagrad", "conicgrad", "sdmgrad", "sdmgrad_os", "imgrad", "mgda", "pcgrad", "nashmtl", "adatask"}
    assert shipped <= methods and methods - {"adatask"} <= set(COMBINERS)
    for name in methods:
        preset = to_dict(load_config(CONFIGS / f"{bench}_{name}.yaml"))
        differing = {key for key in baseline if preset[key] != baseline[key]}
        assert differing == ({"optimizer"} if name == "adatask" else {"combiner"}), name
        if name != "adatask":
            assert preset["combiner"]["name"] == name
    cagrad = load_config(CONFIGS / f"{bench}_cagrad.yaml").combiner
    assert (cagrad.c, cagrad.rescale) == ({"mt10": 0.9, "mt50": 0.5}[bench], 1)
    assert load_config(CONFIGS / f"{bench}_sdmgrad_os.yaml").combiner.n == {"mt10": 4, "mt50": 8}[bench]


# ----- composed presets -------------------------------------------------------------------------
def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("stem", sorted(BEFORE_COMPOSITION["presets"]))
def test_composed_presets_resolve_exactly_as_the_flat_presets_did(stem):
    """Every key the flat preset resolved to keeps its value. Only the other combiners' keys, null in the
    flat days, are gone from the section; keys added to the schema since are not pinned here, and
    agent.variant is now agent.architecture."""
    before = {**BEFORE_COMPOSITION["defaults"], **BEFORE_COMPOSITION["presets"][stem]}
    cfg = load_config(CONFIGS / f"{stem}.yaml")
    now = flatten(to_dict(cfg))
    common = {f"combiner.{f.name}" for f in dataclasses.fields(CombinerConfig)}
    own = {f"combiner.{key}" for key in cfg.combiner.hyper_parameters()}
    for key, value in before.items():
        if key.startswith("combiner.") and key not in common | own:
            assert value is None and key not in now, key
        else:
            assert now[key.replace("agent.variant", "agent.architecture")] == value, key
    assert own <= set(before)


def test_a_preset_builds_on_the_presets_its_defaults_list_names(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text("seed: 5\ntrain:\n  total_steps: 500\n  warmup_steps: 7\n")
    (tmp_path / "base" / "bench.yaml").write_text(
        "defaults: [common.yaml]\nenv:\n  benchmark: toy\ntrain:\n  total_steps: 600\n"
    )
    (tmp_path / "base" / "other.yaml").write_text("defaults: [common.yaml]\ntrain:\n  batch_per_task: 9\n")
    (tmp_path / "method.yaml").write_text(
        "defaults: [base/bench.yaml, base/other.yaml]\ncombiner:\n  name: cagrad\n  c: 0.9\n"
    )
    cfg = load_config(tmp_path / "method.yaml", ["train.warmup_steps=8"])
    assert (cfg.seed, cfg.env.benchmark, cfg.train.batch_per_task) == (5, "toy", 9)
    # Later bases win over earlier ones (other.yaml's common.yaml restores 500), the preset over its
    # bases, overrides over the preset.
    assert (cfg.train.total_steps, cfg.train.warmup_steps) == (500, 8)
    assert cfg.combiner.hyper_parameters() == {"c": 0.9, "rescale": 1, "solver": "exact"}


# ----- the combiner section, typed by the combiner ------------------------------------------------
def test_the_combiner_section_takes_exactly_the_chosen_combiners_keys():
    cagrad = load_config(None, ["combiner.c=0.9", "combiner.name=cagrad"]).combiner
    assert (cagrad.name, cagrad.c) == ("cagrad", 0.9)
    assert cagrad.hyper_parameters() == {"c": 0.9, "rescale": 1, "solver": "exact"}
    assert load_config(None, ["combiner.name=cagrad"]).combiner.hyper_parameters()["c"] == 0.4
    assert load_config(None, ["combiner.name=sdmgrad_os"]).combiner.hyper_parameters() == {
        "lam": 0.6,
        "solver": "exact",
        "n": 4,
    }
    assert load_config(None).combiner.hyper_parameters() == {}
    assert type(load_config(None, ["combiner.name=pcgrad"]).combiner) is CombinerConfig
    with pytest.raises(ConfigError) as info:
        load_config(None, ["combiner.name=cagrad", "combiner.lam=0.3"])
    assert str(info.value) == (
        "combiner: unknown hyper-parameter 'lam' for combiner 'cagrad'; accepted: c, rescale, solver"
    )
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "mt10_cagrad.yaml", ["combiner.name=mgda"])
    assert str(info.value) == (
        "combiner: unknown hyper-parameter 'c', 'rescale', 'solver' for combiner 'mgda'; accepted: none"
    )
    with pytest.raises(ConfigError, match=r"^invalid config: combiner\.c: .*could not be converted"):
        load_config(None, ["combiner.name=cagrad", "combiner.c=abc"])
    with pytest.raises(ConfigError, match="^combiner: `n` must be >= 1, found 0$"):
        load_config(None, ["combiner.name=sdmgrad_os", "combiner.n=0"])


def test_null_unsets_a_combiner_key():
    unset = ["combiner.name=sdmgrad", "combiner.c=null", "combiner.rescale=null"]
    cfg = load_config(CONFIGS / "mt10_cagrad.yaml", unset)
    assert cfg.combiner.hyper_parameters() == {"lam": 0.6, "solver": "mtrl"}
    assert load_config(None, ["combiner.name=cagrad", "combiner.c=null"]).combiner.c == 0.4


def test_validation_checks_hyper_parameters_without_building_the_combiner():
    """A combiner is one module and one registry line: its keys, types, checks and help reach the config."""

    @dataclasses.dataclass(frozen=True)
    class ScaledParameters(HyperParameters):
        factor: float = hyper_parameter(1.0, "what the mean is multiplied by; > 0")

        def __post_init__(self) -> None:
            self._store("factor", check_number("factor", self.factor, low=0.0, low_open=True))

    class Scaled(Combiner):
        Parameters = ScaledParameters

        def __init__(self, parameters: HyperParameters | None = None) -> None:
            raise AssertionError("the config built the combiner")

        def weights(self, gramian: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
            return gramian.new_full((gramian.shape[0],), 1.0)

    with registered("scaled", Scaled):
        cfg = load_config(None, ["combiner.name=scaled", "combiner.factor=3"])
        assert cfg.combiner.hyper_parameters() == {"factor": 3.0}
        assert isinstance(cfg.combiner.factor, float)
        with pytest.raises(ConfigError, match=r"^combiner: `factor` must be > 0, found -1\.0$"):
            load_config(None, ["combiner.name=scaled", "combiner.factor=-1"])
        assert "  combiner.factor (float, default 1.0, combiner.name=scaled): what the mean is multiplied by; > 0" in (
            describe_options().splitlines()
        )
        with pytest.raises(ValueError, match="^combiner 'scaled' is already registered$"), registered("scaled", Scaled):
            pass
    # Gone afterwards, from the registry and from the config sections made from it.
    assert "scaled" not in COMBINERS
    with pytest.raises(ConfigError, match="^combiner: unknown combiner 'scaled'; choose from: "):
        load_config(None, ["combiner.name=scaled", "combiner.factor=3"])
    assert "scaled" not in describe_options()

    @dataclasses.dataclass(frozen=True)
    class GainParameters(HyperParameters):
        gain: float = hyper_parameter(2.0, "another key")

    class Gain(Scaled):
        Parameters = GainParameters

    with registered("scaled", Gain):  # the name again, with other keys: no section of the first is left
        assert load_config(None, ["combiner.name=scaled", "combiner.gain=3"]).combiner.hyper_parameters() == {
            "gain": 3.0
        }


def test_help_lists_every_combiners_keys_with_their_owner():
    lines = describe_options().splitlines()
    assert f"  combiner.name (str, default 'mean'): gradient combiner: {' | '.join(COMBINERS)}" in lines
    owned = re.compile(r"^  combiner\.(\w+) \(.+, default .+, combiner\.name=(\w+)\): \S")
    listed = {(match[2], match[1]) for line in lines if (match := owned.match(line))}
    assert listed == {(name, f.name) for name, c in COMBINERS.items() for f in dataclasses.fields(c.Parameters)}
    assert "  combiner.c (float, default 0.4, combiner.name=cagrad): " in "\n".join(lines)
    assert all(f.metadata.get("help") for c in COMBINERS.values() for f in dataclasses.fields(c.Parameters))


def test_no_combiner_declares_a_key_the_section_already_has():
    common = {f.name for f in dataclasses.fields(CombinerConfig)}
    for combiner in COMBINERS.values():
        assert not common & {f.name for f in dataclasses.fields(combiner.Parameters)}, combiner


def test_a_typed_config_pickles_and_copies():
    cfg = load_config(CONFIGS / "mt50_sdmgrad_os.yaml", ["combiner.n=6"])
    for again in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert again == cfg and type(again.combiner) is type(cfg.combiner)
        assert again.combiner.hyper_parameters() == {"lam": 0.6, "solver": "mtrl", "n": 6}


# ----- mtrl train --print-config -------------------------------------------------------------------
def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["combiner.c=0.7", "train.total_steps=1000"]
    code = main(["train", "--config", str(CONFIGS / "mt10_cagrad.yaml"), "--print-config", *argv])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    assert yaml.safe_load(out.out) == to_dict(load_config(CONFIGS / "mt10_cagrad.yaml", argv))
    assert "  c: 0.7\n" in out.out and "  lam:" not in out.out
    assert os.listdir(tmp_path) == []
