"""AdaTask (Yang et al., AAAI 2023): task-wise Adam on the shared parameters.

Task k keeps its own moments of its own gradient, and the step sums the tasks' adaptive steps
(docs/combiners.md#adatask):
    m_k <- b1 m_k + (1 - b1) g_k,   v_k <- b2 v_k + (1 - b2) g_k^2
    theta <- theta - lr * sum_k m_hat_k / (sqrt(v_hat_k) + eps)
It consumes the same per-task gradient matrix as the combiners, via `step_tasks(G)`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class AdaTask(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        num_tasks: int,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if num_tasks < 1:
            raise ValueError(f"`num_tasks` must be >= 1, found {num_tasks}")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, found {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"`betas` must be in [0, 1), found {betas}")
        if not eps > 0:
            raise ValueError(f"`eps` must be > 0, found {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, num_tasks=num_tasks))

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step_tasks(self, task_grads: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """One step from `task_grads` [K, n]: row k is task k's gradient of all params, flattened in order.

        With `where` (a 0-d bool tensor), the step is taken only where it holds: the parameters, the
        moments and the step count are written through `torch.where`, so nothing reads the flag on the
        host (the compiled update's path; state made first by `prepare_state`).
        """
        params = self._params()
        n = sum(p.numel() for p in params)
        k = self.defaults["num_tasks"]
        if task_grads.shape != (k, n):
            raise ValueError(f"task_grads must have shape ({k}, {n}), found {tuple(task_grads.shape)}")
        offset = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = task_grads[:, offset : offset + p.numel()].reshape(k, *p.shape).to(p.dtype)
                offset += p.numel()
                state = self.state[p]
                if not state:
                    self._new_state(p, state)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                new_m = m.lerp(grad, 1 - beta1)
                new_v = v.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                if where is None:
                    state["step"] += 1
                    t = state["step"].item()
                else:
                    state["step"].add_(where.to(state["step"].dtype))
                    t = state["step"]
                m_hat = new_m / (1 - beta1**t)
                v_hat = new_v / (1 - beta2**t)
                new_p = p - group["lr"] * (m_hat / (v_hat.sqrt() + group["eps"])).sum(0)
                if where is None:
                    m.copy_(new_m), v.copy_(new_v), p.copy_(new_p)
                else:
                    m.copy_(torch.where(where, new_m, m))
                    v.copy_(torch.where(where, new_v, v))
                    p.copy_(torch.where(where, new_p, p))

    def prepare_state(self) -> None:
        """Create the state of every parameter now, the step count on the parameter's device (see `step_tasks`)."""
        for p in self._params():
            state = self.state[p]
            if not state:
                self._new_state(p, state)
            state["step"] = state["step"].to(p.device)

    def _new_state(self, p: torch.nn.Parameter, state: dict) -> None:
        """Zero moments on the parameter's device; the step count on the CPU, where an eager step reads it."""
        k = self.defaults["num_tasks"]
        state["step"] = torch.zeros((), dtype=torch.float64)
        state["exp_avg"] = torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device)

    def step(self, closure=None):
        raise RuntimeError("AdaTask needs the per-task gradients: call step_tasks(task_grads)")
