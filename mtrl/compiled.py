"""The SAC update as one function of tensors on the device, optionally under torch.compile (`train.compile`).

`SACUpdate` reads the finiteness flag on the host before it steps. `CompiledUpdate` wraps one and
runs its gradients and every step as one function (`apply`) that never reads the flag: each step
and the target critics' move are taken or not on the device (`Optimization.step_where`), and the
host reads the flag once, after the update. Same draws, same arithmetic as the eager update.

`mode` "default" or "reduce-overhead" runs `apply` under `torch.compile` with that mode;
"reduce-overhead" replays it as CUDA graphs on a GPU, which needs what this module adds around it:
the optimizer state at fixed addresses, a step-begin mark before each replay, and copies of what
a replay's outputs hold that is read after the next replay. "none" runs `apply` uncompiled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl.buffer import Batch
from mtrl.combiners import Combiner
from mtrl.optim import Optimization
from mtrl.sac import MTSAC, SACUpdate, UpdateResult

COMPILE_MODES = ("none", "default", "reduce-overhead")


def _copy_tensor_attributes(obj: object) -> None:
    """Replace every tensor attribute of `obj` by a copy of it."""
    for name, value in list(vars(obj).items()):
        if torch.is_tensor(value):
            setattr(obj, name, value.clone())


class CompiledUpdate:
    """`update` with its steps decided on the device, compiled with `torch.compile(mode=mode)` unless "none"."""

    def __init__(self, update: SACUpdate, mode: str = "none"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose from: {', '.join(COMPILE_MODES)}")
        self.update, self.mode = update, mode
        self._run = self.apply if mode == "none" else torch.compile(self.apply, mode=mode, dynamic=False)

    @property
    def agent(self) -> MTSAC:
        return self.update.agent

    @property
    def optimization(self) -> Optimization:
        return self.update.optimization

    @property
    def combiner(self) -> Combiner:
        return self.update.combiner

    def __call__(
        self,
        batch: Batch,
        generator: torch.Generator,
        combiner_generator: torch.Generator,
        diagnostics: bool = False,
    ) -> UpdateResult:
        """One update, as `SACUpdate.__call__`, with the host reading the finiteness flag only after it."""
        drawn = self.update.draw(batch, generator, combiner_generator)
        graphs = self.mode == "reduce-overhead"
        if self.optimization.prepare_device_steps() and graphs:
            for state in self.optimization.state_tensors():  # updated in place by every replay
                torch._dynamo.mark_static_address(state)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
        finite, metrics = self._run(
            batch, drawn.next_noise, drawn.actor_noise, drawn.tasks, drawn.combiner, diagnostics
        )
        if graphs:
            # A CUDA graph's outputs are overwritten by its next replay: the combiner keeps some
            # (a warm start, the last weights) past it, and the metrics are read at the next log.
            _copy_tensor_attributes(self.combiner)
            metrics = {key: value.clone() for key, value in metrics.items()}
        return UpdateResult(bool(finite), metrics)

    def apply(
        self,
        batch: Batch,
        next_noise: Tensor,
        actor_noise: Tensor,
        tasks: Tensor | None,
        draws: dict[str, Tensor | None] | None,
        diagnostics: bool,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The whole update as a function of tensors, with no host synchronisation: gradients, then
        every step and the target critics' move taken on the device only if everything is finite.

        Returns the finiteness flag (0-d bool) and the metrics. The optimizers' state must exist
        (`Optimization.prepare_device_steps`). Same arithmetic as `SACUpdate.gradients` + `step`.
        """
        gradients = self.update.gradients(batch, next_noise, actor_noise, tasks, draws, diagnostics)
        self.update.step(gradients, where=gradients.finite)
        self.agent.zero_grad(set_to_none=True)
        return gradients.finite, gradients.metrics


def make_learner(update: SACUpdate, mode: str = "none") -> SACUpdate | CompiledUpdate:
    """What runs a training update for `train.compile=mode`: `update` itself (eager) for "none"."""
    return update if mode == "none" else CompiledUpdate(update, mode)
