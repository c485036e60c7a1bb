"""What every architecture is built from: task-owned layers, shared MLPs, and the network's shape.

Every network maps `[K, B, in]` to `[K, B, out]`, task k's samples in row k. A task-owned
module (`TaskOwned`) keeps its parameters with a leading task dimension K; inside the per-task
`torch.func.vmap` of mtrl/jacobian.py each task sees its own slice and the same code runs. Those
parameters get their own task's gradient; every other parameter is shared and goes through the
combiner. A "linear map of the one-hot" is exactly such a row (`TaskEmbedding`), so the task
conditioning of FiLM, CARE, MOORE, PaCo and Soft Modularization is a task-owned parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mtrl.combiners.base import HyperParameters


class TaskOwned(nn.Module):
    """A module whose own parameters have a leading task dimension K: each belongs to one task per row."""


class TaskLinear(TaskOwned):
    """One linear map per task: `y[k] = x[k] @ weight[k] + bias[k]`."""

    def __init__(self, num_tasks: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per task
        self.weight = nn.Parameter(torch.empty(num_tasks, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias.unsqueeze(-2)


class TaskEmbedding(TaskOwned):
    """A learned vector per task, `weight[k]`: the bias-free linear map of task k's one-hot.

    `forward()` returns it as `[K, 1, dim]` (inside the per-task vmap `[1, dim]`), which broadcasts
    over the batch. Initialised like `nn.Linear(num_tasks, dim)` on a one-hot input.
    """

    def __init__(self, num_tasks: int, dim: int):
        super().__init__()
        bound = 1.0 / math.sqrt(num_tasks)
        self.weight = nn.Parameter(torch.empty(num_tasks, dim).uniform_(-bound, bound))

    def forward(self) -> torch.Tensor:
        return self.weight.unsqueeze(-2)


class ExpertLinear(nn.Module):
    """E independent linear maps side by side, expert axis before the batch: `[..., B, in]` (one input
    for all, `shared_input`) or `[..., E, B, in]` (expert e reads row e) to `[..., E, B, out]`.

    Expert-major, one broadcast product `[..., E, B, in] @ [E, in, out]`: of the forms measured (this,
    one product per expert, an einsum; docs/architectures.md#cost) it gives the cheapest per-task Jacobian."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, shared_input: bool):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per expert
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features).uniform_(-bound, bound))
        self.shared_input = shared_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input:
            x = x.unsqueeze(-3)
        return x @ self.weight + self.bias.unsqueeze(-2)


def expert_mlp(num_experts: int, in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    """E MLPs on one input (ReLU between layers, none after the last): `[..., B, in]` to `[..., E, B, out]`."""
    layers: list[nn.Module] = []
    for width in [*hidden, out_dim]:
        layers += [ExpertLinear(num_experts, in_dim, width, shared_input=not layers), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers[:-1])


def per_expert(weights: torch.Tensor) -> torch.Tensor:
    """Weights `[..., 1, E]` (one per task, as `TaskEmbedding` gives them) as `[..., E, 1, 1]`, to scale
    expert-major outputs `[..., E, B, d]`."""
    return weights.transpose(-1, -2).unsqueeze(-1)


def mlp(in_dim: int, hidden: list[int], out_dim: int | None = None) -> nn.Sequential:
    """Linear + ReLU per hidden width, then a plain linear layer to `out_dim` if given."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    if out_dim is not None:
        layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class NetworkShape:
    """Where a network's input comes from and what it returns.

    The input `[K, B, in_dim]` holds task k's one-hot at `one_hot_at : one_hot_at + num_tasks`
    (the observation ends with it; the critic appends the action). Task-aware architectures drop it.
    """

    in_dim: int
    out_dim: int
    num_tasks: int
    one_hot_at: int

    @property
    def state_dim(self) -> int:
        """Input width without the one-hot."""
        return self.in_dim - self.num_tasks

    def without_one_hot(self, x: torch.Tensor) -> torch.Tensor:
        end = self.one_hot_at + self.num_tasks
        if end == self.in_dim:
            return x[..., : self.one_hot_at]
        return torch.cat([x[..., : self.one_hot_at], x[..., end:]], dim=-1)


class Architecture(nn.Module):
    """A network `[K, B, in]` to `[K, B, out]`, built from its shape, the hidden widths and its own
    hyper-parameters (`Parameters`, declared like a combiner's)."""

    Parameters: ClassVar[type[HyperParameters]] = HyperParameters

    @classmethod
    def check_sizes(cls, parameters: HyperParameters, hidden_sizes: list[int]) -> None:
        """A ValueError if the hyper-parameters do not fit `agent.hidden_sizes`; nothing by default."""


def task_parameter_names(module: nn.Module) -> set[str]:
    """Names (as in `named_parameters`) of the parameters that belong to one task each."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        if isinstance(sub, TaskOwned)
        for name, _ in sub.named_parameters(recurse=False)
    }
