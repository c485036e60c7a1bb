"""`mtrl report` groups runs into experiments: equal resolved configs but for the seed.

The run directories hold the config.yaml that `mtrl train` and `mtrl baseline` write (`rundir.write_config`
of a resolved config), so the grouping sees every key a real run has.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtrl.cli import main
from mtrl.config import AgentConfig, ConfigError, load_config
from mtrl.report import build_report, find_run_dirs, group_runs, load_run, method_name
from mtrl.report.markdown import render_markdown
from mtrl.report.runs import BASELINE_IGNORES, NOT_THE_EXPERIMENT, labels, signature
from mtrl.rundir import write_config

TASKS = ["t0", "t1", "t2", "t3"]
# The config key that picks the network: agent.architecture, which replaced agent.variant.
NETWORK_KEY = "agent.architecture" if "architecture" in AgentConfig.__dataclass_fields__ else "agent.variant"


def real_run(
    path: Path, seed: int, *overrides: str, command: str = "train", level: float = 0.5, tasks: list[str] = TASKS
) -> Path:
    """A run directory with the config.yaml `mtrl <command>` writes and two evaluations of `tasks`."""
    cfg = load_config(None, [f"seed={seed}", f"run.dir={path}", *overrides])
    write_config(path, cfg, command)
    rng = np.random.default_rng(seed)
    lines = [
        json.dumps(
            {"step": step, "kind": "eval", "eval/success/per_task": dict(zip(tasks, values.tolist(), strict=True))}
        )
        for step, values in (
            (1000, np.zeros(len(tasks))),
            (2000, np.clip(level + rng.normal(0, 0.1, len(tasks)), 0, 1)),
        )
    ]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def experiments(root: Path, mix_protocols: bool = False) -> dict[str, list]:
    return group_runs([load_run(p) for p in find_run_dirs([root])], mix_protocols=mix_protocols)


def test_a_grid_sweep_is_reported_per_grid_point(tmp_path: Path):
    # Before: both grid points were pooled as 6 seeds of one "cagrad" (and with equal seeds, refused).
    for c, seeds in ((0.2, (0, 1, 2)), (0.9, (3, 4, 5))):
        for seed in seeds:
            real_run(tmp_path / "sweep" / f"c{c}-{seed}", seed, "combiner.name=cagrad", f"combiner.c={c}", level=c)
    for seed in (0, 1, 2):  # the same seeds as the first grid point
        real_run(tmp_path / "sweep" / f"c0.5-{seed}", seed, "combiner.name=cagrad", "combiner.c=0.5")
    (mt10,) = experiments(tmp_path).values()
    assert [(e.label, e.seeds) for e in mt10] == [
        ("cagrad c=0.2", [0, 1, 2]),
        ("cagrad c=0.5", [0, 1, 2]),
        ("cagrad c=0.9", [3, 4, 5]),
    ]
    assert {p.name for paths in mt10[2].paths for p in paths} == {"c0.9-3", "c0.9-4", "c0.9-5"}

    text = render_markdown(build_report([tmp_path / "sweep"], reps=20, seed=0), reps=20, seed=0)
    for label in ("cagrad c=0.2", "cagrad c=0.5", "cagrad c=0.9"):
        assert f"| {label} | 3 | 2,000 |" in text
    assert "- cagrad c=0.9 (`combiner.c=0.9`)" in text
    assert "| cagrad c=0.9 | cagrad c=0.2 | 1.000 [1.000, 1.000] |" in text  # P(X > Y), the better first


def test_labels_name_each_experiment_by_the_keys_in_which_it_differs(tmp_path: Path):
    runs = {
        "mean": ["combiner.name=mean"],
        "mean-lr": ["combiner.name=mean", "agent.actor_lr=0.001", "agent.critic_lr=0.001"],
        "cagrad": ["combiner.name=cagrad", "combiner.c=0.4"],
        "cagrad-actor": ["combiner.name=cagrad", "combiner.c=0.4", "combiner.networks=[actor]"],
        "conicgrad": ["combiner.name=conicgrad", "combiner.c=0.5"],
        "multihead": ["combiner.name=mean", f"{NETWORK_KEY}=multihead"],
    }
    for name, overrides in runs.items():
        real_run(tmp_path / name, 0, *overrides)
    (mt10,) = experiments(tmp_path).values()
    # CAGrad's and ConicGrad's `c` are different keys in effect: neither label shows it. The learning rates
    # and the combined networks differ across methods: every label that has them shows them.
    assert sorted(e.label for e in mt10) == [
        "cagrad actor_lr=0.0003 critic_lr=0.0003 networks=[actor]",
        "cagrad actor_lr=0.0003 critic_lr=0.0003 networks=[critic,actor]",
        "conicgrad actor_lr=0.0003 critic_lr=0.0003 networks=[critic,actor]",
        "mean actor_lr=0.0003 critic_lr=0.0003 networks=[critic,actor]",
        "mean actor_lr=0.001 critic_lr=0.001 networks=[critic,actor]",
        "mean-multihead actor_lr=0.0003 critic_lr=0.0003 networks=[critic,actor]",
    ]


def test_an_architecture_key_is_an_ordinary_config_key():
    base = signature({"seed": 0, "combiner": {"name": "mean"}})
    wide = dict(base) | {"agent.architecture": "moe", "agent.num_experts": 4}
    narrow = dict(base) | {"agent.architecture": "moe", "agent.num_experts": 2}
    mlp = dict(base) | {"agent.architecture": "mlp"}
    assert labels([("mean", wide), ("mean", narrow), ("mean", mlp)]) == [
        "mean architecture=moe num_experts=4",
        "mean architecture=moe num_experts=2",
        "mean architecture=mlp",
    ]
    # a key only one experiment has is shown when another of its method lacks it, not across methods
    experts = dict(base) | {"agent.num_experts": 4}
    assert labels([("mean", experts), ("mean", dict(base))]) == ["mean num_experts=4", "mean"]
    assert labels([("mean", mlp), ("cagrad", dict(base) | {"combiner.c": 0.4})]) == ["mean", "cagrad"]


def test_keys_that_do_not_change_the_experiment_are_ignored(tmp_path: Path):
    real_run(tmp_path / "a", 0, "log.every=10", "eval.every=1000", "checkpoint.every=1000", "device=cpu")
    real_run(tmp_path / "b", 1, "log.tensorboard=false", "train.total_steps=4000", "env.vector_strategy=async")
    real_run(tmp_path / "c", 2, "train.torch_threads=1", "combiner.diagnostics_every=0", "train.compile=default")
    (mt10,) = experiments(tmp_path).values()
    assert [(e.label, e.seeds) for e in mt10] == [("mean", [0, 1, 2])]
    for key in ("seed", "run", "log", "checkpoint", "eval.every", "train.total_steps", "device"):
        assert key in NOT_THE_EXPERIMENT


def test_what_changes_the_experiment_splits_it(tmp_path: Path):
    real_run(tmp_path / "a", 0)
    real_run(tmp_path / "b", 1, "train.batch_per_task=64")
    real_run(tmp_path / "c", 2, "eval.episodes=10")
    real_run(tmp_path / "d", 3, "train.overlap=true")
    (mt10,) = experiments(tmp_path).values()
    assert len(mt10) == 4 and all(len(e.seeds) == 1 for e in mt10)
    assert sorted(e.label for e in mt10) == [
        "mean episodes=10 batch_per_task=128 overlap=False",
        "mean episodes=50 batch_per_task=128 overlap=False",
        "mean episodes=50 batch_per_task=128 overlap=True",
        "mean episodes=50 batch_per_task=64 overlap=False",
    ]


def test_baseline_runs_ignore_the_combiner_they_were_launched_with(tmp_path: Path):
    real_run(tmp_path / "st-0", 0, "combiner.name=cagrad", "combiner.c=0.9", command="baseline")
    real_run(tmp_path / "st-1", 1, "combiner.name=mean", f"{NETWORK_KEY}=multihead", command="baseline")
    real_run(tmp_path / "st-2", 2, "optimizer.name=adatask", command="baseline")
    real_run(tmp_path / "mtsac-0", 0)
    (mt10,) = experiments(tmp_path).values()
    assert [(e.label, e.seeds) for e in mt10] == [("mean", [0]), ("sac_single_task", [0, 1, 2])]
    assert "optimizer.name" in BASELINE_IGNORES and "combiner" in BASELINE_IGNORES


def test_the_keys_the_baseline_ignores_are_those_its_help_names(capsys):
    with pytest.raises(SystemExit):
        main(["baseline", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for key in BASELINE_IGNORES:
        # the network's key is agent.variant in older help texts, agent.architecture in newer ones
        names = ("variant", "architecture") if key == "agent.architecture" else (key.split(".")[-1],)
        assert any(name in help_text for name in names), key


def test_the_architecture_key_before_and_after_its_rename_is_one_key():
    old = {"seed": 0, "combiner": {"name": "mean"}, "agent": {"variant": "multihead"}}
    new = {"seed": 1, "combiner": {"name": "mean"}, "agent": {"architecture": "multihead"}}
    assert signature(old) == signature(new)
    assert method_name(old) == method_name(new) == "mean-multihead"
    assert method_name({"combiner": {"name": "cagrad"}, "agent": {"architecture": "moore", "num_experts": 4}}) == (
        "cagrad-moore"
    )
    assert method_name({"combiner": {"name": "cagrad"}, "agent": {"architecture": "conditioned"}}) == "cagrad"


def test_a_key_an_older_config_lacks_takes_todays_default(tmp_path: Path):
    real_run(tmp_path / "new", 0)
    old = real_run(tmp_path / "old", 1)
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["env"]["num_goals"], config["agent"]["log_std_min"]
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    (mt10,) = experiments(tmp_path).values()
    assert [(e.label, e.seeds) for e in mt10] == [("mean", [0, 1])]


@pytest.mark.parametrize(
    "override, difference, names",
    [
        ("env.reward_version=v1", "env.reward_version: v1 vs v2", ["mean reward_version=v1", "mean reward_version=v2"]),
        (
            "env.max_episode_steps=150",
            "env.max_episode_steps: 150 vs 500",
            ["mean max_episode_steps=150", "mean max_episode_steps=500"],
        ),
        ("env.num_goals=1", "env.num_goals: 1 vs 50", ["mean num_goals=1", "mean num_goals=50"]),
    ],
)
def test_different_protocols_are_refused_on_one_axis_unless_asked(
    tmp_path: Path, capsys, override: str, difference: str, names: list[str]
):
    root = tmp_path / "runs"
    for seed in range(2):
        real_run(root / f"paper-{seed}", seed, override)
        real_run(root / f"v2-{seed}", seed + 2)
    out = tmp_path / "out"
    assert main(["report", str(root), "--out", str(out), "--reps", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrl: error: MT10: ") and err.count("\n") == 1
    assert difference in err and "--mix-protocols" in err
    assert not out.exists()

    benchmarks = build_report([root], reps=10, seed=0, mix_protocols=True)
    text = render_markdown(benchmarks, reps=10, seed=0)
    assert "**Mixed protocols** (`--mix-protocols`)" in text
    for name in names:
        assert f"| {name}† | 2 | 2,000 |" in text  # † two seeds


def test_mix_protocols_on_the_command_line(tmp_path: Path):
    real_run(tmp_path / "runs" / "paper", 0, "env.reward_version=v1", "env.max_episode_steps=150")
    real_run(tmp_path / "runs" / "v2", 0)
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out), "--reps", "10", "--mix-protocols"]) == 0
    text = (out / "report.md").read_text()
    assert "- mean max_episode_steps=150 reward_version=v1†: reward v1, 150 steps per episode" in text


def test_different_task_sets_are_different_protocols(tmp_path: Path, capsys):
    for seed, tasks in ((0, "[reach-v3,push-v3]"), (1, "[reach-v3,door-open-v3]")):
        real_run(tmp_path / f"custom-{seed}", seed, "env.benchmark=custom", f"env.tasks={tasks}")
    with pytest.raises(
        ConfigError, match=r"differ in protocol \(env.tasks: \[reach-v3,door-open-v3\] vs \[reach-v3,push-v3\]\)"
    ):
        build_report([tmp_path], reps=10, seed=0)


def test_a_protocol_difference_inside_one_method_is_named_in_the_label(tmp_path: Path):
    real_run(tmp_path / "a", 0, "env.max_episode_steps=150", "env.reward_version=v1", "env.num_goals=1")
    real_run(tmp_path / "b", 0)
    (mt10,) = experiments(tmp_path, mix_protocols=True).values()
    assert [e.label for e in mt10] == [
        "mean max_episode_steps=150 num_goals=1 reward_version=v1",
        "mean max_episode_steps=500 num_goals=50 reward_version=v2",
    ]


def test_experiments_that_report_other_tasks_are_not_compared(tmp_path: Path):
    real_run(tmp_path / "a", 0)
    real_run(tmp_path / "b", 0, "combiner.name=cagrad", tasks=["t0", "t1", "t2", "t9"])
    with pytest.raises(ConfigError, match=r"differ in protocol \(tasks: 4 tasks vs 4, differing in t3, t9\)"):
        build_report([tmp_path], reps=10, seed=0)
    (bench,) = build_report([tmp_path], reps=10, seed=0, mix_protocols=True)
    assert bench.improvements == [] and bench.incomparable == [("cagrad†", "mean†")]
    text = render_markdown([bench], reps=10, seed=0)
    assert "Not compared (evaluated on different tasks): cagrad† and mean†." in text
    assert "| t9 | 0." in text and "| t3 | – |" in text
