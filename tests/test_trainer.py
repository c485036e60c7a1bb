"""End-to-end behaviour of the trainer on the toy benchmark: determinism, resume, checkpoints."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrl import checkpoint as ckpt
from mtrl import load_policy
from mtrl.callbacks import Callback
from mtrl.cli import main
from mtrl.evaluation import EvalResult
from mtrl.rundir import METRICS_FILE
from mtrl.trainer import Trainer
from tests.conftest import toy_config


def _metrics(run_dir: Path) -> list[dict]:
    """The run's records without wall-clock figures."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def _train(run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(toy_config(run_dir, *overrides), run_dir)
    assert trainer.train() == 0
    return trainer


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Trainer:
    """One finished run of the default toy config, shared by the tests that only read it."""
    return _train(tmp_path_factory.mktemp("default") / "run")


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path, default_run):
    _train(tmp_path / "b")
    _train(tmp_path / "c", "seed=1")
    a, b, c = _metrics(default_run.run_dir), _metrics(tmp_path / "b"), _metrics(tmp_path / "c")
    assert [r["step"] for r in a if r["kind"] == "train"] == list(range(20, 201, 20))
    assert [r["step"] for r in a if r["kind"] == "eval"] == [100, 200]
    assert a == b
    assert a != c


def test_resume_continues_step_count_and_metrics_exactly(tmp_path, default_run):
    split = tmp_path / "split"
    _train(split, "checkpoint.save_buffer=true", "train.total_steps=100")
    assert ckpt.latest_checkpoint(split).name == "step_0000000100.pt"
    resumed = Trainer.resume(split, ["train.total_steps=200"])
    assert resumed.counters.env_steps == 100
    assert resumed.train() == 0
    assert resumed.counters.env_steps == 200
    # the uninterrupted run: saving the buffer in checkpoints changes no number
    assert _metrics(split) == _metrics(default_run.run_dir)  # no gap, no duplicate, same numbers


def test_resume_restores_a_stateful_combiner_exactly(tmp_path):
    """Nash-MTL warm-starts each solve from the previous update's solution: a resumed run must too."""
    overrides = ["combiner.name=nashmtl", "checkpoint.save_buffer=true", "train.warmup_steps=20"]
    overrides += ["train.total_steps=80", "checkpoint.every=40", "eval.every=40", "log.every=20"]
    straight = _train(tmp_path / "straight", *overrides)
    split = tmp_path / "split"
    _train(split, *overrides, "train.total_steps=40")
    at_split = ckpt.load(split)
    assert at_split["counters"]["env_steps"] == 40 and at_split["combiner"]  # the warm start is saved
    resumed = Trainer.resume(split, overrides)
    # Its solves converge from a cold start too, so the metrics alone would not show a lost warm start.
    restored = resumed.combiner.state_dict()
    assert restored.keys() == at_split["combiner"].keys()
    assert all(torch.equal(restored[k], v) for k, v in at_split["combiner"].items())
    assert resumed.train() == 0
    assert _metrics(split) == _metrics(tmp_path / "straight")
    expected, found = ckpt.load(tmp_path / "straight"), ckpt.load(split)
    for key in ("agent", "combiner"):
        assert expected[key].keys() == found[key].keys()
        for name, tensor in expected[key].items():
            assert torch.equal(found[key][name], tensor), (key, name)
    assert torch.equal(straight.combiner.state_dict()["warm_start"], resumed.combiner.state_dict()["warm_start"])


def test_resume_is_exact_when_train_logs_fall_inside_episodes(tmp_path):
    """Values logged with every train record until replaced are part of the checkpoint.

    Episodes end every 20 steps and train records come every 15: the record at step 105 holds the
    episode that ended at the checkpoint (step 100), and the diagnostics of update 55 (step 95), which
    reach the first log after them. A resumed run has seen neither unless the checkpoint holds them.
    """
    overrides = ["checkpoint.save_buffer=true", "log.every=15", "combiner.diagnostics_every=11"]
    _train(tmp_path / "straight", *overrides)
    straight = _metrics(tmp_path / "straight")
    at_105 = next(r for r in straight if r["kind"] == "train" and r["step"] == 105)
    assert "train/episode_return" in at_105 and "combiner/critic/cos_mean" in at_105
    split = tmp_path / "split"
    _train(split, *overrides, "train.total_steps=100")
    assert Trainer.resume(split, ["train.total_steps=200"]).train() == 0
    assert _metrics(split) == straight


