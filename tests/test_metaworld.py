"""Real Meta-World: the smoke preset end to end, and agreement with Meta-World's own evaluator.

Env construction is slow, so each env set is built once per module.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from mtrl.checkpoint import latest_checkpoint
from mtrl.cli import main
from mtrl.config import EnvConfig, load_config
from mtrl.envs import make_backend
from mtrl.evaluation import Evaluator, evaluate

pytestmark = pytest.mark.metaworld
ROOT = Path(__file__).resolve().parents[1]
TASKS = ["reach-v3", "drawer-close-v3", "push-v3"]


class NoisyScriptedAgent:
    """Meta-World's scripted expert per task, with fixed-seed noise so some episodes fail."""

    def __init__(self, tasks: list[str], noise: float = 1.5):
        from metaworld.policies import ENV_POLICY_MAP

        self.experts = [ENV_POLICY_MAP[t]() for t in tasks]
        self.noise = noise
        self.rng = np.random.default_rng(0)

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        actions = np.stack([e.get_action(o[:39]) for e, o in zip(self.experts, observations, strict=True)])
        return np.clip(actions + self.noise * self.rng.normal(size=actions.shape), -1, 1)

    def reset(self, env_mask: np.ndarray) -> None:
        return None


def test_evaluator_agrees_with_metaworld_evaluation():
    from metaworld.evaluation import evaluation

    # five goals per task, enough for four episodes: building fifty would take most of the test's time
    cfg = EnvConfig(benchmark="custom", tasks=TASKS, max_episode_steps=150, num_goals=5)
    ours = evaluate(NoisyScriptedAgent(TASKS), make_backend(cfg, 7, evaluation=True), 4)
    mean_success, mean_return, per_task_success, returns = evaluation(
        NoisyScriptedAgent(TASKS), make_backend(cfg, 7, evaluation=True).vector_env, 4
    )
    assert ours.mean_success == pytest.approx(mean_success)
    assert ours.mean_return == pytest.approx(mean_return)
    for task in TASKS:
        assert ours.per_task[task]["success"] == pytest.approx(per_task_success[task])
        assert ours.per_task[task]["return"] == pytest.approx(np.mean(returns[task]))
    # the comparison means something: neither all-success nor all-failure
    assert 0.0 < ours.mean_success < 1.0, ours.per_task


def test_eval_envs_follow_the_protocol():
    cfg = EnvConfig(benchmark="MT1", tasks=["reach-v3"])
    backend = make_backend(cfg, 0, evaluation=True)
    assert all(backend.vector_env.get_attr("terminate_on_success"))
    goals = []
    for _ in range(5):
        obs = backend.reset()
        goals.append(tuple(np.round(obs[0, 36:39], 6)))
    assert len(set(goals)) == 5  # a new goal every episode (pseudorandom sweep)
    assert obs.shape == (1, 39 + 1) and backend.obs_dim == 39 + 1  # one-hot task id is on


@pytest.mark.parametrize(
    "preset", [pytest.param("mt10_mtsac.yaml", marks=pytest.mark.slow), "mt10_mtsac_paper.yaml"]
)  # building MT10's 50 goals per task twice takes ~45 s: the 50-goal case runs with -m slow
def test_training_and_evaluation_envs_hold_identical_goals_per_task(preset):
    cfg = load_config(ROOT / "configs" / preset, ["env.vector_strategy=sync"])
    train, evaluation = make_backend(cfg.env, 0, evaluation=False), make_backend(cfg.env, 0, evaluation=True)
    train_goals, eval_goals = train.goal_sets(), evaluation.goal_sets()
    assert len(train_goals) == 10 and all(len(g) == cfg.env.num_goals for g in train_goals)
    for task_train, task_eval in zip(train_goals, eval_goals, strict=True):
        assert np.array_equal(task_train, task_eval)
    train.close()
    evaluation.close()


class ReachThenIdle:
    """Meta-World's expert on the first task (it succeeds and ends its episodes early), no motion on
    the others; records the goal (observation 36:39) each episode starts with."""

    def __init__(self, tasks: list[str]):
        from metaworld.policies import ENV_POLICY_MAP

        self.expert = ENV_POLICY_MAP[tasks[0]]()
        self.fresh = np.ones(len(tasks), dtype=bool)
        self.goals: list[list[tuple]] = [[] for _ in tasks]

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        for i in np.flatnonzero(self.fresh):
            self.goals[i].append(tuple(np.round(observations[i, 36:39], 6)))
        self.fresh[:] = False
        actions = np.zeros((len(observations), 4))
        actions[0] = self.expert.get_action(observations[0, :39])
        return actions

    def reset(self, env_mask: np.ndarray) -> None:
        self.fresh |= env_mask


def test_every_evaluation_visits_each_goal_once_in_the_same_order():
    tasks, goals = ["reach-v3", "push-v3"], 5
    cfg = EnvConfig(benchmark="custom", tasks=tasks, max_episode_steps=60, num_goals=goals)
    evaluator = Evaluator(make_backend(cfg, 0, evaluation=True), goals)
    first, second = ReachThenIdle(tasks), ReachThenIdle(tasks)
    assert evaluator(first) == evaluator(second)
    assert len(first.goals[0]) > goals + 1  # reach finished early and ran into its next sweep
    for recorded in (first, second):
        assert all(len(set(g[:goals])) == goals for g in recorded.goals)  # each goal once
    assert [g[:goals] for g in first.goals] == [g[:goals] for g in second.goals]
    evaluator.close()


def test_smoke_preset_end_to_end(tmp_path, capsys):
    run = tmp_path / "smoke"
    start = time.perf_counter()
    assert main(["train", "--config", str(ROOT / "configs" / "smoke.yaml"), f"run.dir={run}"]) == 0
    elapsed = time.perf_counter() - start
    assert latest_checkpoint(run) is not None
    assert (run / "config.yaml").is_file() and any((run / "tb").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [100, 200, 300, 400, 500, 600]
    assert all(np.isfinite(r["loss/critic"]) and np.isfinite(r["loss/actor"]) for r in train[1:])
    assert len(train[-1]["loss/critic/per_task"]) == 10
    assert elapsed < 60, f"smoke preset took {elapsed:.0f}s"

    capsys.readouterr()
    assert main(["eval", str(run), "--episodes", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["per_task"]) == 10 and 0.0 <= out["mean_success"] <= 1.0
