"""GradNorm, gradient normalisation for adaptive loss balancing (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018)."""

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

VARIANTS = ("paper", "reference")

MIN_WEIGHT = 1e-3
"""The floor a task weight is kept above before the renormalisation: a weight at or below 0 would
remove or reverse its task's gradient (neither the paper nor the reference code guards this)."""

STATE_KEYS = frozenset({"weights", "exp_avg", "exp_avg_sq", "step", "initial_losses"})


@dataclass(frozen=True)
class GradNormParameters(HyperParameters):
    alpha: float = hyper_parameter(0.12, "α: asymmetry, how closely gradient norms follow the training rates; >= 0")
    weight_lr: float = hyper_parameter(3e-4, "learning rate of the task weights (Adam); > 0")
    min_loss: float = hyper_parameter(0.0, "ℓ*: the loss offset of every task, the rates use (L − ℓ*)/(L(0) − ℓ*)")
    variant: str = hyper_parameter(
        "paper", "paper | reference (the v3 reference code: whole gradient, target not held, new weights summed)"
    )

    def __post_init__(self) -> None:
        self._store("alpha", check_number("alpha", self.alpha, low=0.0))
        self._store("weight_lr", check_number("weight_lr", self.weight_lr, low=0.0, low_open=True))
        self._store("min_loss", check_number("min_loss", self.min_loss))
        if not math.isfinite(self.min_loss):
            raise ValueError(f"`min_loss` must be finite, found {self.min_loss!r}")
        check_choice("variant", self.variant, VARIANTS)


class GradNorm(Combiner):
    """Task weights w (Σ w = K) learned so that each task's gradient norm follows its training rate.

    Chen et al. (2018), Algorithm 1: with n_i = ‖∇_W L_i‖ on the last shared layer W, G_i = w_i n_i,
    Ḡ = mean_i G_i, the inverse training rates r_i = (L̃_i/L̃_i(0)) / mean_j(L̃_j/L̃_j(0)) with
    L̃ = L − ℓ* (ℓ* = `min_loss`, 0 in the paper; L(0): the first losses seen) and the target
    Ḡ r_i^α held constant, w takes one Adam step on L_grad = Σ_i |G_i − Ḡ r_i^α|, then is
    renormalised to Σ w = K. The model steps with the weights
    from before that step, on the mean-scaled (1/K) Σ_i w_i L_i: d = Gᵀw/K, which is `mean` while w = 1.

    `variant="reference"` is the v3 reference code: n_i from the whole shared gradient, the target not
    held constant (Ḡ depends on w), and the new weights combine this step's gradients as a sum, d = Gᵀw.
    The weights, their Adam moments and L(0) are kept per network and saved in checkpoints.
    """

    Parameters = GradNormParameters
    supports_compile = False

    def __init__(self, parameters: HyperParameters | None = None) -> None:
        super().__init__(parameters)
        self._learned = LearnedState("GradNorm", STATE_KEYS)
        self._columns: dict[tuple[tuple[tuple[str, int], ...], torch.device], Tensor] = {}

    @classmethod
    def check_networks(cls, networks: Sequence[str]) -> None:
        # The training rate L_i/L_i(0) means nothing for a loss that changes sign (actor, temperature).
        if list(networks) != ["critic"]:
            raise ValueError(
                f"gradnorm's training rates L/L(0) need losses that keep their sign, which only the critic's do: "
                f"combiner.networks must be [critic], found {list(networks)}"
            )

    def __call__(
        self,
        matrix: Tensor,
        generator: torch.Generator | None = None,
        draws: Tensor | None = None,
        losses: TaskLosses | None = None,
    ) -> Tensor:
        """d for G = `matrix` and the rows' `losses`; proposes the next weights, which `after_step` commits."""
        check_matrix(matrix)
        if losses is None:
            raise ValueError("GradNorm weighs the task losses: call it with `losses`")
        k = matrix.shape[0]
        reference = self.parameters.variant == "reference"

        def initial() -> State:
            weights = torch.ones(k, dtype=torch.float64, device=matrix.device)
            return {"weights": weights, **adam_state(weights), "initial_losses": torch.full_like(weights, torch.nan)}

        state = self._learned.current(losses.network, matrix.device, initial)
        values = losses.values.double()
        initial_losses = torch.where(torch.isnan(state["initial_losses"]), values, state["initial_losses"])
        rows = matrix if reference else matrix.index_select(1, self._last_layer(losses.shared_layout, matrix.device))
        norms = rows.double().norm(dim=1)
        weights = state["weights"]
        ratios = (values - self.parameters.min_loss) / (initial_losses - self.parameters.min_loss)
        powered = (ratios / ratios.mean()) ** self.parameters.alpha  # r_i^α
        grad_norms = weights * norms  # G_i
        signs = torch.sign(grad_norms - grad_norms.mean() * powered)
        gradient = signs * norms  # ∂L_grad/∂w_i with the target held constant
        if reference:  # the target's own dependence on w through Ḡ
            gradient = gradient - norms * (signs * powered).mean()
        # sign(NaN) is 0: a rate that is not finite (a loss that changed sign) must void the proposal instead.
        gradient = torch.where(torch.isfinite(powered).all(), gradient, torch.nan)
        moments = {key: state[key] for key in ("exp_avg", "exp_avg_sq", "step")}
        stepped, moments = adam_step(weights, gradient, moments, self.parameters.weight_lr)
        stepped = stepped.clamp(min=MIN_WEIGHT)
        stepped = stepped * (k / stepped.sum())
        self._learned.propose(losses.network, state, {"weights": stepped, **moments, "initial_losses": initial_losses})
        used = stepped if reference else weights / k
        self.last_weights = used.to(matrix.dtype)
        return self.last_weights @ matrix

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        raise TypeError("GradNorm's weights need the gradients and the task losses, not only the Gramian")

    def after_step(self, losses: TaskLosses, after: Tensor | None, taken: Tensor | None) -> None:
        self._learned.commit(losses.network, taken)

    def task_weights(self, network: str) -> Tensor | None:
        """`network`'s committed weights w (Σ w = K; None before its first taken update)."""
        state = self._learned.state_dict().get(network)
        return None if state is None else state["weights"]

    def _last_layer(self, layout: tuple[tuple[str, int], ...], device: torch.device) -> Tensor:
        key = (layout, device)
        if key not in self._columns:
            self._columns[key] = torch.tensor(last_shared_layer(layout), dtype=torch.long, device=device)
        return self._columns[key]

    def state_dict(self) -> dict[str, Any]:
        return self._learned.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._learned.load_state_dict(state)


def last_shared_layer(layout: Sequence[tuple[str, int]]) -> list[int]:
    """The columns of G that belong to the last shared layer, from the shared parameters' (name, numel).

    That layer is the module owning the last shared parameter, together with the modules at the same
    place in sibling branches (the twin critic's `q1.net.head` and `q2.net.head`, or `q1.net.trunk.2` and
    `q2.net.trunk.2` when the heads are per task).
    """
    if not layout:
        raise ValueError("GradNorm needs shared parameters: this network has none")

    def owner(name: str) -> str:
        return name.rpartition(".")[0]

    def place(module: str) -> str:
        return module.partition(".")[2]

    last = owner(layout[-1][0])
    columns, start = [], 0
    for name, size in layout:
        module = owner(name)
        if module == last or (place(last) and place(module) == place(last)):
            columns.extend(range(start, start + size))
        start += size
    return columns
