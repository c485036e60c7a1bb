"""FiLM, feature-wise linear modulation (Perez, Strub, de Vries, Dumoulin & Courville, AAAI 2018)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtrl.combiners.base import HyperParameters, check_number, hyper_parameter
from mtrl.networks.base import Architecture, NetworkShape, TaskEmbedding, mlp


@dataclass(frozen=True)
class FiLMParameters(HyperParameters):
    encoder_width: int = hyper_parameter(50, "width of the observation encoder and of the FiLM generator's layers")
    encoder_depth: int = hyper_parameter(2, "modulated hidden layers of the observation encoder")
    embedding_dim: int = hyper_parameter(50, "size of the task embedding and of the encoder's output")

    def __post_init__(self) -> None:
        for name in ("encoder_width", "encoder_depth", "embedding_dim"):
            self._store(name, check_number(name, getattr(self, name), low=1, integer=True))


class FiLM(Architecture):
    """A state encoder whose layers are modulated per task, `γ_k ⊙ h + β_k` (paper Eq. 1), then an MLP.

    Task k's embedding e_k is a task-owned row; a shared generator MLP(ReLU(e_k)) gives one scalar
    (γ, β) per encoder layer, as in the reference code and facebookresearch/mtrl (the paper
    modulates every feature separately). Encoder: (Linear → ReLU → γh+β) × depth, then Linear → γh+β.
    The torso reads [encoder output, ReLU(e_k)]."""

    Parameters = FiLMParameters

    def __init__(self, shape: NetworkShape, hidden_sizes: list[int], parameters: FiLMParameters):
        super().__init__()
        p = parameters
        self.shape = shape
        self.task_embedding = TaskEmbedding(shape.num_tasks, p.embedding_dim)
        depth = p.encoder_depth
        self.generator = mlp(p.embedding_dim, [p.encoder_width] * depth, 2 * (depth + 1))
        widths = [shape.state_dim, *[p.encoder_width] * depth, p.embedding_dim]
        self.encoder = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:], strict=True))
        self.torso = mlp(2 * p.embedding_dim, hidden_sizes, shape.out_dim)

    def modulation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β) of every encoder layer for every task, each `[K, 1, depth + 1]` (in the vmap `[1, depth + 1]`)."""
        gamma, beta = self.generator(torch.relu(self.task_embedding())).unflatten(-1, (-1, 2)).unbind(-1)
        return gamma, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation()
        h = self.shape.without_one_hot(x)
        for i, layer in enumerate(self.encoder):
            h = layer(h)
            if i < len(self.encoder) - 1:
                h = torch.relu(h)
            h = gamma[..., i : i + 1] * h + beta[..., i : i + 1]
        context = torch.relu(self.task_embedding()).expand(*h.shape[:-1], -1)
        return self.torso(torch.cat([h, context], dim=-1))
