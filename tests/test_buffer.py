import re

import numpy as np
import pytest
import torch

from mtrl.buffer import Batch, MultiTaskReplayBuffer


def _transition(k: int, step: int, obs_dim: int = 3) -> Batch:
    task = np.arange(k, dtype=np.float32)
    obs = np.stack([np.full(obs_dim, 100 * t + step, np.float32) for t in task])
    return Batch(
        obs=obs,
        action=np.stack([[t, step] for t in task]).astype(np.float32),
        reward=task + step,
        next_obs=obs + 0.5,
        terminated=np.zeros(k, np.float32),
        truncated=np.full(k, step % 5 == 4, np.float32),
    )


def test_stratified_sample_has_equal_count_per_task_from_that_task_only():
    k, buf = 4, MultiTaskReplayBuffer(4, 50, 3, 2, torch.device("cpu"))
    for step in range(30):
        buf.add(_transition(k, step))
    g = torch.Generator().manual_seed(0)
    batch = buf.sample(16, g, torch.device("cpu"))
    assert batch.obs.shape == (4, 16, 3) and batch.action.shape == (4, 16, 2) and batch.reward.shape == (4, 16)
    # every sampled transition of row t belongs to task t, and fields stay aligned
    task_of_obs = torch.div(batch.obs[..., 0], 100, rounding_mode="floor")
    assert torch.equal(task_of_obs, torch.arange(k).float()[:, None].expand(k, 16))
    step = batch.obs[..., 0] - 100 * task_of_obs
    assert torch.equal(batch.action[..., 1], step)
    assert torch.equal(batch.reward, task_of_obs + step)
    assert torch.equal(batch.next_obs, batch.obs + 0.5)
    assert torch.equal(batch.truncated, (step % 5 == 4).float())


def test_ring_buffer_overwrites_oldest_and_size_caps_at_capacity():
    buf = MultiTaskReplayBuffer(2, 10, 3, 2, torch.device("cpu"))
    for step in range(25):
        buf.add(_transition(2, step))
    assert buf.size == 10 and buf.cursor == 5
    steps = set(buf.storage.action[0, :, 1].tolist())
    assert steps == set(range(15, 25))


