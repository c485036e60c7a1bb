"""One shared MLP on the observation with the task's one-hot appended (the MT-SAC baseline)."""

from __future__ import annotations

import torch
from torch import nn

from mtrl.combiners.base import HyperParameters
from mtrl.networks.base import Architecture, NetworkShape, mlp


class Conditioned(Architecture):
    """`head(trunk(x))`, every parameter shared; the task is known only through the one-hot in `x`."""

    def __init__(self, shape: NetworkShape, hidden_sizes: list[int], parameters: HyperParameters):
        super().__init__()
        self.trunk = mlp(shape.in_dim, hidden_sizes)
        self.head = nn.Linear(hidden_sizes[-1], shape.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
