"""What the loss-weighting methods (FAMO, GradNorm) share: task weights learned per network by Adam,
changed only once the update that proposed them is known to be taken.

A method keeps one `State` (a dict of tensors) per network whose losses it weighs. During an update
it reads the committed state (`LearnedState.current`) and proposes the next one (`propose`); the
update's end (`Combiner.after_step`) commits it (`commit`), on the device and only where the step
was taken and the proposal is finite. An update that is skipped, or whose proposal is not finite,
leaves the state exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mtrl.combiners.base import move

State = dict[str, Tensor]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""torch.optim.Adam's defaults, which both FAMO's and the GradNorm reference's weight optimizers use."""


def adam_state(like: Tensor) -> State:
    """Adam's moments and step count for a parameter shaped like `like`, before its first step."""
    return {"exp_avg": torch.zeros_like(like), "exp_avg_sq": torch.zeros_like(like), "step": like.new_zeros(())}


def adam_step(
    value: Tensor, gradient: Tensor, state: State, lr: float, weight_decay: float = 0.0
) -> tuple[Tensor, State]:
    """One step of torch.optim.Adam (its `weight_decay` is an L2 term added to the gradient), as a function.

    Returns the new value and the new moments; nothing is written in place.
    """
    beta1, beta2 = ADAM_BETAS
    gradient = gradient + weight_decay * value
    step = state["step"] + 1
    exp_avg = beta1 * state["exp_avg"] + (1 - beta1) * gradient
    exp_avg_sq = beta2 * state["exp_avg_sq"] + (1 - beta2) * gradient * gradient
    denominator = exp_avg_sq.sqrt() / (1 - beta2**step).sqrt() + ADAM_EPS
    value = value - lr / (1 - beta1**step) * exp_avg / denominator
    return value, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "step": step}


class LearnedState:
    """Each network's committed state, and the state the running update proposes for it."""

    def __init__(self, owner: str, keys: frozenset[str]) -> None:
        self.owner, self.keys = owner, keys
        self._states: dict[str, State] = {}
        self._proposed: dict[str, tuple[State, State]] = {}

    def current(self, network: str, device: torch.device, initial: Callable[[], State]) -> State:
        """`network`'s committed state on `device` (`initial()` before its first committed update)."""
        state = self._states.get(network)
        if state is None:
            return initial()
        state = {key: move(value, device) for key, value in state.items()}
        self._states[network] = state  # moved once (after a load), then used in place
        return state

    def propose(self, network: str, before: State, after: State) -> None:
        """The state this update would leave `network` in, replacing `before` when committed."""
        self._proposed[network] = (before, after)

    def commit(self, network: str, taken: Tensor | None) -> None:
        """Make `network`'s proposed state its state where `taken` holds (None: taken) and the proposal is finite."""
        before, after = self._proposed.pop(network)
        keep = torch.stack([torch.isfinite(value).all() for value in after.values()]).all()
        if taken is not None:
            keep = keep & taken
        self._states[network] = {key: torch.where(keep, after[key], before[key]) for key in before}

    def state_dict(self) -> dict[str, Any]:
        return {
            network: {key: value.detach().cpu().clone() for key, value in state.items()}
            for network, state in self._states.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for network, values in state.items():
            if not isinstance(values, Mapping) or set(values) != self.keys:
                found = sorted(values) if isinstance(values, Mapping) else type(values).__name__
                raise ValueError(f"{self.owner} state of {network!r} must hold {sorted(self.keys)}, found {found}")
        self._states = {network: dict(values) for network, values in state.items()}
        self._proposed = {}
