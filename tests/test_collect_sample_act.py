"""What the trainer stores, what an update samples, and how evaluation acts, each against its own reference.

- Collection: every transition the trainer stores in task k's replay row is one step of task k's
  toy env, checked against the toy env's own physics (its one-hot id, its goals, its dynamics and
  reward), across episode boundaries (the final observation of an episode, then a reset).
- Sampling: each task's batch is `batch_per_task` uniform draws with replacement from that task's
  own stored transitions, checked against an independent draw from the same generator.
- Evaluation: the action sent to the evaluation envs is tanh of the actor's mean, for every
  network architecture.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from mtrl.buffer import Batch, MultiTaskReplayBuffer
from mtrl.build import build
from mtrl.envs.toy import ToyReachEnv
from mtrl.evaluation import Evaluator
from mtrl.trainer import Trainer
from tests.conftest import toy_config

K, EPISODE, STEPS, NUM_GOALS, SEED = 3, 20, 70, 5, 0


def test_each_task_row_holds_that_tasks_steps_across_episode_boundaries(tmp_path):
    run = tmp_path / "run"
    cfg = toy_config(
        run,
        f"env.toy_tasks={K}",
        f"env.max_episode_steps={EPISODE}",
        f"env.num_goals={NUM_GOALS}",
        f"train.total_steps={STEPS}",
        f"seed={SEED}",
        "eval.every=0",
    )
    trainer = Trainer(cfg, run)
    assert trainer.train() == 0
    stored = Batch(*(field[:, :STEPS].double().numpy() for field in trainer.buffer.storage))
    assert trainer.buffer.size == STEPS  # two episode boundaries (steps 19 and 39) and a half
    for k in range(K):
        env = ToyReachEnv(k, K, NUM_GOALS, SEED, evaluation=False)  # task k's own goals and one-hot id
        obs, next_obs, action = stored.obs[k], stored.next_obs[k], stored.action[k]
        for name, o in (("obs", obs), ("next_obs", next_obs)):
            np.testing.assert_array_equal(o[:, 4:], np.tile(env.one_hot, (STEPS, 1)), err_msg=f"task {k} {name}")
        goals = obs[:, 2:4]
        assert all(np.isclose(env.goals, g, atol=1e-7).all(1).any() for g in goals), f"task {k}: another task's goal"
        np.testing.assert_array_equal(next_obs[:, 2:4], goals)  # a step keeps its episode's goal
        # the toy's dynamics and reward, from the stored observation and action
        position = np.clip(obs[:, :2] + 0.1 * np.clip(action, -1, 1), -1, 1)
        np.testing.assert_allclose(next_obs[:, :2], position, atol=1e-6, err_msg=f"task {k}")
        distance = np.linalg.norm(next_obs[:, :2] - goals, axis=1)
        np.testing.assert_allclose(stored.reward[k], 1 - distance + (distance < 0.1), atol=1e-5)
        ends = np.arange(STEPS) % EPISODE == EPISODE - 1
        np.testing.assert_array_equal(stored.truncated[k], ends)
        np.testing.assert_array_equal(stored.terminated[k], np.zeros(STEPS))  # training envs never terminate
        # Within an episode the next transition starts where this one ended; after its last step,
        # from a reset (a start near the origin), while this one keeps the final observation.
        within = ~ends[:-1]
        np.testing.assert_array_equal(obs[1:][within], next_obs[:-1][within])
        assert (np.abs(obs[1:][~within, :2]) <= 0.1 + 1e-7).all()
        assert not np.isclose(obs[1:][~within], next_obs[:-1][~within]).all()


def filled_buffer(
    added: int, capacity: int = 5, k: int = 4
) -> tuple[MultiTaskReplayBuffer, dict[tuple[int, int], int]]:
    """A buffer after `added` vector steps whose every field encodes (task, step); and, for each
    (task, slot), the step whose transition the slot holds, from the ring's definition."""
    buffer = MultiTaskReplayBuffer(k, capacity, obs_dim=2, act_dim=1, device=torch.device("cpu"))
    holder = {}
    for step in range(added):
        code = torch.tensor([100.0 * task + step for task in range(k)])
        buffer.add(
            Batch(torch.stack([code, -code], 1), code[:, None], code, torch.stack([code, code + 0.5], 1), code, code)
        )
        for task in range(k):
            holder[(task, step % capacity)] = step
    return buffer, holder


