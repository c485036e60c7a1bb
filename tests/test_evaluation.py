"""The evaluation protocol on the toy benchmark: the training goal sets, one sweep per evaluation.

Evaluation envs hold the same goal sets as the training envs, and every evaluation visits each
task's goals exactly once, in the same order, however much faster some tasks finish than others.
`mtrl eval CHECKPOINT` reproduces the trainer's own numbers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtrl.cli import main
from mtrl.config import load_config
from mtrl.envs import make_backend
from mtrl.evaluation import EvalResult, Evaluator, evaluate
from mtrl.rundir import METRICS_FILE
from mtrl.trainer import Trainer
from tests.conftest import TOY_OVERRIDES, toy_config

GOALS = 5


class GoalRecorder:
    """Steps task 0 straight to its goal (it succeeds and ends its episodes early) and holds the
    others still; records the goal each sub-env's episodes start with."""

    def __init__(self, num_envs: int):
        self.fresh = np.ones(num_envs, dtype=bool)
        self.goals: list[list[tuple]] = [[] for _ in range(num_envs)]

    def eval_action(self, obs: np.ndarray) -> np.ndarray:
        for i in np.flatnonzero(self.fresh):
            self.goals[i].append(tuple(np.round(obs[i, 2:4], 6)))
        self.fresh[:] = False
        actions = np.zeros((len(obs), 2), dtype=np.float32)
        actions[0] = np.clip((obs[0, 2:4] - obs[0, :2]) / 0.1, -1, 1)
        return actions

    def reset(self, env_mask: np.ndarray) -> None:
        self.fresh |= env_mask

    def first(self, episodes: int) -> list[list[tuple]]:
        return [g[:episodes] for g in self.goals]


def toy_backend(seed: int = 3, evaluation: bool = True):
    cfg = load_config(None, [*TOY_OVERRIDES, f"env.num_goals={GOALS}", "env.max_episode_steps=15"])
    return make_backend(cfg.env, seed, evaluation=evaluation)


def test_each_evaluation_sweeps_every_goal_once_in_the_same_order():
    backend = toy_backend()
    evaluator = Evaluator(backend, GOALS)
    first, second = GoalRecorder(backend.num_tasks), GoalRecorder(backend.num_tasks)
    assert evaluator(first) == evaluator(second)
    assert len(first.goals[0]) > 2 * GOALS  # task 0 finished early and ran past its sweep
    assert first.first(GOALS) == second.first(GOALS)
    for recorded, goals in zip(first.first(GOALS), backend.goal_sets(), strict=True):
        assert sorted(recorded) == sorted(tuple(np.round(g, 6).tolist()) for g in goals)  # each goal once


def test_without_the_restore_a_second_sweep_would_repeat_and_skip_goals():
    """What `Evaluator` prevents: the sweep carries over, and reshuffles when it wraps around."""
    backend = toy_backend()
    first, second = GoalRecorder(backend.num_tasks), GoalRecorder(backend.num_tasks)
    evaluate(first, backend, GOALS)
    evaluate(second, backend, GOALS)
    assert len(set(second.first(GOALS)[0])) < GOALS


def test_training_and_evaluation_envs_hold_the_same_goal_sets(tmp_path):
    trainer = Trainer(toy_config(tmp_path / "run"), tmp_path / "run")
    train_goals, eval_goals = trainer.envs.goal_sets(), trainer.parts.evaluator.backend.goal_sets()
    for train, evaluation in zip(train_goals, eval_goals, strict=True):
        assert np.array_equal(train, evaluation)
    assert not np.array_equal(toy_backend(seed=4).goal_sets()[0], train_goals[0])


def test_cli_eval_reproduces_the_trainers_final_evaluation(tmp_path, capsys):
    run = tmp_path / "run"
    assert Trainer(toy_config(run, "eval.episodes=4"), run).train() == 0
    evals = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    final = [r for r in evals if r["kind"] == "eval"][-1]
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean_success"] == final["eval/mean_success"]
    assert out["mean_return"] == final["eval/mean_return"]
    assert {t: v["success"] for t, v in out["per_task"].items()} == final["eval/success/per_task"]


def test_one_episode_per_task_is_a_valid_evaluation_and_zero_is_refused():
    backend = toy_backend()
    names = backend.task_names
    result = Evaluator(backend, 1)(GoalRecorder(backend.num_tasks))
    assert sorted(result.per_task) == sorted(names)
    assert result.per_task[names[0]]["success"] == 1.0  # task 0 is steered to its goal
    assert result.mean_success == np.mean([t["success"] for t in result.per_task.values()])
    for make in (lambda: Evaluator(backend, 0), lambda: evaluate(GoalRecorder(backend.num_tasks), backend, 0)):
        with pytest.raises(ValueError, match="^episodes must be >= 1, found 0$"):
            make()


def test_an_evaluations_log_record_dictionary_and_console_line():
    per_task = {"b": {"success": 1.0, "return": 20.0}, "a": {"success": 0.0, "return": 4.0}}
    result = EvalResult(mean_success=0.5, mean_return=12.0, per_task=per_task)
    record = result.metrics(["a", "b"])  # per-task vectors in the order asked for
    assert set(record) == {"eval/mean_success", "eval/mean_return", "eval/success", "eval/return"}
    assert (record["eval/mean_success"], record["eval/mean_return"]) == (0.5, 12.0)
    assert record["eval/success"].tolist() == [0.0, 1.0] and record["eval/return"].tolist() == [4.0, 20.0]
    assert result.to_dict() == {"mean_success": 0.5, "mean_return": 12.0, "per_task": per_task}
    assert EvalResult(**result.to_dict()) == result
    assert result.summary(step=300, episodes=4) == "step 300: eval success 0.500, return 12.0 (4 episodes per task)"
    assert result.summary(step=300, episodes=1) == "step 300: eval success 0.500, return 12.0 (1 episode per task)"
