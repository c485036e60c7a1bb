"""Per-task replay buffer with stratified sampling.

Every vector step adds one transition per task, so all tasks share one write cursor.
`sample(b)` returns tensors shaped `[K, b, ...]`: exactly `b` transitions of every task,
which is what per-task losses and the per-task Jacobian consume.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """A stratified minibatch; every field is `[K, B, ...]`."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor


class MultiTaskReplayBuffer:
    """Ring buffer of `capacity_per_task` transitions for each of `num_tasks` tasks.

    `next_obs` holds the true next observation (Meta-World's `final_obs` at a time limit), and
    `terminated` is stored apart from `truncated`, so that targets bootstrap through time limits.
    """

    def __init__(self, num_tasks: int, capacity_per_task: int, obs_dim: int, act_dim: int, device: torch.device):
        if capacity_per_task < 1:
            raise ValueError(f"capacity_per_task must be >= 1, found {capacity_per_task}")
        self.num_tasks, self.capacity, self.device = num_tasks, capacity_per_task, torch.device(device)
        per_transition = Batch(
            obs=(obs_dim,), action=(act_dim,), reward=(), next_obs=(obs_dim,), terminated=(), truncated=()
        )
        self.storage = Batch(
            *(
                torch.zeros(num_tasks, capacity_per_task, *shape, dtype=torch.float32, device=self.device)
                for shape in per_transition
            )
        )
        self.cursor = 0
        self.size = 0

    @staticmethod
    def nbytes(num_tasks: int, capacity_per_task: int, obs_dim: int, act_dim: int) -> int:
        return 4 * num_tasks * capacity_per_task * (2 * obs_dim + act_dim + 3)

    def add(self, transition: Batch) -> None:
        """Add one transition per task; each field is `[K, ...]`."""
        for store, value in zip(self.storage, transition, strict=True):
            store[:, self.cursor] = torch.as_tensor(value)  # the copy into storage casts and moves it
        self.cursor = (self.cursor + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_per_task: int, generator: torch.Generator, device: torch.device) -> Batch:
        """`batch_per_task` transitions of every task, drawn uniformly with replacement."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = torch.randint(
            self.size, (self.num_tasks, batch_per_task), generator=generator, device=generator.device
        ).to(self.device)
        out = []
        for store in self.storage:
            gather_idx = idx.view(*idx.shape, *([1] * (store.dim() - 2))).expand(-1, -1, *store.shape[2:])
            out.append(torch.gather(store, 1, gather_idx).to(device))
        return Batch(*out)

    def state_dict(self) -> dict:
        return {
            "cursor": self.cursor,
            "size": self.size,
            "capacity": self.capacity,
            # a copy of the filled part only: a slice would make torch.save write the whole buffer
            **{name: store[:, : self.size].cpu().clone() for name, store in self.storage._asdict().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"buffer capacity mismatch: checkpoint {state['capacity']}, config {self.capacity}")
        for name, store in self.storage._asdict().items():
            saved = state[name]
            if saved.shape[0] != store.shape[0] or saved.shape[2:] != store.shape[2:]:
                raise ValueError(f"buffer field {name!r} has shape {tuple(saved.shape)}, expected {tuple(store.shape)}")
            store[:, : state["size"]] = saved
        self.cursor, self.size = state["cursor"], state["size"]
