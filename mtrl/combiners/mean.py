"""Plain averaging, the MT-SAC baseline: d = g0 = (1/K) Σ_i g_i."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl.combiners.base import Combiner, TaskLosses, check_matrix


class Mean(Combiner):
    """d = (1/K) Σ_i g_i. The trainer needs no per-task gradients for it: one backward of mean_i L_i."""

    needs_jacobian = False

    def __call__(
        self,
        matrix: Tensor,
        generator: torch.Generator | None = None,
        draws: Tensor | None = None,
        losses: TaskLosses | None = None,
    ) -> Tensor:
        check_matrix(matrix)
        self.last_weights = matrix.new_full((matrix.shape[0],), 1.0 / matrix.shape[0])
        return matrix.mean(0)

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        return gramian.new_full((gramian.shape[0],), 1.0 / gramian.shape[0])
