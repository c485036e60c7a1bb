"""Actor and twin critics over a pluggable architecture.

The registry `ARCHITECTURES` maps each `agent.architecture` name to its network class, one line
each. A network maps `[K, B, in]` to `[K, B, out]` and declares which of its parameters are
task-owned (`TaskOwned` modules, leading dimension K; mtrl/networks/base.py): those get their own
task's gradient, every other parameter is shared and goes through the combiner. Nothing else in
the code asks which architecture it is. The maths of each is in docs/architectures.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtrl.combiners.base import HyperParameters
from mtrl.networks.base import Architecture, NetworkShape, TaskLinear, TaskOwned, task_parameter_names
from mtrl.networks.care import CARE
from mtrl.networks.conditioned import Conditioned
from mtrl.networks.film import FiLM
from mtrl.networks.moore import MOORE
from mtrl.networks.multihead import MultiHead
from mtrl.networks.paco import PaCo
from mtrl.networks.soft_modules import SoftModules

__all__ = [
    "ARCHITECTURES",
    "Actor",
    "NetworkShape",
    "QNetwork",
    "TaskLinear",
    "TaskOwned",
    "TwinCritic",
    "architecture_class",
    "check_architecture",
    "check_architecture_parameter_names",
    "squashed_sample",
    "task_parameter_names",
]

ARCHITECTURES: dict[str, type[Architecture]] = {
    "conditioned": Conditioned,
    "multihead": MultiHead,
    "soft_modules": SoftModules,
    "film": FiLM,
    "care": CARE,
    "moore": MOORE,
    "paco": PaCo,
}

LOG_2 = math.log(2.0)


def architecture_class(name: str) -> type[Architecture]:
    """The class registered as `name`, or a ValueError listing the names."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def check_architecture_parameter_names(name: str, names: Iterable[str]) -> None:
    """A ValueError naming those of `names` that architecture `name` does not take, and the ones it does."""
    accepted = [f.name for f in dataclasses.fields(architecture_class(name).Parameters)]
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown key {', '.join(map(repr, unknown))} for architecture {name!r}; "
            f"its own keys: {', '.join(accepted) if accepted else 'none'}"
        )


def check_architecture(name: str, values: Mapping[str, Any], hidden_sizes: list[int]) -> HyperParameters:
    """The hyper-parameters of architecture `name` from `values` (defaults for the others), checked
    alone and against `hidden_sizes`. A ValueError names the key and the value; builds no network."""
    check_architecture_parameter_names(name, values)
    cls = architecture_class(name)
    parameters = cls.Parameters(**values)
    cls.check_sizes(parameters, hidden_sizes)
    return parameters


def make_network(
    architecture: str, shape: NetworkShape, hidden_sizes: list[int], hyper_parameters: Mapping[str, Any]
) -> Architecture:
    return architecture_class(architecture)(
        shape, hidden_sizes, check_architecture(architecture, hyper_parameters, hidden_sizes)
    )


def _rename_weights_saved_before_architectures(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Checkpoints saved before `agent.architecture` kept the (conditioned or multi-head) trunk and head
    directly under the actor and Q-networks; they now live under `net`."""
    for key in [k for k in state_dict if k.startswith((f"{prefix}trunk.", f"{prefix}head."))]:
        state_dict[f"{prefix}net.{key.removeprefix(prefix)}"] = state_dict.pop(key)


class QNetwork(nn.Module):
    """Q(s, a) of task k's samples: the architecture on [observation (ending with the one-hot), action]."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: list[int],
        num_tasks: int,
        architecture: str = "conditioned",
        hyper_parameters: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        shape = NetworkShape(obs_dim + act_dim, 1, num_tasks, one_hot_at=obs_dim - num_tasks)
        self.net = make_network(architecture, shape, hidden, hyper_parameters or {})
        self.register_load_state_dict_pre_hook(_rename_weights_saved_before_architectures)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1)).squeeze(-1)


class TwinCritic(nn.Module):
    """Two independent Q-networks; `forward` returns both estimates."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: list[int],
        num_tasks: int,
        architecture: str = "conditioned",
        hyper_parameters: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.q1 = QNetwork(obs_dim, act_dim, hidden, num_tasks, architecture, hyper_parameters)
        self.q2 = QNetwork(obs_dim, act_dim, hidden, num_tasks, architecture, hyper_parameters)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q1(obs, action), self.q2(obs, action)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy (Haarnoja et al. 2018, appendix C) over the architecture."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: list[int],
        num_tasks: int,
        log_std_min: float,
        log_std_max: float,
        architecture: str = "conditioned",
        hyper_parameters: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        shape = NetworkShape(obs_dim, 2 * act_dim, num_tasks, one_hot_at=obs_dim - num_tasks)
        self.net = make_network(architecture, shape, hidden, hyper_parameters or {})
        self.register_load_state_dict_pre_hook(_rename_weights_saved_before_architectures)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
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
