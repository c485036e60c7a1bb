"""Actor and twin critics, task-conditioned or multi-head.

Every module maps `[..., in]` to `[..., out]`. A multi-head layer keeps one weight matrix per
task (`[K, in, out]`) and expects a leading task dimension `[K, B, in]`; inside a per-task
`torch.func.vmap` it sees one task's slice (`[in, out]` with `[B, in]`), and the same code runs.
Parameters of multi-head layers are task-specific: they get their own task's gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2 = math.log(2.0)


class TaskLinear(nn.Module):
    """One linear map per task: `y[k] = x[k] @ weight[k] + bias[k]`."""

    def __init__(self, num_tasks: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per task
        self.weight = nn.Parameter(torch.empty(num_tasks, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias.unsqueeze(-2)


def mlp(in_dim: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers)


def _head(num_tasks: int, in_dim: int, out_dim: int, multihead: bool) -> nn.Module:
    return TaskLinear(num_tasks, in_dim, out_dim) if multihead else nn.Linear(in_dim, out_dim)


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], num_tasks: int, multihead: bool):
        super().__init__()
        self.trunk = mlp(obs_dim + act_dim, hidden)
        self.head = _head(num_tasks, hidden[-1], 1, multihead)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(torch.cat([obs, action], dim=-1))).squeeze(-1)


class TwinCritic(nn.Module):
    """Two independent Q-networks; `forward` returns both estimates."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int], num_tasks: int, multihead: bool):
        super().__init__()
        self.q1 = QNetwork(obs_dim, act_dim, hidden, num_tasks, multihead)
        self.q2 = QNetwork(obs_dim, act_dim, hidden, num_tasks, multihead)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q1(obs, action), self.q2(obs, action)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy (Haarnoja et al. 2018, appendix C)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: list[int],
        num_tasks: int,
        multihead: bool,
        log_std_min: float,
        log_std_max: float,
    ):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden)
        self.head = _head(num_tasks, hidden[-1], 2 * act_dim, multihead)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.head(self.trunk(obs)).chunk(2, dim=-1)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)

    def sample(self, obs: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squashed_sample(*self(obs), noise)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(obs)[0])


def squashed_sample(
    mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised action `tanh(mean + std * noise)` and its log-probability."""
    pre_tanh = mean + log_std.exp() * noise
    gaussian_logp = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|.
    squash = (2.0 * (LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(-1)
    return torch.tanh(pre_tanh), gaussian_logp - squash


def task_parameter_names(module: nn.Module) -> set[str]:
    """Names (as in `named_parameters`) of the parameters that belong to one task each."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules()
        if isinstance(sub, TaskLinear)
        for name, _ in sub.named_parameters(recurse=False)
    }