def test_a_checkpoint_without_the_pending_log_values_is_refused_in_one_line(tmp_path):
    """`learning_starts`, `train_stats` and `update_metrics` are part of the format: a file without them is
    not a checkpoint of this version, and nothing is guessed for them."""
    run = tmp_path / "run"
    _train(run, "train.total_steps=60")
    path = ckpt.latest_checkpoint(run)
    state = torch.load(path, weights_only=True)
    del state["learning_starts"]
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        Trainer.resume(run, ["train.total_steps=80"])
    assert str(err.value) == f"{path} is not a complete mtrl checkpoint (KeyError: 'learning_starts')"


@pytest.mark.parametrize("optimizer", ["adam", "adatask"])
def test_optimizer_states_not_grouped_by_network_are_refused_in_one_line(optimizer, tmp_path):
    """Optimizer states are saved per network (`{critic: {adam: ...}, ...}`); one flat dict of torch
    optimizer states is not this format."""
    overrides = (f"optimizer.name={optimizer}", "agent.architecture=multihead", "checkpoint.save_buffer=true")
    run = tmp_path / "run"
    _train(run, *overrides, "train.total_steps=60")
    path = ckpt.latest_checkpoint(run)
    state = torch.load(path, weights_only=True)
    flat = {}
    for net, parts in state["optimizers"].items():
        if "adatask" in parts:
            flat[f"{net}_shared"] = parts["adatask"]
        if "adam" in parts:
            flat[net] = parts["adam"]
    state["optimizers"] = flat
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        Trainer.resume(run, ["train.total_steps=80"])
    assert str(err.value).startswith(f"{path} does not match this config: ") and "\n" not in str(err.value)


def test_callbacks_see_each_phase_begin_and_end_around_its_result(tmp_path):
    class Record(Callback):
        def __init__(self):
            self.events: list[tuple] = []

        def on_phase(self, phase, entering):
            if phase != "collect":  # every vector step's: tests/test_overlap.py checks where updates fall
                self.events.append((phase, entering))

        def on_update(self, trainer, result):
            self.events.append(("on_update", result.finite))

        def on_eval(self, trainer, result):
            self.events.append(("on_eval", trainer.progress.last_eval is result))

        def on_checkpoint(self, trainer, path):
            self.events.append(("on_checkpoint", path.name))

    def eval_and_checkpoint(step: int) -> list[tuple]:
        return [("eval", True), ("eval", False), ("on_eval", True)] + [
            ("checkpoint", True),
            ("checkpoint", False),
            ("on_checkpoint", f"step_{step:010d}.pt"),
        ]

    update = [("update", True), ("update", False), ("on_update", True)]
    run = tmp_path / "run"
    overrides = ["eval.every=30", "checkpoint.every=30", "checkpoint.save_buffer=true"]
    first = Record()
    assert Trainer(toy_config(run, *overrides, "train.total_steps=60"), run, callbacks=[first]).train() == 0
    # warm-up until step 40, then one update per step
    assert first.events == eval_and_checkpoint(30) + update * 21 + eval_and_checkpoint(60)
    second = Record()
    resumed = Trainer.resume(run, [*overrides, "train.total_steps=61"], callbacks=[second])
    assert second.events == [("restore", True), ("restore", False)]
    assert resumed.train() == 0
    assert second.events[2:] == update + eval_and_checkpoint(61)
    # the command line resumes in one phase: it reads the checkpoint, merges the config, builds and loads the parts
    third = Record()
    assert main(["train", "--resume", str(run), "train.total_steps=62"], callbacks=[third]) == 0
    assert third.events[:2] == [("restore", True), ("restore", False)]
    assert ("restore", True) not in third.events[2:]


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.total_steps=160", "checkpoint.every=100")
    # the run logged up to step 160, but its newest checkpoint before the end is step 100:
    (run / "checkpoints" / "step_0000000160.pt").unlink()
    trainer = Trainer.resume(run, ["train.total_steps=160"])
    steps = [r["step"] for r in _metrics(run)]
    assert max(steps) == 100
    trainer.train()
    train_steps = [r["step"] for r in _metrics(run) if r["kind"] == "train"]
    assert train_steps == list(range(20, 161, 20))


