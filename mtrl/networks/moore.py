"""MOORE, mixture of orthogonal experts (Hendawy, Peters & D'Eramo, ICLR 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtrl.combiners.base import HyperParameters, check_number, hyper_parameter
from mtrl.networks.base import Architecture, NetworkShape, TaskEmbedding, TaskLinear, expert_mlp, per_expert

# Each vector is divided by max(‖v‖, eps): no division by zero for a dependent expert, and an exact unit
# norm otherwise (the authors divide by ‖v‖ + 1e-8, which leaves norms 1e-8/‖v‖ short of one).
GRAM_SCHMIDT_EPS = 1e-8


@dataclass(frozen=True)
class MOOREParameters(HyperParameters):
    num_experts: int = hyper_parameter(4, "number of experts (MT10: 4, MT50: 6); at most the last hidden width")

    def __post_init__(self) -> None:
        self._store("num_experts", check_number("num_experts", self.num_experts, low=1, integer=True))


def gram_schmidt(u: torch.Tensor, eps: float = GRAM_SCHMIDT_EPS) -> torch.Tensor:
    """Classic Gram–Schmidt of each sample's expert vectors, `u` `[..., E, B, d]` (paper Eq. 4): expert
    0 normalised, each next expert minus its projections on the basis so far, then normalised."""
    basis: list[torch.Tensor] = []
    for e in range(u.shape[-3]):
        v = u[..., e, :, :]
        for b in basis:
            v = v - (v * b).sum(-1, keepdim=True) * b
        basis.append(v / v.norm(dim=-1, keepdim=True).clamp_min(eps))
    return torch.stack(basis, dim=-3)


class MOORE(Architecture):
    """E shared expert MLPs on the state, orthonormalised per sample; task k mixes them with its own
    weights w_k (a task-owned row, the bias-free linear map of the one-hot): `tanh(Σ_e w_ke u_e)`
    (paper Eq. 5), then task k's own output head (multi-head, as in the paper's MTSAC)."""

    Parameters = MOOREParameters

    def __init__(self, shape: NetworkShape, hidden_sizes: list[int], parameters: MOOREParameters):
        super().__init__()
        self.shape = shape
        self.experts = expert_mlp(parameters.num_experts, shape.state_dim, hidden_sizes[:-1], hidden_sizes[-1])
        self.task_weights = TaskEmbedding(shape.num_tasks, parameters.num_experts)
        self.head = TaskLinear(shape.num_tasks, hidden_sizes[-1], shape.out_dim)

    @classmethod
    def check_sizes(cls, parameters: MOOREParameters, hidden_sizes: list[int]) -> None:
        if parameters.num_experts > hidden_sizes[-1]:
            raise ValueError(
                f"`num_experts` ({parameters.num_experts}) must be at most the last hidden width "
                f"({hidden_sizes[-1]}): orthonormal experts need that many dimensions"
            )

    def orthonormal_experts(self, x: torch.Tensor) -> torch.Tensor:
        """The experts' representations of each sample after Gram–Schmidt, `[K, E, B, d]`."""
        return gram_schmidt(self.experts(self.shape.without_one_hot(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        basis = self.orthonormal_experts(x)
        features = torch.tanh((per_expert(self.task_weights()) * basis).sum(-3))
        return self.head(features)
