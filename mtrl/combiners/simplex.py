"""Convex programs over the probability simplex Δ, solved on the device in a fixed number of steps.

Every exact dual in shared/spec/combiners.md is one `SimplexProgram`:

    minimise ½xᵀQx + pᵀx + κ·sqrt(xᵀRx)   over x = (w, v), w ∈ Δ, v ≥ 0,

built from A = G Gᵀ (ConicGrad's adds one variable v). The square root, a norm such as ‖g_w‖, is
kept exact: it becomes a second-order cone t ≥ ‖Lᵀx‖ (R = LLᵀ), and the program is solved by a
primal-dual interior point method with Nesterov–Todd scaling and Mehrotra's predictor-corrector
(Vandenberghe, "The CVXOPT linear and quadratic cone program solvers", 2010; Nocedal & Wright,
Numerical Optimization, 2nd ed., Alg. 16.4). About 15 iterations reach 1e-9 or better, whatever the
conditioning, also where the norm vanishes (CAGrad's kink) or a cone constraint switches on
(ConicGrad), where Newton's method on the nonsmooth duals stalls or cycles. There is no host
synchronisation: a fixed iteration count, and `torch.where` instead of branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ITERATIONS = 20
"""Interior-point iterations: 15 reach a KKT error of ~1e-9 on the spec's duals; the rest is margin."""

_CENTRALITY_FLOOR = 1e-13
"""Smallest duality measure targeted: iterates stay interior, far enough from the cone's surface
for float64 (A is normalised to unit mean diagonal)."""

_BOUNDARY_FRACTION = 0.99
"""Fraction of the largest feasible step taken: iterates stay strictly inside their cones."""

_RIDGE = 1e-12
"""Added to R before its Cholesky factorisation and to the Newton matrix, which a singular A would
otherwise leave semidefinite."""


@dataclass(frozen=True)
class SimplexProgram:
    """min ½xᵀQx + pᵀx + κ·sqrt(xᵀRx) over x = (w, v), w ∈ Δ (the first `size` entries), v ≥ 0.

    Convex when Q, R ⪰ 0 and κ ≥ 0. With R = A, sqrt(wᵀAw) = ‖g_w‖: MGDA and SDMGrad use (p, Q),
    CAGrad and IMGrad (p, κ, R, and Q for IMGrad's paper variant), ConicGrad (p, κ, R) and one v.
    """

    size: int
    linear: Tensor
    quadratic: Tensor | None = None
    root_weight: Tensor | float = 0.0
    root_matrix: Tensor | None = None

    def value(self, point: Tensor) -> Tensor:
        """The objective at a batch of points [..., len(linear)]."""
        result = point @ self.linear
        if self.quadratic is not None:
            result = result + 0.5 * ((point @ self.quadratic) * point).sum(-1)
        if self.root_matrix is not None:
            squared = ((point @ self.root_matrix) * point).sum(-1)
            result = result + self.root_weight * squared.clamp(min=0).sqrt()
        return result


def minimize_on_simplex(program: SimplexProgram, iterations: int = ITERATIONS) -> Tensor:
    """The minimiser x = (w, v) of `program`, in its dtype and on its device.

    Returns the iterate that best satisfies the KKT conditions: once converged, rounding in the
    ill-conditioned Newton systems can move later iterates away again, or make them non-finite.
    """
    solver = _InteriorPoint.of(program)
    state = solver.start()
    best, best_error = state, state.new_tensor(torch.inf)
    for _ in range(iterations + 1):
        following, error = solver.step(state)
        better = error < best_error  # False for NaN
        best, best_error = torch.where(better, state, best), torch.where(better, error, best_error)
        state = following
    return solver.solution(best)


