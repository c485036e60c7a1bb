"""A shared trunk on observation + one-hot, and one linear output head per task."""

from __future__ import annotations

import torch

from mtrl.combiners.base import HyperParameters
from mtrl.networks.base import Architecture, NetworkShape, TaskLinear, mlp


class MultiHead(Architecture):
    """`head_k(trunk(x))` for task k's samples: the heads are task-owned, the trunk is shared."""

    def __init__(self, shape: NetworkShape, hidden_sizes: list[int], parameters: HyperParameters):
        super().__init__()
        self.trunk = mlp(shape.in_dim, hidden_sizes)
        self.head = TaskLinear(shape.num_tasks, hidden_sizes[-1], shape.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
