from pathlib import Path

import pytest

from mtrl.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
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
    from mtrl.combiners import COMBINERS
    from mtrl.config import to_dict

    baseline = to_dict(load_config(CONFIGS / f"{bench}_mtsac.yaml"))
    methods = [n for n in COMBINERS if n != "mean"] + ["adatask"]
    for name in methods:
        preset = to_dict(load_config(CONFIGS / f"{bench}_{name}.yaml"))
        differing = {key for key in baseline if preset[key] != baseline[key]}
        assert differing == ({"optimizer"} if name == "adatask" else {"combiner"}), name
        if name != "adatask":
            assert preset["combiner"]["name"] == name
    cagrad = load_config(CONFIGS / f"{bench}_cagrad.yaml").combiner
    assert (cagrad.c, cagrad.rescale) == ({"mt10": 0.9, "mt50": 0.5}[bench], 1)
    assert load_config(CONFIGS / f"{bench}_sdmgrad_os.yaml").combiner.n == {"mt10": 4, "mt50": 8}[bench]