@dataclass(frozen=True)
class _InteriorPoint:
    """The program as a cone program (Vandenberghe 2010, §1), in y = (x, t):

    minimise ½xᵀQx + pᵀx + κt  s.t.  eᵀx = 1,  x ≥ 0,  s = (t, Lᵀx) ∈ 𝒬 (the second-order cone),

    e marking the simplex entries. Its KKT conditions, with multipliers ν, z ≥ 0 and u = (u₀, u₁) ∈ 𝒬:
    Qx + p + νe − z − Lu₁ = 0,  κ − u₀ = 0,  eᵀx = 1,  x∘z = 0,  s∘u = 0 (Jordan product).
    An iterate is the flat vector (x, z, ν, t, u); without a norm it is (x, z, ν).
    """

    size: int
    linear: Tensor
    quadratic: Tensor
    simplex: Tensor
    factor: Tensor | None
    """L, with LLᵀ = R + ridge; None when the program has no norm."""
    weight: Tensor | float
    signs: Tensor | None
    """The diagonal of J = diag(1, −I), which defines the cone's algebra."""

    @classmethod
    def of(cls, program: SimplexProgram) -> _InteriorPoint:
        linear = program.linear
        count = linear.shape[0]
        simplex = torch.cat([linear.new_ones(program.size), linear.new_zeros(count - program.size)])
        quadratic = program.quadratic if program.quadratic is not None else linear.new_zeros(count, count)
        factor = signs = None
        if program.root_matrix is not None:
            ridged = program.root_matrix + torch.diag(torch.full_like(linear, _RIDGE))
            factor = torch.linalg.cholesky_ex(ridged).L
            signs = torch.cat([linear.new_ones(1), -linear.new_ones(count)])
        return cls(program.size, linear, quadratic, simplex, factor, program.root_weight, signs)

    @property
    def count(self) -> int:
        return self.linear.shape[0]

    def start(self) -> Tensor:
        """w uniform, v = 1, unit multipliers z, ν = 0; t = ‖Lᵀx‖ + 1 and u = (1, 0): inside the cone."""
        x = self.simplex / self.size + (1 - self.simplex)
        parts = [x, torch.ones_like(x), x.new_zeros(1)]
        if self.factor is not None:
            parts += [(self.factor.mT @ x).norm()[None] + 1, _identity(self.signs)]
        return torch.cat(parts)

    def solution(self, state: Tensor) -> Tensor:
        w = state[: self.size].clamp(min=0)
        x = torch.cat([w / w.sum(), state[self.size : self.count].clamp(min=0)])
        # A non-finite iterate means a Newton matrix could not be factorised; the start is the safe answer.
        return torch.where(torch.isfinite(x).all(), x, self.start()[: self.count])

    def step(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """One predictor-corrector iteration, and max(μ, |dual residual|, |eᵀx − 1|) before it.

        With the scaling W (W u = W⁻ᵀ s = λ, and W = diag(sqrt(x/z)) on the orthant) and ds = −G dy
        eliminated, a direction with complementarity target r solves (Vandenberghe 2010, §5.3)
        (P + GᵀW⁻²G) dy + e dν = −(residual) − Gᵀ W⁻¹(λ∖r),  eᵀdx = 1 − eᵀx,  du = W⁻¹(λ∖r) − W⁻²ds.
        """
        count = self.count
        x, z, nu = state[:count], state[count : 2 * count], state[2 * count]
        residual = self.quadratic @ x + self.linear + nu * self.simplex - z
        gap, degree = x @ z, count
        matrix = self.quadratic + torch.diag(z / x + _RIDGE)
        cone = None
        if self.factor is not None:
            t, u = state[2 * count + 1], state[2 * count + 2 :]
            cone = _ConePair.of(torch.cat([t[None], self.factor.mT @ x]), u, self.signs)
            residual = torch.cat([residual - self.factor @ u[1:], (self.weight - u[0]).reshape(1)])
            gap, degree = gap + cone.point @ u, count + 1
            matrix = cone.extend(matrix, self.factor)
        infeasibility = self.simplex @ x - 1
        error = torch.maximum(torch.maximum(gap / degree, residual.abs().amax()), infeasibility.abs())

        factor = torch.linalg.cholesky_ex(matrix).L
        unit = _solve(factor, torch.cat([self.simplex, self.simplex.new_zeros(matrix.shape[0] - count)]))
        balance = 1 / (self.simplex @ unit[:count])

        def direction(orthant_target: Tensor, cone_target: Tensor | None) -> Tensor:
            """The flat step (dx, dz, dν, dt, du) for complementarity targets r."""
            orthant_part = orthant_target / x  # W⁻¹(λ∖r) on the orthant
            right = -residual
            right[:count] += orthant_part
            if cone is not None:
                cone_part = cone.inverse(cone.divide(cone_target))
                right[:count] += self.factor @ cone_part[1:]
                right[count] += cone_part[0]
            solved = _solve(factor, right)
            dnu = (self.simplex @ solved[:count] + infeasibility) * balance
            dy = solved - dnu * unit
            dx = dy[:count]
            parts = [dx, orthant_part - z / x * dx, dnu[None]]
            if cone is not None:
                dpoint = torch.cat([dy[count:], self.factor.mT @ dx])
                parts += [dy[count:], cone_part - cone.inverse(cone.inverse(dpoint))]
            return torch.cat(parts)

        def longest(step: Tensor, limit: float) -> Tensor:
            """The largest α ≤ limit keeping x, z ≥ 0 and s, u ∈ 𝒬 along `step`."""
            shrink = (-step[: 2 * count] / state[: 2 * count]).amax()
            if cone is not None:
                dpoint = torch.cat([step[2 * count + 1 : 2 * count + 2], self.factor.mT @ step[:count]])
                shrink = torch.maximum(shrink, cone.shrink(dpoint, step[2 * count + 2 :]))
            return 1 / torch.clamp(shrink, min=1 / limit)

        def gap_after(step: Tensor, length: Tensor) -> Tensor:
            moved = state + length * step
            result = moved[:count] @ moved[count : 2 * count]
            if cone is not None:
                point = torch.cat([moved[2 * count + 1 : 2 * count + 2], self.factor.mT @ moved[:count]])
                result = result + point @ moved[2 * count + 2 :]
            return result

        # Predictor: the affine direction (targets −λ∘λ) measures how much centring σ is needed.
        orthant_square = x * z
        cone_square = None if cone is None else _jordan(cone.scaled, cone.scaled)
        affine = direction(-orthant_square, None if cone is None else -cone_square)
        sigma = (gap_after(affine, longest(affine, limit=1.0)) / gap) ** 3
        # Corrector: target σμ, less the predictor's second-order term.
        centre = (sigma * gap / degree).clamp(min=_CENTRALITY_FLOOR)
        orthant_target = centre - orthant_square - affine[:count] * affine[count : 2 * count]
        cone_target = None
        if cone is not None:
            daffine_point = torch.cat([affine[2 * count + 1 : 2 * count + 2], self.factor.mT @ affine[:count]])
            cross = _jordan(cone.inverse(daffine_point), cone.apply(affine[2 * count + 2 :]))
            cone_target = centre * _identity(self.signs) - cone_square - cross
        step = direction(orthant_target, cone_target)
        length = _BOUNDARY_FRACTION * longest(step, limit=1 / _BOUNDARY_FRACTION)
        return state + length * step, error


@dataclass(frozen=True)
class _ConePair:
    """A point s and multiplier u inside 𝒬 with their Nesterov–Todd scaling W = β(2w̄w̄ᵀ − J),
    w̄ᵀJw̄ = 1, such that W u = W⁻¹ s = λ (Vandenberghe 2010, §4.2).

    With s̄ = s/‖s‖_J, ū = u/‖u‖_J (‖v‖_J = sqrt(vᵀJv)), the point v = (s̄ + Jū)/sqrt(2(1 + s̄ᵀū))
    satisfies (2vvᵀ − J)ū = s̄; w̄ is its Jordan square root, so W²u = s; β = sqrt(‖s‖_J/‖u‖_J).
    """

    point: Tensor
    signs: Tensor
    bar: Tensor
    flipped: Tensor
    """Jw̄."""
    beta: Tensor
    scaled: Tensor
    """λ."""

    @classmethod
    def of(cls, point: Tensor, dual: Tensor, signs: Tensor) -> _ConePair:
        point_norm, dual_norm = _lorentz_norm(point), _lorentz_norm(dual)
        point_unit, dual_unit = point / point_norm, dual / dual_norm
        middle = (point_unit + signs * dual_unit) / (2 * (1 + point_unit @ dual_unit)).sqrt()
        head = ((middle[0] + 1) / 2).sqrt()
        bar = middle / (2 * head)
        bar[0] = head
        beta = (point_norm / dual_norm).sqrt()
        scaled = beta * (2 * bar * (bar @ dual) - signs * dual)
        return cls(point, signs, bar, signs * bar, beta, scaled)

    def apply(self, vector: Tensor) -> Tensor:
        """W·vector."""
        return self.beta * (2 * self.bar * (self.bar @ vector) - self.signs * vector)

    def inverse(self, vector: Tensor) -> Tensor:
        """W⁻¹·vector, W⁻¹ = (2Jw̄w̄ᵀJ − J)/β."""
        return (2 * self.flipped * (self.flipped @ vector) - self.signs * vector) / self.beta

    def divide(self, vector: Tensor) -> Tensor:
        """λ∖vector: the v with λ∘v = vector."""
        lam = self.scaled
        head = (self.signs * lam) @ vector / _lorentz_norm(lam) ** 2
        result = (vector - head * lam) / lam[0]
        result[0] = head
        return result

    def shrink(self, point_step: Tensor, dual_step: Tensor) -> Tensor:
        """1/α for the largest α keeping s + α·ds and u + α·du in 𝒬 (0 if every α does)."""
        # In the scaled space both s and u become λ, which is well centred: the roots are accurate there.
        return torch.maximum(
            _cone_shrink(self.scaled, self.inverse(point_step), self.signs),
            _cone_shrink(self.scaled, self.apply(dual_step), self.signs),
        )

    def extend(self, matrix: Tensor, factor: Tensor) -> Tensor:
        """The Newton matrix with the cone's block GᵀW⁻²G added, G mapping (x, t) to −(t, Lᵀx).

        In blocks (tail, head), W⁻² = (I + 8w̄₀²w̄₁w̄₁ᵀ, −4(2w̄₀² − 1)w̄₀w̄₁; ·, 1 + 8w̄₀²‖w̄₁‖²)/β².
        """
        head, tail = self.bar[0], self.bar[1:]
        pulled = factor @ tail
        inner = (factor @ factor.mT + 8 * head**2 * torch.outer(pulled, pulled)) / self.beta**2
        cross = -4 * (2 * head**2 - 1) * head * pulled / self.beta**2
        corner = (1 + 8 * head**2 * (tail @ tail)) / self.beta**2
        top = torch.cat([matrix + inner, cross[:, None]], 1)
        return torch.cat([top, torch.cat([cross, corner[None]])[None]])


def _identity(signs: Tensor) -> Tensor:
    """The identity (1, 0, ..., 0) of the cone's Jordan product."""
    return (signs == 1).to(signs.dtype)


def _jordan(left: Tensor, right: Tensor) -> Tensor:
    """The cone's Jordan product (lᵀr, l₀r₁ + r₀l₁)."""
    result = left[0] * right + right[0] * left
    result[0] = left @ right
    return result


def _lorentz_norm(vector: Tensor) -> Tensor:
    """sqrt(v₀² − ‖v₁‖²), computed as a product to avoid cancellation near the cone's surface."""
    tail = vector[1:].norm()
    return ((vector[0] - tail) * (vector[0] + tail)).clamp(min=0).sqrt()


def _cone_shrink(point: Tensor, step: Tensor, signs: Tensor) -> Tensor:
    """1/α for the first α > 0 with point + α·step on the cone's surface, 0 if there is none.

    (p + αd)ᵀJ(p + αd) = aα² + bα + c has its first positive root at 2c/(sqrt(b² − 4ac) − b)
    whenever that denominator is positive (c > 0 as p is inside).
    """
    flipped = signs * step
    a, b, c = step @ flipped, 2 * (point @ flipped), _lorentz_norm(point) ** 2
    discriminant = b**2 - 4 * a * c
    denominator = discriminant.clamp(min=0).sqrt() - b
    return torch.where(discriminant >= 0, denominator.clamp(min=0) / (2 * c), torch.zeros_like(c))


def _solve(factor: Tensor, right: Tensor) -> Tensor:
    """M⁻¹·right from the Cholesky factor L of M = LLᵀ."""
    lower = torch.linalg.solve_triangular(factor, right[:, None], upper=False)
    return torch.linalg.solve_triangular(factor.mT, lower, upper=True)[:, 0]


def project_onto_simplex(point: Tensor) -> Tensor:
    """Euclidean projection onto Δ by sorting (Duchi et al., ICML 2008, Fig. 1)."""
    size = point.shape[-1]
    ordered = point.sort(descending=True).values
    excess = ordered.cumsum(-1) - 1
    ranks = torch.arange(1, size + 1, dtype=point.dtype, device=point.device)
    support = (ordered - excess / ranks > 0).sum(-1, keepdim=True)
    threshold = excess.gather(-1, support - 1) / support
    return (point - threshold).clamp(min=0)
