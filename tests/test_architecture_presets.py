"""The architecture presets and config: what each preset sets, the reference code's parameter counts,
the refusals of bad settings, saved configs, and run names in reports.

The counts were obtained from the reference code (rainx0r/metaworld-algorithms, Flax) by instantiating
its modules for MT10 (observation 39 + one-hot, action 4); one critic = one of the twin Q-networks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtrl.config import ConfigError, config_from_dict, load_config, to_dict
from mtrl.networks import ARCHITECTURES
from mtrl.report import method_name
from mtrl.sac import MTSAC

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESET_ARCHITECTURES = [a for a in ARCHITECTURES if a != "conditioned"]  # conditioned: mt10_mtsac.yaml etc.

# (actor, one critic) of the reference code's MT10 networks
REFERENCE_MT10 = {
    "conditioned": (344_008, 342_801),
    "multihead": (372_880, 346_410),
    "soft_modules": (691_022, 690_823),
    "care": (420_564, 418_957),
    "film": (377_414, 374_807),
    "moore": (1_379_320, 1_357_650),
    "paco": (1_700_095, 1_694_060),
}
REFERENCE_MT50_ACTOR = {"moore": 2_181_500, "paco": 6_801_180}


def counts(preset: str, num_tasks: int) -> tuple[int, int]:
    cfg = load_config(CONFIGS / preset)
    agent = MTSAC(39 + num_tasks, 4, num_tasks, cfg.agent)
    return sum(p.numel() for p in agent.actor.parameters()), sum(p.numel() for p in agent.critic.q1.parameters())


@pytest.mark.parametrize("architecture", list(REFERENCE_MT10))
def test_mt10_presets_have_the_reference_codes_parameter_counts(architecture):
    preset = "mt10_mtsac.yaml" if architecture == "conditioned" else f"mt10_{architecture}.yaml"
    assert counts(preset, 10) == REFERENCE_MT10[architecture]


@pytest.mark.parametrize("architecture", list(REFERENCE_MT50_ACTOR))
def test_mt50_actors_have_the_reference_codes_parameter_counts(architecture):
    cfg = load_config(CONFIGS / f"mt50_{architecture}.yaml")
    with torch.device("meta"):  # counting needs no memory
        agent = MTSAC(39 + 50, 4, 50, cfg.agent)
    assert sum(p.numel() for p in agent.actor.parameters()) == REFERENCE_MT50_ACTOR[architecture]


@pytest.mark.parametrize("architecture", PRESET_ARCHITECTURES)
def test_presets_differ_from_the_recipe_in_the_network_and_clip_only_and_cagrad_in_the_combiner(architecture):
    for bench in ("mt10", "mt50"):
        baseline = to_dict(load_config(CONFIGS / f"{bench}_mtsac.yaml"))
        preset = to_dict(load_config(CONFIGS / f"{bench}_{architecture}.yaml"))
        assert preset["agent"]["architecture"] == architecture
        assert {k for k in baseline if preset[k] != baseline[k]} == {"agent", "train"}
        assert {k for k in baseline["train"] if preset["train"][k] != baseline["train"][k]} == {"grad_clip_norm"}
        assert preset["train"]["grad_clip_norm"] == 1.0
    plain = to_dict(load_config(CONFIGS / f"mt10_{architecture}.yaml"))
    cagrad = to_dict(load_config(CONFIGS / f"mt10_{architecture}_cagrad.yaml"))
    assert {k for k in plain if cagrad[k] != plain[k]} == {"combiner"}
    assert cagrad["combiner"] == to_dict(load_config(CONFIGS / "mt10_cagrad.yaml"))["combiner"]


def test_moore_follows_its_reference_temperature_and_log_std():
    agent = load_config(CONFIGS / "mt10_moore.yaml").agent
    assert (agent.alpha_lr, agent.log_std_min, agent.log_std_max, agent.num_experts) == (1e-4, -10.0, 2.0, 4)


def test_mt50_sizes():
    assert load_config(CONFIGS / "mt50_moore.yaml").agent.num_experts == 6
    assert load_config(CONFIGS / "mt50_paco.yaml").agent.num_parameter_sets == 20
    assert load_config(CONFIGS / "mt50_care.yaml").agent.num_experts == 10
    soft = load_config(CONFIGS / "mt50_soft_modules.yaml").agent
    assert (soft.num_layers, soft.num_modules, soft.module_width) == (4, 4, 256)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["agent.variant=multihead"],
            r"agent.variant was replaced by agent.architecture \(agent.architecture=multihead",
        ),
        (["agent.architecture=mlp"], "agent: unknown architecture 'mlp'; choose from: conditioned, multihead,"),
        (
            ["agent.architecture=film", "agent.num_experts=4"],
            "agent: unknown key 'num_experts' for architecture 'film'; its own keys: encoder_width, encoder_depth,",
        ),
        (["agent.architecture=moore", "agent.num_experts=0"], "agent: `num_experts` must be >= 1, found 0"),
        (["agent.architecture=care", "agent.temperature=0"], "agent: `temperature` must be > 0, found 0"),
        (
            ["agent.architecture=moore", "agent.num_experts=9", "agent.hidden_sizes=[16,8]"],
            r"agent: `num_experts` \(9\) must be at most the last hidden width \(8\)",
        ),
    ],
)
def test_bad_architecture_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_a_key_of_the_architecture_is_unset_by_null_and_a_saved_variant_loads_as_its_architecture():
    cfg = load_config(CONFIGS / "mt10_moore.yaml", ["agent.architecture=paco", "agent.num_experts=null"])
    assert cfg.agent.hyper_parameters() == {"num_parameter_sets": 5}
    saved = to_dict(load_config(None))
    saved["agent"] = {**saved["agent"], "variant": "multihead"}
    del saved["agent"]["architecture"]
    assert config_from_dict(saved).agent.architecture == "multihead"


def test_report_names_runs_by_method_and_architecture():
    assert method_name(to_dict(load_config(CONFIGS / "mt10_moore_cagrad.yaml"))) == "cagrad-moore"
    assert method_name(to_dict(load_config(CONFIGS / "mt10_cagrad.yaml"))) == "cagrad"
    assert method_name({"combiner": {"name": "mean"}, "agent": {"variant": "multihead"}}) == "mean-multihead"
