"""CARE, contextual attention-based representations (Sodhani, Zhang & Pineau, ICML 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtrl.combiners.base import HyperParameters, check_number, hyper_parameter
from mtrl.networks.base import Architecture, NetworkShape, TaskEmbedding, expert_mlp, mlp, per_expert


@dataclass(frozen=True)
class CAREParameters(HyperParameters):
    num_experts: int = hyper_parameter(6, "number of state encoders the context attends over (MT10: 6, MT50: 10)")
    encoder_width: int = hyper_parameter(50, "hidden width of the encoders, the context MLP and the attention MLP")
    encoder_depth: int = hyper_parameter(2, "hidden layers of the encoders, the context MLP and the attention MLP")
    embedding_dim: int = hyper_parameter(50, "size of the context and of each encoder's output")
    temperature: float = hyper_parameter(1.0, "softmax temperature of the attention over encoders; > 0")
    context_file: str = hyper_parameter(
        "",
        "task embeddings K x D (.npy or .pt, one row per task in the benchmark's task order), e.g. a sentence "
        "encoder's embedding of each task description, kept fixed; empty: a learned embedding per task",
    )

    def __post_init__(self) -> None:
        for name in ("num_experts", "encoder_width", "encoder_depth", "embedding_dim"):
            self._store(name, check_number(name, getattr(self, name), low=1, integer=True))
        self._store("temperature", check_number("temperature", self.temperature, low=0.0, low_open=True))
        if self.context_file:
            read_context_file(self.context_file)


def read_context_file(path: str) -> torch.Tensor:
    """The K×D float32 matrix in `path` (.npy or .pt); a ValueError naming the file otherwise."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"`context_file` not found: {path}")
    try:
        if file.suffix == ".npy":
            matrix = torch.from_numpy(np.load(file, allow_pickle=False))
        elif file.suffix == ".pt":
            matrix = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"`context_file` must be a .npy or .pt file, found {path}")
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        if str(err).startswith("`context_file`"):
            raise
        raise ValueError(f"`context_file` {path} cannot be read: {str(err).splitlines()[0]}") from None
    if not torch.is_tensor(matrix) or matrix.ndim != 2 or not matrix.is_floating_point():
        raise ValueError(f"`context_file` {path} must hold a 2-d float matrix (tasks x dims)")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"`context_file` {path} holds non-finite values")
    return matrix.float()


class FixedTaskEmbedding(TaskEmbedding):
    """Given task embeddings, never trained: a task-owned row (so each task sees its own) read detached."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__(*matrix.shape)
        with torch.no_grad():
            self.weight.copy_(matrix)

    def forward(self) -> torch.Tensor:
        return super().forward().detach()


class CARE(Architecture):
    """E shared state encoders mixed by attention on a task context (paper Eqs. 1-3).

    Context c_k = MLP(ReLU(e_k)), attention α_k = softmax(MLP(c_k) / temperature); the state's
    representation is Σ_j α_kj enc_j(s); the torso reads [Σ_j α_kj enc_j(s), c_k]. e_k is task k's
    embedding: read from `context_file` (the paper's form: a pretrained sentence encoder's
    embedding of the task description, kept fixed), or by default a learned per-task row, as in
    the reference code (no language model, and so no prior on which tasks are alike)."""

    Parameters = CAREParameters

    def __init__(self, shape: NetworkShape, hidden_sizes: list[int], parameters: CAREParameters):
        super().__init__()
        p = parameters
        self.shape, self.temperature = shape, p.temperature
        if p.context_file:
            matrix = read_context_file(p.context_file)
            if matrix.shape[0] != shape.num_tasks:
                raise ValueError(
                    f"`context_file` {p.context_file} has {matrix.shape[0]} rows; one per task needed: "
                    f"{shape.num_tasks}"
                )
            self.task_embedding: TaskEmbedding = FixedTaskEmbedding(matrix)
        else:
            self.task_embedding = TaskEmbedding(shape.num_tasks, p.embedding_dim)
        hidden = [p.encoder_width] * p.encoder_depth
        self.context = mlp(self.task_embedding.weight.shape[1], hidden, p.embedding_dim)
        self.attention = mlp(p.embedding_dim, hidden, p.num_experts)
        self.encoders = expert_mlp(p.num_experts, shape.state_dim, hidden, p.embedding_dim)
        self.torso = mlp(2 * p.embedding_dim, hidden_sizes, shape.out_dim)

    def task_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, α) of every task: `[K, 1, D]` and `[K, 1, E]` (in the per-task vmap `[1, D]`, `[1, E]`)."""
        context = self.context(torch.relu(self.task_embedding()))
        return context, torch.softmax(self.attention(context) / self.temperature, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context, attention = self.task_context()
        encoded = self.encoders(self.shape.without_one_hot(x))  # [K, E, B, D]
        mixture = (per_expert(attention) * encoded).sum(-3)
        return self.torso(torch.cat([mixture, context.expand(*mixture.shape[:-1], -1)], dim=-1))
