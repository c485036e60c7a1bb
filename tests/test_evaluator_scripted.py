"""The evaluator on scripted episodes whose success and return are known exactly.

Each sub-env plays a fixed script: episode j of a task lasts a fixed number of steps and reports
`info["success"] = 1` at chosen steps only. The agent's action is 10 j + 1 for an observation of
episode j, and the reward is the action, so an episode's return says which episode it was.
Tasks have episodes of different lengths, so the fast ones finish more than the counted episodes
before the slowest task is done: only the first `episodes` of each task may count.
"""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
import pytest

from mtrl.envs.vector import VectorEnvBackend
from mtrl.evaluation import evaluate

EPISODES = 2


class ScriptedEnv(gym.Env):
    """Episode j lasts `lengths[j]` steps (the last entry repeats) and succeeds at steps `successes[j]` (1-based)."""

    metadata = {"render_modes": []}

    def __init__(self, task_name: str, lengths: list[int], successes: list[set[int]], terminate_on_success: bool):
        self.task_name = task_name
        self.lengths, self.successes = lengths, successes
        self.terminate_on_success = terminate_on_success
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1e3, 1e3, (1,), np.float32)
        self.episode, self.t = -1, 0

    def toggle_terminate_on_success(self, on: bool) -> None:
        self.terminate_on_success = on

    def _obs(self) -> np.ndarray:
        return np.array([self.episode, self.t], np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.episode, self.t = self.episode + 1, 0
        return self._obs(), {}

    def step(self, action: np.ndarray):
        self.t += 1
        j = self.episode
        success = self.t in self.successes[min(j, len(self.successes) - 1)]
        terminated = success and self.terminate_on_success
        truncated = not terminated and self.t >= self.lengths[min(j, len(self.lengths) - 1)]
        return self._obs(), float(action[0]), terminated, truncated, {"success": float(success)}


class ScriptedAgent:
    """Action 10 j + 1 in episode j; records the masks `reset` is called with."""

    def __init__(self) -> None:
        self.resets: list[np.ndarray] = []

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        return 10 * observations[:, :1] + 1

    def reset(self, env_mask: np.ndarray) -> None:
        self.resets.append(np.array(env_mask))  # a copy, of the type given


# Sub-envs pose as Meta-World tasks so that `metaworld.evaluation` can name them too.
TASKS = ["reach-v3", "push-v3", "drawer-close-v3"]
SCRIPTS = {
    # 2-step episodes: the first succeeds at its middle step only, the second never; all later ones
    # (which must not count) succeed at their last step.
    "reach-v3": ([2], [{1}, set(), {2}]),
    # 6-step episodes, the slowest task: the second succeeds at step 3 only.
    "push-v3": ([6], [set(), {3}, set()]),
    # 3-step episodes: success at every step, then at the last step only (seen only in `final_info`),
    # then never.
    "drawer-close-v3": ([3], [{1, 2, 3}, {3}, set()]),
}


def _envs(terminate_on_success: bool, task_name=lambda task: task) -> gym.vector.VectorEnv:
    fns = [
        partial(
            lambda task: gym.wrappers.RecordEpisodeStatistics(
                ScriptedEnv(task_name(task), *SCRIPTS[task], terminate_on_success)
            ),
            task,
        )
        for task in TASKS
    ]
    return gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def _return(length: int, episode: int) -> float:
    return float(length * (10 * episode + 1))


def test_success_at_any_step_of_the_first_episodes_counts():
    envs = _envs(terminate_on_success=False)
    agent = ScriptedAgent()
    result = evaluate(agent, VectorEnvBackend(envs, TASKS), EPISODES)
    expected = {
        "reach-v3": {"success": 0.5, "return": (_return(2, 0) + _return(2, 1)) / 2},  # 12
        "push-v3": {"success": 0.5, "return": (_return(6, 0) + _return(6, 1)) / 2},  # 36
        "drawer-close-v3": {"success": 1.0, "return": (_return(3, 0) + _return(3, 1)) / 2},  # 18
    }
    assert result.per_task == expected
    assert result.mean_success == pytest.approx(2 / 3)
    assert result.mean_return == pytest.approx(22.0)
    # the evaluation ran until the slowest task (6-step episodes) had finished its 2 episodes: 12 steps
    assert list(envs.get_attr("episode")) == [6, 2, 4]  # index of the episode begun last, by auto-reset
    assert len(agent.resets) == 1 + 12 and agent.resets[0].all()
    assert {m.dtype for m in agent.resets} == {np.dtype(bool)}  # boolean masks, fit to index per-env state
    # the agent is reset for exactly the sub-envs whose episode ended: 6, 2 and 4 of them
    np.testing.assert_array_equal(np.sum(agent.resets[1:], axis=0), [6, 2, 4])


def test_terminate_on_success_ends_episodes_at_their_first_success():
    result = evaluate(ScriptedAgent(), VectorEnvBackend(_envs(terminate_on_success=True), TASKS), EPISODES)
    assert result.per_task == {
        "reach-v3": {"success": 0.5, "return": (1 * 1 + _return(2, 1)) / 2},  # ends at step 1, then 2 steps
        "push-v3": {"success": 0.5, "return": (_return(6, 0) + 3 * 11) / 2},  # 6 steps, then ends at step 3
        "drawer-close-v3": {"success": 1.0, "return": (1 * 1 + 3 * 11) / 2},
    }


def test_agrees_with_metaworld_evaluation_on_scripted_episodes():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.evaluation import evaluation

    def class_name(task: str) -> str:  # how Meta-World's evaluator identifies a sub-env's task
        return ALL_V3_ENVIRONMENTS[task].__name__

    ours = evaluate(ScriptedAgent(), VectorEnvBackend(_envs(True, class_name), TASKS), EPISODES)
    mean_success, mean_return, per_task_success, returns = evaluation(
        ScriptedAgent(), _envs(True, class_name), EPISODES
    )
    assert ours.mean_success == pytest.approx(mean_success)
    assert ours.mean_return == pytest.approx(mean_return)
    for task in TASKS:
        assert ours.per_task[task]["success"] == pytest.approx(per_task_success[task])
        assert ours.per_task[task]["return"] == pytest.approx(np.mean(returns[task]))
    assert sorted({ours.per_task[t]["success"] for t in TASKS}) == [0.5, 1.0]  # not a trivial agreement
