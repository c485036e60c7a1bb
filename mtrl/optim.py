"""Optimization of the agent's networks: optimizers, gradient clipping, and leaving undrawn tasks alone.

The update writes each network's `.grad` (shared parameters: the combined direction; task-specific
parameters, whose leading dimension is the task: each task's own gradient), then, once the whole
update is known to be finite, asks `Optimization` to clip and step that network. Every network has
one `NetworkOptimizer`:

- `AdamOptimizer`: Adam on all of the network's parameters;
- `AdaTaskOptimizer`: task-wise Adam (`mtrl.adatask.AdaTask`) on the shared parameters, Adam on the
  task-specific ones. It steps on the K×n matrix G of per-task gradients of the shared parameters,
  so the update must compute G for it: `takes_task_gradients` says so, and `step` receives G.

Task-specific parameters (leading dimension K: task k owns slice k) step with `task_adam_step`:
Adam with one step count per task row, so that a task that a sampling combiner draws only now and
then is bias-corrected by the number of steps its own slice took, as if it had its own Adam
(Kingma & Ba, 2015, Algorithm 1). Tasks that took no part in an update keep their slices, moments and
counts: a zero gradient would still move them through Adam's momentum (docs/mtsac.md, "How the
combiners plug in").

`step_where` is the same step decided on the device, for the compiled update (`train.compile`): it
takes the finiteness flag as a tensor and writes every parameter and moment through `torch.where`,
so a step that must not happen leaves them as they were without the host ever reading the flag.
Its Adam is the same arithmetic as `torch.optim.Adam`'s, on that optimizer's own state (equal to
float rounding: the bias corrections are tensors here, Python floats there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from mtrl.adatask import AdaTask

OPTIMIZERS = ("adam", "adatask")


class NetworkParameters(NamedTuple):
    """One network's parameters, split by who owns them."""

    shared: dict[str, nn.Parameter]  # every task's loss moves them
    task: dict[str, nn.Parameter]  # leading dimension K: slice k belongs to task k alone

    def all(self) -> list[nn.Parameter]:
        return [*self.shared.values(), *self.task.values()]


class NetworkOptimizer(ABC):
    """Steps one network from its `.grad` (and, if `takes_task_gradients`, the per-task matrix G)."""

    takes_task_gradients: ClassVar[bool] = False
    """Whether `step` needs G, the [K, n] per-task gradients of the shared parameters."""

    def __init__(self, params: NetworkParameters) -> None:
        self.params = params

    @property
    @abstractmethod
    def task_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer that holds the task-specific parameters (None: the network has none)."""

    @abstractmethod
    def _step(self, task_gradients: Tensor | None) -> None:
        """One optimizer step of the shared parameters from `.grad` (and G)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def step(self, task_gradients: Tensor | None, drawn: Tensor | None) -> None:
        """Step; the slices, moments and step counts of tasks not in `drawn` (indices; None: all took
        part) stay put."""
        self._step(task_gradients)
        if self.params.task:
            task_adam_step(self.task_optimizer, self.params.task, self._rows(None, drawn))

    def step_where(self, task_gradients: Tensor | None, drawn: Tensor | None, finite: Tensor) -> None:
        """`step`, taken only where `finite` (a 0-d bool tensor) holds, with no host synchronisation."""
        self._step_where(task_gradients, finite)
        if self.params.task:
            task_adam_step(self.task_optimizer, self.params.task, self._rows(finite, drawn))

    def _rows(self, finite: Tensor | None, drawn: Tensor | None) -> Tensor:
        """[K] bool: whether task k's slices step (`finite`: None for an update known to be finite)."""
        p = next(iter(self.params.task.values()))
        rows = torch.ones(p.shape[0], dtype=torch.bool, device=p.device) if drawn is None else _drawn_mask(p, drawn)
        return rows if finite is None else finite & rows

    @abstractmethod
    def _step_where(self, task_gradients: Tensor | None, finite: Tensor) -> None:
        """Step the shared parameters where `finite`."""

    @abstractmethod
    def prepare_state(self) -> None:
        """Make the optimizers' state now, for device steps (`Optimization.prepare_device_steps`)."""

    def _load_task_state(self) -> None:
        """Task-specific parameters' loaded step counts, one per row on the parameter's device (where
        the rows that step are decided). A checkpoint of an older version holds one count for the
        whole tensor: every row starts from it."""
        for p in self.params.task.values():
            state = self.task_optimizer.state.get(p)
            if state:
                step = state["step"].to(p.device)
                state["step"] = step.expand(p.shape[0]).clone() if step.dim() == 0 else step


