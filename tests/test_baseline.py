"""The single-task SB3 baseline (`mtrl baseline`) on the toy benchmark: layout, sizes, seeds, resume."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mtrl.baseline import BASELINE_DIR, METHOD, PENDING_DIR, BaselineRun, is_finished, read_state, task_seed
from mtrl.cli import main
from mtrl.config import load_config
from mtrl.envs import make_backend
from mtrl.rundir import METRICS_FILE
from tests.conftest import TOY_OVERRIDES, toy_config

# Chunks of 20 steps (2 toy episodes of 10 steps) up to 40 steps per task, learning from step 10 on.
SHORT = [
    "env.max_episode_steps=10",
    "train.total_steps=40",
    "train.warmup_steps=10",
    "eval.every=20",
    "checkpoint.every=20",
]
TASKS = ["toy-0", "toy-1", "toy-2"]


def _baseline(tmp_path: Path, run: str, *overrides: str) -> int:
    preset = tmp_path / "preset.yaml"
    preset.write_text("seed: 0\n")
    return main(["baseline", "--config", str(preset), *TOY_OVERRIDES, *SHORT, f"run.dir={tmp_path / run}", *overrides])


def _resume(run_dir: Path, *overrides: str) -> int:
    return main(["baseline", "--resume", str(run_dir), *overrides])


def _records(run_dir: Path, kind: str) -> list[dict]:
    """The run's records of one kind, without wall-clock figures."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records if r["kind"] == kind]


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_metrics_config_and_state_follow_the_trainers_layout(tmp_path):
    assert _baseline(tmp_path, "run") == 0
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:
        assert set(r["eval/success/per_task"]) == set(r["eval/return/per_task"]) == set(TASKS)
        assert r["eval/mean_success"] == pytest.approx(np.mean(list(r["eval/success/per_task"].values())))
        assert r["eval/mean_return"] == pytest.approx(np.mean(list(r["eval/return/per_task"].values())))
        assert r["eval/success"] == pytest.approx(r["eval/mean_success"]) and r["perf/eval_seconds"] > 0
    assert [r["step"] for r in _records(run, "train")] == [20, 40]

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved.pop("method") == METHOD
    assert load_config(base=saved) == toy_config(run, *SHORT)

    state = read_state(run)
    assert state["step"] == state["total_steps"] == 40 and state["finished"] and is_finished(run)
    assert state["seeds"] == [task_seed(0, k) for k in range(3)] and len(set(state["seeds"])) == 3
    assert sorted(p.name for p in (run / BASELINE_DIR).glob("*.zip")) == [f"{t}.zip" for t in TASKS]
    assert not (run / BASELINE_DIR / PENDING_DIR).exists()


def test_models_have_the_configured_sizes_and_hyper_parameters(tmp_path):
    cfg = toy_config(tmp_path / "run", "agent.hidden_sizes=[24,16]", "agent.init_temperature=0.5", "agent.gamma=0.9")
    run = BaselineRun(cfg, tmp_path / "run")
    obs_dim, act_dim = 4 + 3, 2  # toy: position, goal, one-hot of 3 tasks
    for model in run.models:
        actor = [(m.in_features, m.out_features) for m in model.actor.latent_pi if isinstance(m, torch.nn.Linear)]
        assert actor == [(obs_dim, 24), (24, 16)]
        assert (model.actor.mu.in_features, model.actor.mu.out_features) == (16, act_dim)
        assert len(model.critic.q_networks) == 2
        for q in [*model.critic.q_networks, *model.critic_target.q_networks]:
            assert [(m.in_features, m.out_features) for m in q if isinstance(m, torch.nn.Linear)] == [
                (obs_dim + act_dim, 24),
                (24, 16),
                (16, 1),
            ]
        assert model.gamma == 0.9 and model.tau == cfg.agent.tau and model.batch_size == 8
        assert model.buffer_size == 3000 // 3 and model.learning_starts == 40 and model.gradient_steps == 1
        assert model.lr_schedule(1.0) == pytest.approx(3e-4)
        assert model.target_entropy == -act_dim
        assert model.log_ent_coef.exp().item() == pytest.approx(0.5)
        assert model.replay_buffer.handle_timeout_termination
    run.close()


