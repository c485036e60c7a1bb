"""SDMGrad, stochastic direction-oriented multi-objective gradient descent (Xiao, Ban & Ji, NeurIPS 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mtrl.combiners import mtrl_recipe
from mtrl.combiners.base import Combiner, HyperParameters, check_choice, check_number, hyper_parameter, normalised
from mtrl.combiners.simplex import SimplexProgram, minimize_on_simplex, project_onto_simplex

SOLVERS = ("exact", "mtrl")


@dataclass(frozen=True)
class SDMGradParameters(HyperParameters):
    lam: float = hyper_parameter(0.6, "λ, the pull towards g0 (0: MGDA, large: the mean); >= 0")
    solver: str = hyper_parameter("exact", "exact | mtrl (the authors' Meta-World recipe)")

    def __post_init__(self) -> None:
        self._store("lam", check_number("lam", self.lam, low=0.0))
        check_choice("solver", self.solver, SOLVERS)


class SDMGrad(Combiner):
    """w* = argmin_{w∈Δ} ½‖g_w + λ g0‖², d = (g_w* + λ g0)/(1 + λ), λ = `lam` (docs/combiners.md#sdmgrad).

    λ → 0 is MGDA and λ → ∞ plain averaging. `solver="exact"` solves the QP to convergence;
    `solver="mtrl"` is the authors' recipe: projected SGD from the uniform weights, which often keeps
    the uniform start as its best iterate and then returns exactly g0 (faithful, not a bug).
    """

    Parameters = SDMGradParameters
    parameters: SDMGradParameters

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        size = gramian.shape[0]
        lam = self.parameters.lam
        dual = self._exact(gramian) if self.parameters.solver == "exact" else self._recipe(gramian)
        return (dual + lam / size) / (1 + lam)

    def _exact(self, gramian: Tensor) -> Tensor:
        # ½‖g_w + λg0‖² = ½wᵀAw + λ wᵀ(A1/K) + const; scale-free, so A may be normalised.
        gramian, _ = normalised(gramian)
        size = gramian.shape[0]
        return minimize_on_simplex(SimplexProgram(size, self.parameters.lam * gramian.mean(1), quadratic=gramian))

    def _recipe(self, gramian: Tensor) -> Tensor:
        """Projected SGD on obj = wᵀÂw + 2λwᵀb + λ²gg from w = 1/K (docs/combiners.md#sdmgrad)."""
        scaled = mtrl_recipe.ScaledGramian.of(gramian)
        lam = self.parameters.lam

        def objective(w: Tensor) -> tuple[Tensor, Tensor]:
            pulled = scaled.matrix @ w
            value = w @ pulled + 2 * lam * (w @ scaled.row_means) + lam**2 * scaled.mean
            return value, 2 * pulled + 2 * lam * scaled.row_means

        size = gramian.shape[0]
        start = gramian.new_full((size,), 1.0 / size)
        return mtrl_recipe.best_of_momentum_sgd(start, objective, self._learning_rate(size), project_onto_simplex)

    def _learning_rate(self, num_tasks: int) -> float:
        return mtrl_recipe.learning_rate(num_tasks)