class AdamOptimizer(NetworkOptimizer):
    def __init__(self, params: NetworkParameters, lr: float) -> None:
        super().__init__(params)
        self.adam = torch.optim.Adam(params.all(), lr=lr)

    @property
    def task_optimizer(self) -> torch.optim.Optimizer:
        return self.adam

    def _step(self, task_gradients: Tensor | None) -> None:
        with _hidden_gradients(self.params.task.values()):  # they step with `task_adam_step`
            self.adam.step()

    def _step_where(self, task_gradients: Tensor | None, finite: Tensor) -> None:
        adam_step_where(self.adam, self.params.shared.values(), finite)

    def prepare_state(self) -> None:
        _prepare_adam(self.adam, self.params)

    def state_dict(self) -> dict[str, Any]:
        return {"adam": self.adam.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_parts(state, ["adam"])
        self.adam.load_state_dict(state["adam"])
        self._load_task_state()


class AdaTaskOptimizer(NetworkOptimizer):
    """AdaTask on the shared parameters (it consumes G), Adam on the task-specific ones."""

    takes_task_gradients = True

    def __init__(self, params: NetworkParameters, lr: float, num_tasks: int) -> None:
        if not params.shared:
            raise ValueError("AdaTask needs shared parameters; a network without them steps with Adam")
        super().__init__(params)
        self.adatask = AdaTask(list(params.shared.values()), num_tasks, lr=lr)
        self.adam = torch.optim.Adam(list(params.task.values()), lr=lr) if params.task else None

    @property
    def task_optimizer(self) -> torch.optim.Optimizer | None:
        return self.adam

    def _step(self, task_gradients: Tensor | None) -> None:
        self.adatask.step_tasks(_required(task_gradients))

    def _step_where(self, task_gradients: Tensor | None, finite: Tensor) -> None:
        self.adatask.step_tasks(_required(task_gradients), where=finite)

    def prepare_state(self) -> None:
        self.adatask.prepare_state()
        if self.adam is not None:
            _prepare_adam(self.adam, self.params._replace(shared={}))

    def state_dict(self) -> dict[str, Any]:
        state = {"adatask": self.adatask.state_dict()}
        if self.adam is not None:
            state["adam"] = self.adam.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_parts(state, ["adatask", "adam"] if self.adam is not None else ["adatask"])
        self.adatask.load_state_dict(state["adatask"])
        if self.adam is not None:
            self.adam.load_state_dict(state["adam"])
            self._load_task_state()


class Optimization:
    """Every network's optimizer and the gradient-norm bound: what the update steps, and what a checkpoint holds.

    `optimizer` is "adam" or "adatask"; AdaTask takes the shared parameters of every network that
    has them, Adam the rest. `learning_rates` maps each network name to its learning rate.
    """

    def __init__(
        self,
        networks: Mapping[str, NetworkParameters],
        optimizer: str,
        learning_rates: Mapping[str, float],
        num_tasks: int,
        grad_clip_norm: float | None = None,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from: {', '.join(OPTIMIZERS)}")
        missing = sorted(set(networks) - set(learning_rates))
        if missing:
            raise ValueError(f"no learning rate for network(s) {missing}")
        self.grad_clip_norm = grad_clip_norm
        self._device_steps_ready = False
        self.networks: dict[str, NetworkOptimizer] = {}
        for name, params in networks.items():
            if optimizer == "adatask" and params.shared:
                self.networks[name] = AdaTaskOptimizer(params, learning_rates[name], num_tasks)
            else:
                self.networks[name] = AdamOptimizer(params, learning_rates[name])

    def __getitem__(self, network: str) -> NetworkOptimizer:
        return self.networks[network]

    def clip(self, network: str, task_gradients: Tensor | None) -> Tensor | None:
        """Clip `network`'s `.grad` to `grad_clip_norm` (all its parameters together), in place.

        A task-wise optimizer steps on the rows of G rather than on `.grad`: they are scaled by the
        same factor, the norm being measured on `.grad` (for shared parameters, the mean of the rows).
        Returns G as the optimizer is to step on it.
        """
        if self.grad_clip_norm is None:
            return task_gradients
        optimizer = self.networks[network]
        norm = torch.nn.utils.clip_grad_norm_(optimizer.params.all(), self.grad_clip_norm)
        if task_gradients is None or not optimizer.takes_task_gradients:
            return task_gradients
        return task_gradients * torch.clamp(self.grad_clip_norm / (norm + 1e-6), max=1.0)

    def step(self, network: str, task_gradients: Tensor | None = None, drawn: Tensor | None = None) -> None:
        """Step `network` from its (clipped) `.grad` and G; tasks not in `drawn` keep their slices."""
        self.networks[network].step(task_gradients, drawn)

    def step_where(self, network: str, task_gradients: Tensor | None, drawn: Tensor | None, finite: Tensor) -> None:
        """`step`, taken only where `finite` (a 0-d bool tensor on the device) holds."""
        self.networks[network].step_where(task_gradients, drawn, finite)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: optimizer.state_dict() for name, optimizer in self.networks.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        _check_parts(state, list(self.networks))
        for name, optimizer in self.networks.items():
            optimizer.load_state_dict(state[name])
        self._device_steps_ready = False  # loaded state may hold its step counts on the host

    def prepare_device_steps(self) -> bool:
        """Create every optimizer's state now, each tensor on its parameter's device, for `step_where`;
        whether it did (it does once, and again after `load_state_dict`).

        A compiled update must not create state lazily inside the graph, and a step count on the host
        would be read back at every step.
        """
        if self._device_steps_ready:
            return False
        for optimizer in self.networks.values():
            optimizer.prepare_state()
        self._device_steps_ready = True
        return True

    def state_tensors(self) -> list[Tensor]:
        """Every tensor of the optimizers' state (what a CUDA graph must treat as fixed memory)."""
        states = [state for optimizer in self.optimizers() for state in optimizer.state.values()]
        return [value for state in states for value in state.values() if torch.is_tensor(value)]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every `torch.optim.Optimizer` the networks step with."""
        out = []
        for optimizer in self.networks.values():
            if isinstance(optimizer, AdaTaskOptimizer):
                out.append(optimizer.adatask)
            if optimizer.task_optimizer is not None:
                out.append(optimizer.task_optimizer)
        return out


def _required(task_gradients: Tensor | None) -> Tensor:
    if task_gradients is None:
        raise ValueError("AdaTask steps on the per-task gradient matrix; none was given")
    return task_gradients


def _drawn_mask(p: Tensor, drawn: Tensor) -> Tensor:
    """[K] bool on `p`'s device: whether each task (row of `p`) is among `drawn` (indices)."""
    return torch.zeros(p.shape[0], dtype=torch.bool, device=p.device).index_fill_(0, drawn.to(p.device), True)


@contextmanager
def _hidden_gradients(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """The parameters without `.grad` for a while: `torch.optim.Adam` does not step them."""
    hidden = [(p, p.grad) for p in params]
    for p, _ in hidden:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in hidden:
            p.grad = grad


def _prepare_adam(adam: torch.optim.Optimizer, params: NetworkParameters) -> None:
    """Adam's state as a first step creates it, every step count on the parameter's device: one
    count for a shared parameter (as `torch.optim.Adam`), one per row for a task-specific one."""
    for p in params.shared.values():
        _new_adam_state(adam.state[p], p, ())
        adam.state[p]["step"] = adam.state[p]["step"].to(p.device)
    for p in params.task.values():
        _new_adam_state(adam.state[p], p, (p.shape[0],))


def _new_adam_state(state: dict[str, Tensor], p: Tensor, counts: tuple[int, ...]) -> None:
    if not state:
        state["step"] = torch.zeros(counts, dtype=_scalar_dtype(), device=p.device if counts else None)
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)


def _scalar_dtype() -> torch.dtype:
    """The dtype of `torch.optim`'s step counts."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@torch.no_grad()
def adam_step_where(adam: torch.optim.Optimizer, params: Iterable[nn.Parameter], finite: Tensor) -> None:
    """One step of `adam` (no weight decay, no amsgrad) on `params` (shared ones: one step count
    each), taken where `finite` holds. State made by `_prepare_adam`."""
    for p in params:
        _adam_step(adam, p, finite, finite)


@torch.no_grad()
def task_adam_step(adam: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], rows: Tensor) -> None:
    """One step of `adam` (no weight decay, no amsgrad) on task-specific parameters: row k only where
    `rows[k]` ([K] bool), bias-corrected by row k's own step count (`state["step"]`, shape [K]).

    A task drawn with probability p has taken about p·t steps after t updates: a count for the whole
    tensor would bias-correct its moments as if it had taken t, which mis-scales its steps until
    the corrections reach 1 (about 1/√p too large once β1's correction has, while β2's has not).
    """
    for p in params.values():
        _new_adam_state(adam.state[p], p, (p.shape[0],))
        _adam_step(adam, p, rows, rows.view(-1, *(1,) * (p.dim() - 1)))


def _adam_step(adam: torch.optim.Optimizer, p: nn.Parameter, counted: Tensor, gate: Tensor) -> None:
    """`torch.optim.Adam`'s arithmetic on `p`, its step count(s) advanced by `counted`, the
    parameter and moments written only where `gate` holds (broadcast against `p`)."""
    if p.grad is None:  # as torch.optim.Adam: a parameter without a gradient is not stepped
        return
    (group,) = adam.param_groups
    beta1, beta2 = group["betas"]
    state, grad = adam.state[p], p.grad
    state["step"].add_(counted.to(state["step"].dtype))
    # A row that never stepped has count 0, and its (unused) corrections would divide by 0.
    t = state["step"].to(torch.float64).clamp(min=1).view(*state["step"].shape, *(1,) * (p.dim() - counted.dim()))
    step_size = (group["lr"] / (1 - beta1**t)).to(p.dtype)
    bias_correction2_sqrt = (1 - beta2**t).sqrt().to(p.dtype)
    m = state["exp_avg"].lerp(grad, 1 - beta1)
    v = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    new = p - step_size * m / (v.sqrt() / bias_correction2_sqrt + group["eps"])
    p.copy_(torch.where(gate, new, p))
    state["exp_avg"].copy_(torch.where(gate, m, state["exp_avg"]))
    state["exp_avg_sq"].copy_(torch.where(gate, v, state["exp_avg_sq"]))


def _check_parts(state: Mapping[str, Any], expected: list[str]) -> None:
    if sorted(state) != sorted(expected):
        raise ValueError(f"optimizer state holds {sorted(state)}, expected {sorted(expected)}")
