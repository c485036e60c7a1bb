"""FAMO, fast adaptive multitask optimization (Liu, Feng, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mtrl.combiners.base import (
    Combiner,
    HyperParameters,
    TaskLosses,
    check_choice,
    check_matrix,
    check_number,
    hyper_parameter,
)
from mtrl.combiners.learned import LearnedState, State, adam_state, adam_step

VARIANTS = ("paper", "mtrl")

EPSILON = 1e-8
"""Added to every loss before its logarithm, as in the authors' code: ℓ̃_i = ℓ_i − ℓ* + 1e-8."""

STATE_KEYS = frozenset({"logits", "exp_avg", "exp_avg_sq", "step"})


@dataclass(frozen=True)
class FAMOParameters(HyperParameters):
    logit_lr: float = hyper_parameter(0.025, "β: learning rate of the task logits (Adam); > 0")
    logit_decay: float = hyper_parameter(0.01, "γ: L2 regularisation of the task logits; >= 0")
    min_loss: float = hyper_parameter(0.0, "ℓ*: the loss offset of every task, FAMO weighs log(ℓ − ℓ* + 1e-8)")
    variant: str = hyper_parameter("paper", "paper (weights sum to 1) | mtrl (the authors' Meta-World port)")

    def __post_init__(self) -> None:
        self._store("logit_lr", check_number("logit_lr", self.logit_lr, low=0.0, low_open=True))
        self._store("logit_decay", check_number("logit_decay", self.logit_decay, low=0.0))
        self._store("min_loss", check_number("min_loss", self.min_loss))
        if not math.isfinite(self.min_loss):
            raise ValueError(f"`min_loss` must be finite, found {self.min_loss!r}")
        check_choice("variant", self.variant, VARIANTS)


class FAMO(Combiner):
    """Weights from the losses alone, and task logits learned from how each loss fell across the step.

    With logits ξ (0 at the start), z = softmax(ξ) and ℓ̃_i = ℓ_i − ℓ* + 1e-8, the model steps on
    Σ_i z_i log ℓ̃_i / c with c = Σ_i z_i/ℓ̃_i held constant (Liu et al., 2023, Algorithm 1): task
    weights w_i = z_i / (c ℓ̃_i), which sum to 1, and one backward pass. After the step, on the same
    batch, the logits take one Adam step (lr β, L2 regularisation γ) along
    δ = J_softmax(ξ)ᵀ (log ℓ̃(before) − log ℓ̃(after)), so tasks whose loss fell fast lose weight.
    `variant="mtrl"` is the authors' Meta-World port: w_i = c z_i / ℓ̃_i (they sum to c²). The logits
    and their Adam moments are kept per network and saved in checkpoints.
    """

    Parameters = FAMOParameters
    needs_jacobian = False
    needs_losses_after = True
    supports_compile = False

    def __init__(self, parameters: HyperParameters | None = None) -> None:
        super().__init__(parameters)
        self._learned = LearnedState("FAMO", STATE_KEYS)

    @classmethod
    def check_networks(cls, networks: Sequence[str]) -> None:
        # log ℓ̃ needs losses bounded below; the actor's and the temperature's losses are not.
        if list(networks) != ["critic"]:
            raise ValueError(
                f"famo weighs the logarithms of the losses, which only the critic's are bounded below: "
                f"combiner.networks must be [critic], found {list(networks)}"
            )

    def _state(self, losses: TaskLosses) -> State:
        """The logits ξ (float64, 0 at the start) and their Adam moments for `losses.network`."""

        def initial() -> State:
            logits = losses.values.new_zeros(losses.values.shape, dtype=torch.float64)
            return {"logits": logits, **adam_state(logits)}

        return self._learned.current(losses.network, losses.values.device, initial)

    def _shifted_log(self, values: Tensor) -> Tensor:
        return (values.double() - self.parameters.min_loss + EPSILON).log()

    def loss_weights(self, losses: TaskLosses) -> Tensor:
        z = torch.softmax(self._state(losses)["logits"], 0)
        shifted = losses.values.double() - self.parameters.min_loss + EPSILON
        c = (z / shifted).sum()  # a constant of the step: the weights are detached
        weights = z / shifted * c if self.parameters.variant == "mtrl" else z / (c * shifted)
        self.last_weights = weights.to(losses.values.dtype)
        return self.last_weights

    def __call__(
        self,
        matrix: Tensor,
        generator: torch.Generator | None = None,
        draws: Tensor | None = None,
        losses: TaskLosses | None = None,
    ) -> Tensor:
        """d = Gᵀw with FAMO's weights of `losses` (what one backward of the weighted loss gives)."""
        check_matrix(matrix)
        if losses is None:
            raise ValueError("FAMO weighs the task losses: call it with `losses`")
        return self.loss_weights(losses).to(matrix.dtype) @ matrix

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        raise TypeError("FAMO's weights come from the task losses (`loss_weights`), not from the Gramian")

    def after_step(self, losses: TaskLosses, after: Tensor | None, taken: Tensor | None) -> None:
        if after is None:
            raise ValueError("FAMO needs the losses after the step")
        state = self._state(losses)
        logits = state["logits"]
        decrease = self._shifted_log(losses.values) - self._shifted_log(after)
        z = torch.softmax(logits, 0)
        # δ = J_softmax(ξ)ᵀ·decrease with J = diag(z) − zzᵀ (Liu et al., 2023, Algorithm 1).
        direction = z * (decrease - (z * decrease).sum())
        moments = {key: state[key] for key in ("exp_avg", "exp_avg_sq", "step")}
        logits, moments = adam_step(logits, direction, moments, self.parameters.logit_lr, self.parameters.logit_decay)
        self._learned.propose(losses.network, state, {"logits": logits, **moments})
        self._learned.commit(losses.network, taken)

    def logits(self, network: str) -> Tensor | None:
        """`network`'s committed logits ξ (None before its first taken update)."""
        state = self._learned.state_dict().get(network)
        return None if state is None else state["logits"]

    def state_dict(self) -> dict[str, Any]:
        return self._learned.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._learned.load_state_dict(state)