def test_checkpoint_round_trip_gives_identical_actions(tmp_path):
    trainer = _train(tmp_path / "run", "agent.architecture=multihead")
    obs = np.random.default_rng(0).normal(size=(3, trainer.obs_dim)).astype(np.float32)
    expected = trainer.policy().eval_action(obs)
    for path in (ckpt.latest_checkpoint(tmp_path / "run"), tmp_path / "run"):
        policy = load_policy(path)
        np.testing.assert_array_equal(policy.eval_action(obs), expected)
    state = ckpt.load(tmp_path / "run")
    assert state["counters"]["env_steps"] == 200 and "buffer" not in state


def test_keep_last_n_and_best(tmp_path):
    run = tmp_path / "run"
    _train(run, "checkpoint.every=20", "checkpoint.keep_last=2")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "step_0000000180.pt", "step_0000000200.pt"]
    best = ckpt.load(run / "checkpoints" / "best.pt")
    assert best["counters"]["best_success"] == max(r["eval/mean_success"] for r in _metrics(run) if r["kind"] == "eval")


def test_time_limit_transitions_keep_the_true_final_observation(default_run):
    """On the toy benchmark pos' = clip(pos + 0.1 clip(a), -1, 1): every stored next_obs must be the stepped state.

    At a time limit the vector env has already reset; the buffer must hold the episode's true last
    observation (`final_obs`), flagged truncated and not terminated, so that targets bootstrap through it.
    """
    ep_len, steps = 20, 200  # ten episodes; updates (and policy actions) from step 40 on
    assert (default_run.cfg.env.max_episode_steps, default_run.cfg.train.total_steps) == (ep_len, steps)
    stored = default_run.buffer.state_dict()
    assert stored["size"] == steps
    obs, action, next_obs = stored["obs"].numpy(), stored["action"].numpy(), stored["next_obs"].numpy()
    stepped = np.clip(obs[..., :2] + 0.1 * np.clip(action, -1.0, 1.0), -1.0, 1.0)
    np.testing.assert_allclose(next_obs[..., :2], stepped, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(next_obs[..., 2:], obs[..., 2:])  # same goal and task id within an episode
    last = (np.arange(steps) + 1) % ep_len == 0
    np.testing.assert_array_equal(stored["truncated"].numpy(), np.broadcast_to(last, (3, steps)).astype(np.float32))
    assert not stored["terminated"].any()  # training envs never terminate: time limits are not terminal
    # inside an episode the next observation is the next step's observation; after a time limit it is not
    np.testing.assert_array_equal(next_obs[:, :-1][:, ~last[:-1]], obs[:, 1:][:, ~last[:-1]])
    assert np.all(np.abs(obs[:, 1:][:, last[:-1], :2]) <= 0.1)  # the following step starts from a reset


def test_best_checkpoint_is_the_one_with_the_best_evaluation(tmp_path):
    run = tmp_path / "run"
    _train(run, "checkpoint.every=20", "eval.every=40", "checkpoint.keep_last=100")
    evals = {r["step"]: r["eval/mean_success"] for r in _metrics(run) if r["kind"] == "eval"}
    assert sorted(evals) == [40, 80, 120, 160, 200]
    best = ckpt.load(run / "checkpoints" / "best.pt")
    step = best["counters"]["env_steps"]
    # a checkpoint between evaluations carries the success of the evaluation before it
    success_at = {s: evals[max(e for e in evals if e <= s)] for s in range(40, 201, 20)}
    assert success_at[step] == max(evals.values()) == best["counters"]["best_success"]
    same_step = ckpt.load(run / "checkpoints" / f"step_{step:010d}.pt")
    assert best["counters"] == same_step["counters"]
    for name, tensor in same_step["agent"].items():
        assert torch.equal(best["agent"][name], tensor), name


def test_best_checkpoint_is_not_replaced_by_a_worse_one_even_after_a_resume(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(toy_config(run), run)
    best_path = run / "checkpoints" / "best.pt"
    weights: dict[int, dict] = {}
    expected_best = None
    # (step, mean eval success): no evaluation yet, then better, worse and better again
    for step, success in [(10, None), (20, 0.2), (30, 0.5), (40, 0.3), (50, 0.6), (60, 0.1), (70, 0.4)]:
        with torch.no_grad():  # every checkpoint gets weights of its own
            for p in trainer.agent.parameters():
                p.add_(1.0)
        trainer.counters.env_steps = step
        trainer.progress.last_eval = None if success is None else EvalResult(success, 0.0, {})
        trainer.save_checkpoint()
        weights[step] = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
        if success is not None and (expected_best is None or success > expected_best[1]):
            expected_best = (step, success)
        if expected_best is None:
            assert not best_path.exists()
            continue
        best = ckpt.load(best_path)
        assert best["counters"]["env_steps"] == expected_best[0], step
        assert best["counters"]["best_success"] == expected_best[1]
        assert all(torch.equal(best["agent"][k], v) for k, v in weights[expected_best[0]].items())
    assert expected_best == (50, 0.6)

    resumed = Trainer.resume(run)
    assert resumed.counters.best_success == 0.6
    resumed.counters.env_steps = 80
    resumed.progress.last_eval = EvalResult(0.5, 0.0, {})
    resumed.save_checkpoint()
    assert ckpt.load(best_path)["counters"]["env_steps"] == 50
    resumed.counters.env_steps = 90
    resumed.progress.last_eval = EvalResult(0.7, 0.0, {})
    resumed.save_checkpoint()
    assert ckpt.load(best_path)["counters"]["env_steps"] == 90


def test_tampered_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "bad.pt"
    torch.save({"format": ckpt.FORMAT_VERSION, "payload": Exploit()}, bad)
    with pytest.raises(ckpt.CheckpointError, match="not a safe checkpoint"):
        ckpt.load(bad)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"format": 1}))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(raw)