@pytest.mark.parametrize("added", [3, 5, 12], ids=["partly-filled", "full", "wrapped"])
def test_each_tasks_batch_is_uniform_draws_from_its_own_transitions(added):
    buffer, holder = filled_buffer(added)
    k, size, per_task = buffer.num_tasks, min(added, buffer.capacity), 7
    batch = buffer.sample(per_task, torch.Generator().manual_seed(11), torch.device("cpu"))
    slots = torch.randint(size, (k, per_task), generator=torch.Generator().manual_seed(11))  # the same draw
    expected = torch.tensor([[100.0 * task + holder[(task, int(s))] for s in slots[task]] for task in range(k)])
    assert batch.reward.shape == (k, per_task)
    torch.testing.assert_close(batch.reward, expected, rtol=0, atol=0)
    torch.testing.assert_close(batch.obs, torch.stack([expected, -expected], -1), rtol=0, atol=0)
    torch.testing.assert_close(batch.action, expected[..., None], rtol=0, atol=0)
    torch.testing.assert_close(batch.next_obs, torch.stack([expected, expected + 0.5], -1), rtol=0, atol=0)
    torch.testing.assert_close(batch.terminated, expected, rtol=0, atol=0)
    torch.testing.assert_close(batch.truncated, expected, rtol=0, atol=0)


def test_every_task_draws_every_stored_transition_equally_often():
    buffer, _ = filled_buffer(12)  # wrapped: the slots hold steps 10, 11, 7, 8, 9
    draws = 20_000
    batch = buffer.sample(draws, torch.Generator().manual_seed(3), torch.device("cpu"))
    for task in range(buffer.num_tasks):  # the last task included
        steps, counts = np.unique(batch.reward[task].numpy() - 100 * task, return_counts=True)
        assert steps.tolist() == [7, 8, 9, 10, 11]
        sigma = np.sqrt(draws * 0.2 * 0.8)
        assert (np.abs(counts - draws / 5) < 5 * sigma).all(), (task, counts)


def architectures() -> list[tuple[str, str]]:
    """(config key, name) of every network architecture."""
    try:  # a registry of architectures, where there is one
        from mtrl.networks import ARCHITECTURES
    except ImportError:
        return [("agent.variant", name) for name in ("conditioned", "multihead")]
    return [("agent.architecture", name) for name in ARCHITECTURES]


class RecordingBackend:
    """An env backend that records each observation the policy acts on and the action it returns."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.acted = backend, []
        self.obs: np.ndarray | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def reset(self, seed: int | None = None) -> np.ndarray:
        self.obs = self.backend.reset(seed)
        return self.obs

    def step(self, actions: np.ndarray):
        self.acted.append((self.obs.copy(), np.array(actions, copy=True)))
        step = self.backend.step(actions)
        self.obs = step.obs
        return step


@pytest.mark.parametrize(("key", "architecture"), architectures())
def test_evaluation_acts_with_tanh_of_the_actor_mean(key, architecture, tmp_path):
    cfg = toy_config(tmp_path / "run", f"{key}={architecture}", "eval.episodes=1")
    parts = build(cfg)
    recording = RecordingBackend(parts.make_evaluator().backend)
    parts.evaluator = Evaluator(recording, cfg.eval.episodes)
    trainer = Trainer(cfg, tmp_path / "run", parts=parts)
    actor = trainer.agent.actor
    with torch.no_grad():  # means of a few units: tanh(mean), the mean and a clipped mean all differ
        for p in actor.parameters():
            p.mul_(4.0)
    trainer.evaluate()
    assert len(recording.acted) >= EPISODE
    for obs, action in recording.acted:
        with torch.no_grad():
            mean = actor(torch.as_tensor(obs, dtype=torch.float32)[:, None])[0][:, 0]
        assert mean.abs().max() > 1.0  # the test can tell tanh(mean) from a clipped mean
        torch.testing.assert_close(torch.as_tensor(action), torch.tanh(mean), rtol=1e-6, atol=1e-6)