def test_agent_k_trains_on_task_k_of_the_multitask_envs_and_is_evaluated_on_its_goals(tmp_path):
    cfg = toy_config(tmp_path / "run", "train.total_steps=60", "eval.every=60")
    run = BaselineRun(cfg, tmp_path / "run")
    multitask = make_backend(cfg.env, cfg.seed, evaluation=False).vector_env
    for k, model in enumerate(run.models):
        env = model.get_env().envs[0]
        assert env.unwrapped is run.train_backend.vector_env.envs[k].unwrapped
        assert env.get_wrapper_attr("task_name") == TASKS[k]
        goals = env.get_wrapper_attr("goals")
        np.testing.assert_array_equal(goals, multitask.envs[k].get_wrapper_attr("goals"))
        np.testing.assert_array_equal(goals, run.evaluator.backend.vector_env.envs[k].get_wrapper_attr("goals"))
        assert not env.get_wrapper_attr("terminate_on_success")
    assert run.train() == 0

    # Time limits are truncations: the stored next observation is the true last one (toy dynamics:
    # pos' = clip(pos + 0.1 a)), and no transition stops the bootstrap.
    buf = run.models[0].replay_buffer
    n = buf.pos
    obs, nxt, act = buf.observations[:n, 0], buf.next_observations[:n, 0], buf.actions[:n, 0]
    np.testing.assert_allclose(nxt[:, :2], np.clip(obs[:, :2] + 0.1 * act, -1, 1), atol=1e-6)
    assert buf.dones[:n].sum() == 3 and (buf.dones[:n] * (1 - buf.timeouts[:n])).sum() == 0
    run.close()


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    assert _baseline(tmp_path, "a") == 0
    assert _baseline(tmp_path, "b") == 0
    assert _baseline(tmp_path, "c", "seed=1") == 0
    a, b, c = (_records(tmp_path / r, "eval") + _records(tmp_path / r, "train") for r in "abc")
    assert a == b
    assert a != c


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_with_the_buffer_repeats_the_uninterrupted_run(tmp_path, device):
    assert _baseline(tmp_path, "straight", "checkpoint.save_buffer=true", f"device={device}") == 0
    assert _baseline(tmp_path, "split", "checkpoint.save_buffer=true", "train.total_steps=20", f"device={device}") == 0
    split = tmp_path / "split"
    assert read_state(split)["step"] == 20 and is_finished(split)
    assert _resume(split, "train.total_steps=40") == 0
    for kind in ("train", "eval"):
        assert _records(split, kind) == _records(tmp_path / "straight", kind)


def test_resume_continues_from_the_last_committed_chunk(tmp_path, capsys):
    assert _baseline(tmp_path, "run", "train.total_steps=20") == 0
    run = tmp_path / "run"
    base = run / BASELINE_DIR
    # A kill after the commit point of a chunk, before its files were moved into place:
    stage = base / PENDING_DIR
    stage.mkdir()
    for path in base.iterdir():
        if path.is_file():
            os.replace(path, stage / path.name)
    assert read_state(run)["step"] == 20

    assert _resume(run, "train.total_steps=40") == 0
    assert not stage.exists() and read_state(run)["step"] == 40
    assert [r["step"] for r in _records(run, "eval")] == [20, 40]
    # Without a saved buffer, every agent refilled it with warm-up steps from step 20 on.
    assert all(json.loads((base / f"{t}.state.json").read_text())["learning_starts"] == 30 for t in TASKS)

    # A commit cut short before its state.json is dropped; a finished run's resume changes nothing.
    stage.mkdir()
    (stage / "toy-0.zip").write_bytes(b"half a zip")
    capsys.readouterr()
    assert _resume(run) == 0
    assert not stage.exists()
    before = _tree(run)
    assert _resume(run) == 0
    assert _tree(run) == before
    assert "finished" in capsys.readouterr().err


class Exploit:
    """A pickle that creates `pwned` when unpickled by anything that runs code."""

    def __reduce__(self):
        return (Path.touch, (Path("pwned").absolute(),))


def test_resume_loads_only_tensors_from_the_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _baseline(tmp_path, "run", "train.total_steps=20") == 0
    path = tmp_path / "run" / BASELINE_DIR / "toy-0.zip"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(members["data"])
    exploit = base64.b64encode(pickle.dumps(Exploit())).decode()
    data["policy_kwargs"] = {":type:": "<class 'dict'>", ":serialized:": exploit}
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    assert _resume(tmp_path / "run", "train.total_steps=40") == 0
    assert not (tmp_path / "pwned").exists()