def test_cli_eval_prints_the_json_contract(default_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(default_run.run_dir), "--episodes", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"mean_success", "mean_return", "per_task"}
    assert set(out["per_task"]) == {"toy-0", "toy-1", "toy-2"}
    for task in out["per_task"].values():
        assert set(task) == {"success", "return"} and 0.0 <= task["success"] <= 1.0
    assert out["mean_success"] == pytest.approx(np.mean([t["success"] for t in out["per_task"].values()]))


def test_toy_agent_learns(tmp_path):
    """Not just 'it ran': a short run on the toy benchmark must solve most episodes.

    The policy before learning succeeds in 0 of 30 episodes (the first evaluation, at step 500).
    """
    run = tmp_path / "run"
    overrides = ["env.max_episode_steps=30", "agent.hidden_sizes=[64,64]", "train.batch_per_task=64"]
    _train(run, *overrides, "train.total_steps=2500", "eval.every=500", "eval.episodes=10", "log.every=500")
    evals = [r["eval/mean_success"] for r in _metrics(run) if r["kind"] == "eval"]
    assert evals[0] == 0.0
    assert evals[-1] >= 0.7, evals


def test_resume_without_a_saved_buffer_refills_it_before_learning(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.total_steps=100")  # warm-up 40: updates at steps 40..100
    resumed = Trainer.resume(run, ["train.total_steps=160"])
    assert resumed.counters.updates == 61 and resumed.buffer.size == 0
    resumed.train()
    # 40 more steps of collection after the resume at step 100, then updates at steps 140..160
    assert resumed.counters.updates == 61 + 21


def test_checkpoint_holds_only_the_filled_part_of_the_buffer(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.total_steps=100", "checkpoint.save_buffer=true", "train.buffer_capacity=300000")
    state = ckpt.load(run)
    assert state["buffer"]["obs"].shape[:2] == (3, 100)
    assert ckpt.latest_checkpoint(run).stat().st_size < 2_000_000  # the full buffer would be ~30 MB


def test_each_diagnostics_update_reaches_exactly_one_log(tmp_path):
    """Diagnostics of an update between two logs are written at the next log, and only there."""
    cfg = toy_config(
        tmp_path / "run",
        "combiner.name=cagrad",
        "combiner.diagnostics_every=20",
        "train.warmup_steps=50",
        "train.total_steps=110",
    )
    assert Trainer(cfg, tmp_path / "run").train() == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if r["kind"] == "train" and "combiner/critic/cos_mean" in r]
    # updates 0, 20, 40, ... happen at steps 50, 70, 90, ...; logs every 20 steps from step 20
    assert logged == [60, 80, 100]


def test_a_resume_restores_the_last_evaluation(tmp_path):
    run = tmp_path / "run"
    trained = _train(run, "train.total_steps=100")
    assert trained.progress.last_eval is not None
    resumed = Trainer.resume(run)
    assert resumed.progress.last_eval == trained.progress.last_eval
