"""PaCo, parameter-compositional multi-task networks (Sun, Zhang, Xu & Tomizuka, NeurIPS 2022)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtrl.combiners.base import HyperParameters, check_number, hyper_parameter
from mtrl.networks.base import Architecture, NetworkShape, TaskEmbedding


@dataclass(frozen=True)
class PaCoParameters(HyperParameters):
    num_parameter_sets: int = hyper_parameter(5, "number S of shared parameter sets (MT10: 5, MT50: 20)")

    def __post_init__(self) -> None:
        self._store(
            "num_parameter_sets", check_number("num_parameter_sets", self.num_parameter_sets, low=1, integer=True)
        )


class CompositionalLinear(nn.Module):
    """S full copies φ_1..φ_S of one linear layer; `forward(x, w)` uses the layer θ = Σ_s w_s φ_s."""

    def __init__(self, num_sets: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per set
        self.weight = nn.Parameter(torch.empty(num_sets, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_sets, out_features).uniform_(-bound, bound))

    def compose(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight `[..., in, out]` and bias `[..., out]` of the layer for the compositional vector `w` `[..., S]`."""
        return torch.einsum("...s,sio->...io", w, self.weight), w @ self.bias

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        weight, bias = self.compose(w)
        return x @ weight + bias.unsqueeze(-2)


class PaCo(Architecture):
    """Task k's network has parameters θ_k = Φ w_k (paper Eq. 2): the S parameter sets Φ are shared,
    w_k = (task-owned row k) + (shared offset), the linear map of the one-hot with a bias as in the
    reference code. The layers are affine, so composing the weights equals mixing the S layer
    outputs; composing costs S·in·out per task instead of per sample."""

    Parameters = PaCoParameters

    def __init__(self, shape: NetworkShape, hidden_sizes: list[int], parameters: PaCoParameters):
        super().__init__()
        sets = parameters.num_parameter_sets
        self.shape = shape
        self.task_vector = TaskEmbedding(shape.num_tasks, sets)
        self.task_vector_offset = nn.Parameter(torch.zeros(sets))
        widths = [shape.state_dim, *hidden_sizes, shape.out_dim]
        self.layers = nn.ModuleList(
            CompositionalLinear(sets, i, o) for i, o in zip(widths[:-1], widths[1:], strict=True)
        )

    def compositional_vector(self) -> torch.Tensor:
        """w_k of every task, `[K, S]` (inside the per-task vmap: `[S]`)."""
        return self.task_vector().squeeze(-2) + self.task_vector_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.compositional_vector()
        x = self.shape.without_one_hot(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, w)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x
