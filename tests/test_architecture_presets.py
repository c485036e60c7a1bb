"""The architecture presets: what each sets, and the parameter counts of the reference code's networks.

The counts were obtained from the reference code (rainx0r/metaworld-algorithms, Flax) by instantiating
its modules for MT10 (observation 39 + one-hot, action 4); one critic = one of the twin Q-networks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtrl.config import load_config, to_dict
from mtrl.networks import ARCHITECTURES
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
