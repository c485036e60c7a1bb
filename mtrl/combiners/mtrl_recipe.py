"""The authors' Meta-World solver for the CAGrad and SDMGrad duals (`solver="mtrl"`), step for step.

Both papers' Meta-World code replaces an exact solve by 20 steps of SGD with momentum on the
K×K problem, scaled as below, keeping the best of 21 evaluations (docs/combiners.md#solvers,
#cagrad and #sdmgrad). Gradients are closed form; nothing leaves the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

EVALUATIONS = 21
"""Objective evaluations; an SGD step follows each of the first 20."""

MOMENTUM = 0.5

EPSILON = 1e-4
"""The recipe's additive constant inside every square root (and after λ's)."""


def learning_rate(num_tasks: int) -> float:
    """The recipe's SGD learning rate: 50 at K = 50, else 25."""
    return 50.0 if num_tasks == 50 else 25.0


@dataclass(frozen=True)
class ScaledGramian:
    """Step 1: s = mean_i sqrt(A_ii + 1e-4), Â = A/s², b = Â.mean(axis=1), gg = b.mean()."""

    matrix: Tensor
    row_means: Tensor
    mean: Tensor

    @classmethod
    def of(cls, gramian: Tensor) -> ScaledGramian:
        scale = (gramian.diagonal() + EPSILON).sqrt().mean()
        matrix = gramian / scale**2
        row_means = matrix.mean(1)
        return cls(matrix, row_means, row_means.mean())


def best_of_momentum_sgd(
    start: Tensor,
    objective: Callable[[Tensor], tuple[Tensor, Tensor]],
    lr: float,
    project: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The iterate with the lowest objective among 21 evaluations of SGD with momentum.

    `objective(x)` returns (value, gradient). Each value is compared with the best so far before the
    step (strictly: ties keep the earlier iterate, like the authors' `obj.item() < obj_best`). Steps
    follow torch.optim.SGD: v ← momentum·v + grad, x ← x − lr·v; `project` is then applied to x.
    """
    x, velocity = start, torch.zeros_like(start)
    best, best_value = start, torch.full((), torch.inf, dtype=start.dtype, device=start.device)
    for evaluation in range(EVALUATIONS):
        value, gradient = objective(x)
        better = value < best_value
        best, best_value = torch.where(better, x, best), torch.where(better, value, best_value)
        if evaluation < EVALUATIONS - 1:
            velocity = MOMENTUM * velocity + gradient
            x = x - lr * velocity
            if project is not None:
                x = project(x)
    return best