@pytest.fixture(scope="module")
def bad_input_dir(tmp_path_factory) -> Path:
    """A toy preset and a finished 20-step baseline run, shared by the bad-input cases."""
    tmp = tmp_path_factory.mktemp("bad_input")
    assert _baseline(tmp, "run", "train.total_steps=20") == 0
    (tmp / "preset.yaml").write_text(yaml.safe_dump({"env": {"benchmark": "toy"}, "device": "cpu"}))
    return tmp


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t: ["baseline", *TOY_OVERRIDES], "give --config"),
        (lambda t: ["baseline", "--config", str(t / "preset.yaml"), "agent.actor_lr=1e-3"], "one learning rate"),
        (lambda t: ["baseline", "--config", str(t / "preset.yaml"), "train.grad_clip_norm=1.0"], "grad_clip_norm"),
        (lambda t: ["baseline", "--config", str(t / "preset.yaml"), "agent.log_std_min=-5"], "log-std"),
        (lambda t: ["baseline", "--config", str(t / "preset.yaml"), f"run.dir={t / 'run'}"], "already holds a run"),
        (lambda t: ["baseline", "--resume", str(t / "nothing")], "no completed baseline chunk"),
        (lambda t: ["baseline", "--resume", str(t / "run"), "agent.hidden_sizes=[8]"], "cannot change on resume"),
        (lambda t: ["baseline", "--resume", str(t / "run"), "train.total_steps=10"], "train.total_steps must be"),
        (lambda t: ["baseline", "--resume", str(t / "run"), "--config", str(t / "preset.yaml")], "drop --config"),
    ],
    ids=["no-config", "lrs", "clip", "log-std", "existing-run", "no-run", "changed-agent", "budget", "both"],
)
def test_bad_input_gives_one_line_and_writes_nothing(bad_input_dir, make_args, message, capsys):
    tmp = bad_input_dir
    before = _tree(tmp)
    capsys.readouterr()
    assert main(make_args(tmp)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrl: error: ") and message in err and err.count("\n") == 1
    assert _tree(tmp) == before


def test_a_damaged_model_file_gives_one_line_and_writes_nothing(bad_input_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(bad_input_dir / "run", run)
    model = run / BASELINE_DIR / "toy-1.zip"
    model.write_bytes(model.read_bytes()[:1000])
    before = _tree(tmp_path)
    capsys.readouterr()
    assert _resume(run, "train.total_steps=40") == 2
    err = capsys.readouterr().err
    assert err.startswith("mtrl: error: cannot restore task toy-1") and err.count("\n") == 1
    assert _tree(tmp_path) == before


@pytest.mark.metaworld
@pytest.mark.slow
def test_mt1_reach_trains_and_evaluates_on_the_training_goals(tmp_path):
    overrides = [
        "device=cpu",
        "env.benchmark=MT1",
        "env.tasks=[reach-v3]",
        "env.max_episode_steps=50",
        "agent.hidden_sizes=[32,32]",
        "train.total_steps=300",
        "train.warmup_steps=100",
        "train.batch_per_task=32",
        "eval.every=150",
        "eval.episodes=2",
        "log.progress=false",
        "log.tensorboard=false",
        f"run.dir={tmp_path / 'run'}",
    ]
    run = BaselineRun(load_config(None, overrides), tmp_path / "run")
    train_goals = sorted(t.data for t in run.models[0].get_env().envs[0].get_wrapper_attr("tasks"))
    eval_goals = sorted(t.data for t in run.evaluator.backend.vector_env.envs[0].get_wrapper_attr("tasks"))
    assert train_goals == eval_goals and len(train_goals) == 50
    assert run.train() == 0
    run.close()
    assert [r["step"] for r in _records(tmp_path / "run", "eval")] == [150, 300]
    assert set(_records(tmp_path / "run", "eval")[-1]["eval/success/per_task"]) == {"reach-v3"}
    shutil.rmtree(tmp_path / "run")


@pytest.mark.metaworld
@pytest.mark.slow
def test_mt10_agents_train_and_evaluate_on_the_multitask_goal_sets(tmp_path):
    cfg = load_config("configs/mt10_mtsac.yaml", ["device=cpu", "env.vector_strategy=sync", "seed=3"])
    run = BaselineRun(cfg, tmp_path / "run")

    def goals(env) -> list[bytes]:
        return sorted(t.data for t in env.get_wrapper_attr("tasks"))

    for k, model in enumerate(run.models):
        assert goals(model.get_env().envs[0]) == goals(run.evaluator.backend.vector_env.envs[k])
    # Why not Meta-World's MT1 with the same seed: it draws other goals than task k inside MT10.
    reach = run.tasks.index("reach-v3")
    mt1 = make_backend(load_config(None, ["env.benchmark=MT1", "env.tasks=[reach-v3]", "seed=3"]).env, 3, False)
    assert not set(goals(mt1.vector_env.envs[0])) & set(goals(run.models[reach].get_env().envs[0]))
    mt1.close()
    run.close()


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert _baseline(tmp_path, "run", "agent.hidden_sizes=[7]", "--print-config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["agent"]["hidden_sizes"] == [7]
    assert printed["env"]["benchmark"] == "toy"
    assert printed["train"]["total_steps"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset.yaml"]
    # a setting SB3 cannot reproduce is refused, as it would be by the run
    assert _baseline(tmp_path, "run", "train.grad_clip_norm=1.0", "--print-config") == 2
    assert "SB3's SAC has no train.grad_clip_norm" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset.yaml"]


def test_print_config_on_resume_shows_the_saved_config_with_the_overrides(tmp_path, capsys):
    assert _baseline(tmp_path, "run", "train.total_steps=20") == 0
    before = _tree(tmp_path / "run")
    capsys.readouterr()
    assert _resume(tmp_path / "run", "train.total_steps=40", "--print-config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["total_steps"] == 40
    assert printed["run"]["dir"] == str(tmp_path / "run")
    assert _tree(tmp_path / "run") == before