def test_truncation_keeps_true_final_obs_and_is_not_terminal():
    buf = MultiTaskReplayBuffer(1, 4, 2, 1, torch.device("cpu"))
    final_obs = np.array([[7.0, 7.0]], np.float32)
    buf.add(Batch(np.zeros((1, 2)), np.zeros((1, 1)), np.ones(1), final_obs, np.zeros(1), np.ones(1)))
    batch = buf.sample(3, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(batch.next_obs[0, 0], torch.tensor([7.0, 7.0]))
    assert batch.terminated.sum() == 0 and batch.truncated.sum() == 3


def test_sampling_is_deterministic_per_generator_and_state_round_trips():
    buf = MultiTaskReplayBuffer(3, 20, 3, 2, torch.device("cpu"))
    for step in range(13):
        buf.add(_transition(3, step))
    a = buf.sample(8, torch.Generator().manual_seed(5), torch.device("cpu"))
    other = MultiTaskReplayBuffer(3, 20, 3, 2, torch.device("cpu"))
    other.load_state_dict(buf.state_dict())
    b = other.sample(8, torch.Generator().manual_seed(5), torch.device("cpu"))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert (other.size, other.cursor) == (13, 13)


def test_empty_buffer_and_capacity_mismatch_are_errors():
    buf = MultiTaskReplayBuffer(2, 5, 3, 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(1, torch.Generator(), torch.device("cpu"))
    with pytest.raises(ValueError, match="capacity"):
        MultiTaskReplayBuffer(2, 6, 3, 2, torch.device("cpu")).load_state_dict(buf.state_dict())


def test_every_task_draws_its_own_uniform_indices():
    k, size, draws = 4, 50, 4000
    buf = MultiTaskReplayBuffer(k, 64, 3, 2, torch.device("cpu"))
    for step in range(size):
        buf.add(_transition(k, step))
    batch = buf.sample(draws, torch.Generator().manual_seed(3), torch.device("cpu"))
    idx = (batch.obs[..., 0] - 100 * torch.arange(k).float()[:, None]).long()  # slot t of task i holds 100 i + t
    assert torch.equal(batch.action[..., 0], torch.arange(k).float()[:, None].expand(k, draws))  # own task's rows
    for i in range(k):
        counts = torch.bincount(idx[i], minlength=size)
        assert counts.numel() == size  # only filled slots
        # uniform over the filled slots: 80 expected per slot, binomial s.d. about 9
        assert counts.min() >= 45 and counts.max() <= 120, counts
        for j in range(i):
            # independent draws coincide in about 1/size of the positions; shared indices in all of them
            assert (idx[i] == idx[j]).float().mean() < 0.05, (i, j)


def test_a_transition_missing_a_field_is_refused_rather_than_stored_misaligned():
    buf = MultiTaskReplayBuffer(2, 5, 3, 2, torch.device("cpu"))
    with pytest.raises(ValueError):
        buf.add(tuple(_transition(2, 0))[:-1])
    assert (buf.size, buf.cursor) == (0, 0)


@pytest.mark.parametrize("tasks,obs_dim", [(3, 3), (2, 4)], ids=["other task count", "other observation size"])
def test_a_buffer_state_of_another_shape_is_refused_naming_the_field_and_both_shapes(tasks, obs_dim):
    saved = MultiTaskReplayBuffer(tasks, 5, obs_dim, 2, torch.device("cpu"))
    for step in range(3):
        saved.add(_transition(tasks, step, obs_dim))
    buf = MultiTaskReplayBuffer(2, 5, 3, 2, torch.device("cpu"))
    expected = f"buffer field 'obs' has shape ({tasks}, 3, {obs_dim}), expected (2, 5, 3)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        buf.load_state_dict(saved.state_dict())
    assert (buf.size, buf.cursor) == (0, 0)


def test_sampling_an_empty_buffer_says_so_in_one_clear_sentence():
    buf = MultiTaskReplayBuffer(2, 5, 3, 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="^cannot sample from an empty replay buffer$"):
        buf.sample(1, torch.Generator(), torch.device("cpu"))


def test_a_one_transition_buffer_holds_the_latest_and_zero_capacity_is_refused():
    buf = MultiTaskReplayBuffer(2, 1, 3, 2, torch.device("cpu"))
    for step in range(3):
        buf.add(_transition(2, step))
    assert (buf.size, buf.cursor) == (1, 0)
    assert torch.equal(
        buf.sample(4, torch.Generator().manual_seed(0), torch.device("cpu")).action[..., 1], torch.full((2, 4), 2.0)
    )
    with pytest.raises(ValueError, match="^capacity_per_task must be >= 1, found 0$"):
        MultiTaskReplayBuffer(2, 0, 3, 2, torch.device("cpu"))


def test_nbytes_predicts_the_storage_a_buffer_allocates():
    buf = MultiTaskReplayBuffer(3, 7, 5, 2, torch.device("cpu"))
    assert MultiTaskReplayBuffer.nbytes(3, 7, 5, 2) == sum(t.nbytes for t in buf.storage) == 4 * 3 * 7 * (2 * 5 + 2 + 3)


def test_storage_is_float32_even_when_torchs_default_dtype_is_not():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        buf = MultiTaskReplayBuffer(2, 4, 3, 2, torch.device("cpu"))
    finally:
        torch.set_default_dtype(previous)
    assert {t.dtype for t in buf.storage} == {torch.float32}
    assert sum(t.nbytes for t in buf.storage) == MultiTaskReplayBuffer.nbytes(2, 4, 3, 2)


def test_storage_lives_on_the_buffers_device_and_a_sample_on_the_device_asked_for():
    # torch's "meta" device has shapes but no data: it shows where tensors go without a GPU
    on_meta = MultiTaskReplayBuffer(2, 4, 3, 2, torch.device("meta"))
    assert on_meta.device == torch.device("meta")
    assert {t.device.type for t in on_meta.storage} == {"meta"}
    buf = MultiTaskReplayBuffer(2, 4, 3, 2, torch.device("cpu"))
    buf.add(_transition(2, 0))
    batch = buf.sample(3, torch.Generator().manual_seed(0), torch.device("meta"))
    assert {t.device.type for t in batch} == {"meta"}
    assert batch.obs.shape == (2, 3, 3) and batch.terminated.shape == (2, 3)


def test_indices_are_drawn_on_the_generators_device_whatever_torchs_default_device():
    buf = MultiTaskReplayBuffer(2, 8, 3, 2, torch.device("cpu"))
    for step in range(6):
        buf.add(_transition(2, step))
    expected = buf.sample(5, torch.Generator().manual_seed(4), torch.device("cpu"))
    with torch.device("meta"):  # a default device the CPU generator cannot draw on
        batch = buf.sample(5, torch.Generator(device="cpu").manual_seed(4), torch.device("cpu"))
    for x, y in zip(batch, expected, strict=True):
        assert torch.equal(x, y)


def test_values_of_any_numeric_type_are_stored_as_float32():
    buf = MultiTaskReplayBuffer(1, 2, 2, 1, torch.device("cpu"))
    buf.add(
        Batch(
            obs=np.array([[0.1, 2.5]]),  # float64: rounded to the nearest float32
            action=[[1]],
            reward=np.array([3], np.int64),
            next_obs=torch.tensor([[0.1, -1.0]], dtype=torch.float64),
            terminated=np.array([True]),
            truncated=[False],
        )
    )
    stored = Batch(*(store[:, 0] for store in buf.storage))
    assert {t.dtype for t in stored} == {torch.float32}
    assert torch.equal(stored.obs, torch.tensor([[0.1, 2.5]], dtype=torch.float32))
    assert stored.action.tolist() == [[1.0]] and stored.reward.tolist() == [3.0]
    assert torch.equal(stored.next_obs, torch.tensor([[0.1, -1.0]], dtype=torch.float32))
    assert stored.terminated.tolist() == [1.0] and stored.truncated.tolist() == [0.0]


def test_a_state_holds_exactly_the_filled_transitions_and_a_partial_ring_restores_its_cursor():
    buf = MultiTaskReplayBuffer(2, 6, 3, 2, torch.device("cpu"))
    for step in range(4):
        buf.add(_transition(2, step))
    state = buf.state_dict()
    assert (state["cursor"], state["size"], state["capacity"]) == (4, 4, 6)
    assert set(state) == {"cursor", "size", "capacity", *Batch._fields}
    assert state["obs"].shape == (2, 4, 3) and state["reward"].shape == (2, 4)
    assert state["action"][1, :, 1].tolist() == [0.0, 1.0, 2.0, 3.0]
    restored = MultiTaskReplayBuffer(2, 6, 3, 2, torch.device("cpu"))
    restored.load_state_dict(state)
    restored.add(_transition(2, 9))  # written after the restored transitions, not over them
    assert restored.storage.action[1, :, 1].tolist() == [0.0, 1.0, 2.0, 3.0, 9.0, 0.0]
    assert (restored.size, restored.cursor) == (5, 5)
