"""Per-task gradients of one network in one batched pass, and writing an update into `.grad`.

A `TaskObjective` describes task k's loss as a pure function of the parameters and task k's
slice of the `[K, B, ...]` batch. Two ways to differentiate it:

- `mean_backward`: one ordinary backward of the summed losses (what `mean` needs: no Jacobian);
- `weighted_backward`: the same with task weights computed from the losses of that forward (what
  a loss-weighting method such as FAMO needs: no Jacobian either);
- `task_jacobian`: `vmap(grad(loss))` over the task dimension. Each task's forward and backward
  runs on its own B samples, so the whole K x n matrix costs about one mean-loss backward,
  instead of K backward passes with `retain_graph` as in the published code. The update writes
  the matrix into a `JacobianBuffer` it keeps from one update to the next, not into memory
  allocated afresh every time (see the class).

Shared parameters receive the combined update; task-specific parameters (multi-head layers,
per-task temperatures; leading dimension K) receive their own task's gradient unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

Params = dict[str, torch.Tensor]
# loss_fn(shared, task, inputs, consts) -> (scalar loss of one task, aux)
LossFn = Callable[[Params, Params, tuple, tuple], tuple[torch.Tensor, Any]]


@dataclass
class TaskObjective:
    loss_fn: LossFn
    shared: dict[str, torch.nn.Parameter]
    task: dict[str, torch.nn.Parameter]
    inputs: tuple[Any, ...]  # tensors (or dicts of tensors) with leading dimension K
    consts: tuple[Any, ...] = field(default_factory=tuple)  # identical for every task

    @property
    def num_tasks(self) -> int:
        return self.inputs[0].shape[0]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.shared.values(), *self.task.values()]


_IN_DIMS = (None, 0, 0, None)


def mean_backward(objective: TaskObjective) -> tuple[torch.Tensor, Any]:
    """`.grad` of shared parameters = grad of mean_k L_k; task-specific ones get grad of their own L_k.

    One backward of `sum_k L_k` gives every task-specific slice its own task's gradient; the
    shared gradients are then divided by K, which is exactly `loss.mean().backward()` for them.
    Eagerly this is one `torch.autograd.grad`; inside `torch.compile` (which does not trace
    `autograd.grad`) the same gradient comes from `torch.func.grad`, like the Jacobian's.
    """
    losses, aux, _ = weighted_backward(objective, lambda losses: None)
    return losses, aux


def weighted_backward(
    objective: TaskObjective, weigh: Callable[[torch.Tensor], torch.Tensor | None]
) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """`.grad` of shared parameters = Σ_k w_k ∇L_k with w = weigh(losses); task-specific ones get grad of their own L_k.

    One forward, then `weigh` on its detached losses, then one backward of Σ_k w_k L_k. That backward
    gives task k's slices w_k ∇L_k, so they are divided by w_k (the weights must be non-zero), to
    receive what every combiner gives them. `weigh` returning None means the plain mean
    (`mean_backward`). Returns the losses, the aux values and the weights (None for the mean).
    """
    if torch.compiler.is_compiling():
        losses, aux = mean_backward_functional(objective)
        if weigh(losses) is not None:
            raise RuntimeError("loss weights are not supported inside torch.compile; use train.compile=none")
        return losses, aux, None
    o = objective
    losses, aux = vmap(o.loss_fn, in_dims=_IN_DIMS)(dict(o.shared), dict(o.task), o.inputs, o.consts)
    weights = weigh(losses.detach())
    params = o.parameters()
    if weights is None:  # the plain mean: one backward of the sum, the shared gradients divided by K
        grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
    else:
        weights = weights.to(losses.dtype)
        grads = torch.autograd.grad(losses, params, grad_outputs=weights, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.zeros_like(p) if g is None else g
    if weights is None:
        for p in o.shared.values():
            p.grad.div_(o.num_tasks)
    else:
        for p in o.task.values():
            p.grad.div_(weights.view(-1, *[1] * (p.ndim - 1)))
    return losses.detach(), aux, weights


@torch.no_grad()
def task_losses(objective: TaskObjective) -> torch.Tensor:
    """The K per-task losses at the parameters' current values, on the objective's inputs (no gradient)."""
    o = objective
    shared = {name: p.detach() for name, p in o.shared.items()}
    task = {name: p.detach() for name, p in o.task.items()}
    return vmap(o.loss_fn, in_dims=_IN_DIMS)(shared, task, o.inputs, o.consts)[0]


def mean_backward_functional(objective: TaskObjective) -> tuple[torch.Tensor, Any]:
    """`mean_backward` through `torch.func.grad`, which torch.compile traces (the same `.grad`)."""
    o = objective

    def summed_loss(shared: Params, task: Params):
        losses, aux = vmap(o.loss_fn, in_dims=_IN_DIMS)(shared, task, o.inputs, o.consts)
        return losses.sum(), (losses.detach(), aux)

    shared = {name: p.detach() for name, p in o.shared.items()}
    task = {name: p.detach() for name, p in o.task.items()}
    (g_shared, g_task), (losses, aux) = grad(summed_loss, argnums=(0, 1), has_aux=True)(shared, task)
    for name, p in o.shared.items():
        p.grad = g_shared[name].div_(o.num_tasks)
    for name, p in o.task.items():
        p.grad = g_task[name]
    return losses, aux


@dataclass
class TaskGradients:
    matrix: torch.Tensor | None  # [k, n] gradients of the shared parameters, one row per task
    task: Params  # task-specific gradients, leading dimension k
    losses: torch.Tensor  # [k]
    aux: Any


class JacobianBuffer:
    """The storage one network's K x n gradient matrix is written into, kept from update to update.

    The matrix is K times the size of the network's shared parameters, and it is written whole
    every update. Freshly allocated, memory that large comes from the operating system page by
    page each time (glibc gives every allocation above 32 MiB its own mapping, unmapped when
    freed), and on a CPU those page faults cost more than writing the numbers (measured in
    docs/architectures.md#cost). Kept, it is allocated once. A matrix taken from the buffer is
    valid until the buffer's next use: the update reads it before its next update.
    """

    def __init__(self) -> None:
        self._storage: torch.Tensor | None = None

    def rows(self, k: int, n: int, like: torch.Tensor) -> torch.Tensor:
        """A `[k, n]` tensor with `like`'s dtype and device, in the kept storage (grown when needed)."""
        s = self._storage
        if s is None or s.shape[0] < k or s.shape[1] != n or s.dtype != like.dtype or s.device != like.device:
            s = self._storage = like.new_empty((k, n))
        return s[:k]


def task_jacobian(
    objective: TaskObjective, tasks: torch.Tensor | None = None, out: JacobianBuffer | None = None
) -> TaskGradients:
    """Per-task gradients of every parameter in one vmapped pass; only `tasks` rows if given.

    The matrix is written into `out` if given (not inside torch.compile, which plans its own memory)."""
    o = objective

    def select(x: torch.Tensor) -> torch.Tensor:
        return x if tasks is None else x.index_select(0, tasks)

    shared = {name: p.detach() for name, p in o.shared.items()}
    task = {name: select(p.detach()) for name, p in o.task.items()}
    inputs = tree_map(select, o.inputs)

    def loss_with_aux(shared: Params, task: Params, inputs: tuple, consts: tuple):
        loss, aux = o.loss_fn(shared, task, inputs, consts)
        return loss, (loss.detach(), aux)

    per_task_grad = grad(loss_with_aux, argnums=(0, 1), has_aux=True)
    (g_shared, g_task), (losses, aux) = vmap(per_task_grad, in_dims=_IN_DIMS)(shared, task, inputs, o.consts)
    k = inputs[0].shape[0]
    blocks = [g.reshape(k, -1) for g in g_shared.values()]
    if not blocks:
        matrix = None
    elif out is None or torch.compiler.is_compiling():
        matrix = torch.cat(blocks, dim=1)
    else:
        matrix = torch.cat(blocks, dim=1, out=out.rows(k, sum(b.shape[1] for b in blocks), blocks[0]))
    return TaskGradients(matrix, g_task, losses, aux)


def write_shared_grad(params: dict[str, torch.nn.Parameter], update: torch.Tensor) -> None:
    """Split the flat update `d` back into the shared parameters' `.grad`."""
    offset = 0
    for p in params.values():
        n = p.numel()
        p.grad = update[offset : offset + n].view_as(p).clone()
        offset += n
    if offset != update.numel():
        raise ValueError(f"update has {update.numel()} entries, the shared parameters {offset}")


def write_task_grads(params: dict[str, torch.nn.Parameter], grads: Params, tasks: torch.Tensor | None) -> None:
    """Each task's slice gets its own gradient; tasks that were not drawn get zero."""
    for name, p in params.items():
        if tasks is None:
            p.grad = grads[name].clone()
        else:
            p.grad = torch.zeros_like(p).index_copy_(0, tasks, grads[name])


def flat_numel(params: dict[str, torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())
