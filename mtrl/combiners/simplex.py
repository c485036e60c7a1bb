"""Convex programs over the probability simplex Δ, solved on the device in a fixed number of steps.

Every exact dual in docs/combiners.md is one `SimplexProgram` (docs/combiners.md#solvers):

    minimise ½xᵀQx + pᵀx + κ·sqrt(xᵀRx)   over x = (w, v), w ∈ Δ, v ≥ 0,

built from A = G Gᵀ (ConicGrad's adds one variable v). The square root, a norm such as ‖g_w‖, is
kept exact: it becomes a second-order cone t ≥ ‖Lᵀx‖ (R = LLᵀ), and the program is solved by a
primal-dual interior point method with Nesterov–Todd scaling and Mehrotra's predictor-corrector
(Vandenberghe, "The CVXOPT linear and quadratic cone program solvers", 2010; Nocedal & Wright,
Numerical Optimization, 2nd ed., Alg. 16.4). 15–20 iterations bring the KKT error to ~1e-9 whatever
the conditioning, also where the norm vanishes (CAGrad's kink) or a cone constraint switches on
(ConicGrad), where Newton's method on the nonsmooth duals stalls or cycles; a few Newton steps on
the face of the feasible set the solution lies on then take it to machine precision. There is no
host synchronisation: fixed iteration counts, and `torch.where` instead of branches.

The cost is one small Cholesky factorisation and ~100 (quadratic) or ~300 (with a norm) tiny tensor
operations per iteration, independent of K ≤ 50: on a CPU the solve is bound by per-operation
overhead, on a GPU by kernel launches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QUADRATIC_ITERATIONS = 16
"""Interior-point iterations without a norm: quadratic programs reach machine precision in 10–14."""

CONE_ITERATIONS = 20
"""Interior-point iterations with a norm: 16 suffice on most of the combiners' duals, 20 on all we tried
(task-gradient norms spread over 4 decades included)."""

_CENTRALITY_FLOOR = 1e-13
"""Smallest duality measure targeted: iterates stay interior, far enough from the cone's surface
for float64 (A is normalised to unit mean diagonal)."""

_BOUNDARY_FRACTION = 0.99
"""Fraction of the largest feasible step taken: iterates stay strictly inside their cones."""

_POLISH_STEPS = 3
"""Newton steps of the polish on each guess of the face; from the interior point solution one usually
reaches machine precision."""

_KKT_ROUNDING = 1e-12
"""Largest KKT violation (relative to the gradient) of a polished point that rounding explains: such a
point is the minimiser, even where its objective value cannot be told from the interior point's."""

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


def minimize_on_simplex(program: SimplexProgram, iterations: int | None = None) -> Tensor:
    """The minimiser x = (w, v) of `program`, in its dtype and on its device.

    Returns the iterate that best satisfies the KKT conditions: once converged, rounding in the
    ill-conditioned Newton systems can move later iterates away again, or make them non-finite.
    """
    if iterations is None:
        iterations = QUADRATIC_ITERATIONS if program.root_matrix is None else CONE_ITERATIONS
    solver = _InteriorPoint.of(program)
    best = state = solver.start()
    residuals = solver.residuals(state)
    best_error = solver.kkt_error(residuals)
    for _ in range(iterations):
        state = solver.step(state, residuals)
        residuals = solver.residuals(state)
        error = solver.kkt_error(residuals)
        better = error < best_error  # False for NaN
        best, best_error = torch.where(better, state, best), torch.where(better, error, best_error)
    _, duals, _, _ = solver.unpack(best)
    return _polish(program, solver.solution(best), duals)


def _polish(program: SimplexProgram, point: Tensor, duals: Tensor) -> Tensor:
    """The interior point solution refined by Newton's method on the face of the feasible set it lies on.

    The interior point method stops ~1e-10 short of the optimum (its last Newton systems are
    ill-conditioned); on the face {x_i = 0 where x_i < z_i (the bound is active), eᵀx = 1} the
    objective is smooth wherever the norm is positive, and a few Newton steps there reach machine
    precision. Where a bound's multiplier z_i* is itself tiny, the interior point stops with x_i and
    z_i both ~sqrt(μ) and the guess of the face can be wrong (MGDA at K = 50 left weights ~1e-6 on
    tasks that have none, 1e-4 of error in d): the face is then corrected once, as in an active-set
    method, and the Newton steps repeated. The refined point is kept if it is feasible and meets the
    KKT conditions to rounding, or else is no worse.
    """
    count = point.shape[0]
    simplex = torch.cat([point.new_ones(program.size), point.new_zeros(count - program.size)])
    free = point > duals
    x = point * free
    x = _newton_on_face(program, x, free, simplex)
    # Entries that went negative leave the face; those whose multiplier is negative join it.
    multipliers = _bound_multipliers(program, x, simplex)
    free = (free & (x > 0)) | (~free & (multipliers < 0))
    x = _newton_on_face(program, x.clamp(min=0) * free, free, simplex)
    multipliers = _bound_multipliers(program, x, simplex)
    violation = torch.where(free, multipliers.abs(), (-multipliers).clamp(min=0)).amax()
    optimal = violation <= _KKT_ROUNDING * _derivatives(program, x)[0].abs().amax()
    better = (x >= 0).all() & (optimal | (program.value(x) <= program.value(point)))  # False for NaN
    return torch.where(better, x, point)


def _newton_on_face(program: SimplexProgram, x: Tensor, free: Tensor, simplex: Tensor) -> Tensor:
    """`_POLISH_STEPS` Newton steps on min f(x) s.t. eᵀx = 1, x_i = 0 off the face (`free` False)."""
    count = x.shape[0]
    inside = free.to(x.dtype)
    fixed = torch.diag(1 - inside)
    for _ in range(_POLISH_STEPS):
        gradient, hessian = _derivatives(program, x)
        # [H_FF e_F; e_Fᵀ 0] on the free entries, identity rows for the fixed ones (their steps are 0).
        top = torch.cat(
            [
                hessian * torch.outer(inside, inside)
                + fixed
                + _RIDGE * torch.eye(count, dtype=x.dtype, device=x.device),
                (simplex * inside)[:, None],
            ],
            1,
        )
        matrix = torch.cat([top, torch.cat([simplex * inside, x.new_zeros(1)])[None]])
        right = torch.cat([-gradient * inside, (1 - simplex @ x)[None]])
        x = x + torch.linalg.solve_ex(matrix, right).result[:count]
    return x


def _bound_multipliers(program: SimplexProgram, x: Tensor, simplex: Tensor) -> Tensor:
    """z = ∇f(x) + νe with ν fitted on the face: 0 on the face and ≥ 0 off it at the minimiser (KKT)."""
    gradient = _derivatives(program, x)[0]
    weights = x * simplex
    return gradient - (weights @ gradient) / weights.sum() * simplex


def _derivatives(program: SimplexProgram, x: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient and Hessian of the program's objective at x (where its norm is positive)."""
    gradient, hessian = program.linear, torch.zeros_like(program.linear).diag()
    if program.quadratic is not None:
        gradient, hessian = gradient + program.quadratic @ x, hessian + program.quadratic
    if program.root_matrix is not None:
        # ∇sqrt(q) = Rx/r and ∇²sqrt(q) = (R − (Rx)(Rx)ᵀ/r²)/r, with r = sqrt(xᵀRx).
        pulled = program.root_matrix @ x
        root = (x @ pulled).clamp(min=0).sqrt()
        gradient = gradient + program.root_weight * pulled / root
        hessian = hessian + program.root_weight / root * (program.root_matrix - torch.outer(pulled, pulled) / root**2)
    return gradient, hessian


@dataclass(frozen=True)
class _InteriorPoint:
    """The program as a cone program (Vandenberghe 2010, §1) in y = (x, t):

    minimise ½xᵀQx + pᵀx + κt  s.t.  eᵀx = 1,  x ≥ 0,  s = Ĝy = (t, Lᵀx) ∈ 𝒬 (second-order cone),

    e marking the simplex entries. Its KKT conditions, with multipliers ν, z ≥ 0 and u = (u₀, u₁) ∈ 𝒬:
    Qx + p + νe − z − Lu₁ = 0,  κ − u₀ = 0,  eᵀx = 1,  x∘z = 0,  s∘u = 0 (Jordan product).
    An iterate is the flat vector (y, z, ν, u); without a norm it is (x, z, ν).
    """

    size: int
    linear: Tensor
    """p, and κ for t when there is a norm."""
    quadratic: Tensor
    simplex: Tensor
    """e (0 for t)."""
    lift: Tensor | None
    """Ĝ, mapping y = (x, t) to s = (t, Lᵀx); None when the program has no norm."""

    @classmethod
    def of(cls, program: SimplexProgram) -> _InteriorPoint:
        linear = program.linear
        count = linear.shape[0]
        simplex = torch.cat([linear.new_ones(program.size), linear.new_zeros(count - program.size)])
        quadratic = program.quadratic if program.quadratic is not None else linear.new_zeros(count, count)
        if program.root_matrix is None:
            return cls(program.size, linear, quadratic, simplex, None)
        ridged = program.root_matrix + torch.diag(torch.full_like(linear, _RIDGE))
        factor = torch.linalg.cholesky_ex(ridged).L
        lift = linear.new_zeros(count + 1, count + 1)
        lift[0, count] = 1
        lift[1:, :count] = factor.mT
        weight = program.root_weight
        # A Python number becomes a fill on the device (no host-to-device copy, which would synchronise).
        weight = weight.reshape(1) if isinstance(weight, Tensor) else linear.new_full((1,), weight)
        return cls(
            program.size,
            torch.cat([linear, weight]),
            torch.block_diag(quadratic, linear.new_zeros(1, 1)),
            torch.cat([simplex, linear.new_zeros(1)]),
            lift,
        )

    @property
    def count(self) -> int:
        """The number of x entries (w and v)."""
        return self.linear.shape[0] - (self.lift is not None)

    def start(self) -> Tensor:
        """w uniform, v = 1, unit multipliers z, ν = 0; with a norm t = ‖Lᵀx‖ + 1 and u = (1, 0) (inside 𝒬)."""
        count = self.count
        x = self.simplex[:count] / self.size + (1 - self.simplex[:count])
        if self.lift is None:
            return torch.cat([x, torch.ones_like(x), x.new_zeros(1)])
        t = (self.lift[1:, :count] @ x).norm()[None] + 1
        u = torch.cat([x.new_ones(1), torch.zeros_like(x)])
        return torch.cat([x, t, torch.ones_like(x), x.new_zeros(1), u])

    def solution(self, state: Tensor) -> Tensor:
        w = state[: self.size].clamp(min=0)
        x = torch.cat([w / w.sum(), state[self.size : self.count].clamp(min=0)])
        # A non-finite iterate means a Newton matrix could not be factorised; the start is the safe answer.
        return torch.where(torch.isfinite(x).all(), x, self.start()[: self.count])

    def unpack(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(y, z, ν, u) from a flat iterate (u empty without a norm)."""
        count, variables = self.count, self.linear.shape[0]
        return (
            state[:variables],
            state[variables : variables + count],
            state[variables + count],
            state[variables + count + 1 :],
        )

    def residuals(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(dual residual, complementarity sᵀz + sᵀu, eᵀx − 1) of the KKT conditions."""
        y, z, nu, u = self.unpack(state)
        count = self.count
        residual = self.quadratic @ y + self.linear + nu * self.simplex
        residual[:count] -= z
        gap = y[:count] @ z
        if self.lift is not None:
            residual = residual - self.lift.mT @ u
            gap = gap + (self.lift @ y) @ u
        return residual, gap, self.simplex @ y - 1

    def kkt_error(self, residuals: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """max(μ, |dual residual|, |eᵀx − 1|), μ the duality measure."""
        residual, gap, infeasibility = residuals
        degree = self.count + (self.lift is not None)
        return torch.maximum(torch.maximum(gap / degree, residual.abs().amax()), infeasibility.abs())

    def step(self, state: Tensor, residuals: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """One predictor-corrector iteration (Vandenberghe 2010, §5.3; Nocedal & Wright, Alg. 16.4).

        With the scaling W (W u = W⁻¹s = λ; diag(sqrt(x/z)) on the orthant) and ds = Ĝdy, a direction
        with complementarity targets r solves (Vandenberghe 2010, §5.3)
        (P + ĜᵀW⁻²Ĝ) dy + e dν = −(dual residual) + (W⁻¹(λ∖r) lifted),  eᵀdx = 1 − eᵀx,
        then ds̃ = W⁻¹ds, dũ = λ∖r − ds̃ (the scaled steps) and du = W⁻¹dũ.
        """
        count, variables = self.count, self.linear.shape[0]
        y, z, _, u = self.unpack(state)
        x = y[:count]
        ratio = z / x
        residual, gap, infeasibility = residuals
        matrix = self.quadratic + torch.diag(torch.nn.functional.pad(ratio, (0, variables - count)) + _RIDGE)
        degree, cone = count, None
        if self.lift is not None:
            cone = _ConeScaling.of(self.lift @ y, u)
            matrix = matrix + self.lift.mT @ (cone.inverse @ cone.inverse) @ self.lift
            degree = count + 1

        factor = torch.linalg.cholesky_ex(matrix).L
        unit = _solve(factor, self.simplex)
        balance = 1 / (self.simplex @ unit)

        def direction(orthant_target: Tensor, cone_target: Tensor | None) -> tuple[Tensor, Tensor | None]:
            """The flat step (dy, dz, dν, du), and the scaled cone steps (ds̃, dũ) stacked."""
            orthant_part = orthant_target / x  # W⁻¹(λ∖r) on the orthant
            right = -residual
            right[:count] += orthant_part
            if cone is not None:
                divided = cone.divide(cone_target)
                right = right + self.lift.mT @ (cone.inverse @ divided)
            solved = _solve(factor, right)
            dnu = (self.simplex @ solved + infeasibility) * balance
            dy = solved - dnu * unit
            dz = orthant_part - ratio * dy[:count]
            if cone is None:
                return torch.cat([dy, dz, dnu[None]]), None
            scaled_point = cone.inverse @ (self.lift @ dy)
            scaled_dual = divided - scaled_point
            return torch.cat([dy, dz, dnu[None], cone.inverse @ scaled_dual]), torch.stack([scaled_point, scaled_dual])

        def longest(step: Tensor, scaled: Tensor | None, limit: float) -> Tensor:
            """The largest α ≤ limit keeping x, z ≥ 0 and s, u ∈ 𝒬 along `step`."""
            shrink = torch.maximum((-step[:count] / x).amax(), (-step[variables : variables + count] / z).amax())
            if cone is not None:
                shrink = torch.maximum(shrink, _cone_shrink(cone, scaled).amax())
            return 1 / torch.clamp(shrink, min=1 / limit)

        def gap_after(step: Tensor, scaled: Tensor | None, length: Tensor) -> Tensor:
            result = (x + length * step[:count]) @ (z + length * step[variables : variables + count])
            if cone is not None:
                point, dual = cone.scaled + length * scaled  # s·u = s̃·ũ in the scaled space
                result = result + point @ dual
            return result

        # Predictor: the affine direction (targets −λ∘λ) measures how much centring σ is needed.
        orthant_square = x * z
        cone_square = None if cone is None else _jordan(cone.scaled, cone.scaled)
        affine, affine_scaled = direction(-orthant_square, None if cone is None else -cone_square)
        sigma = (gap_after(affine, affine_scaled, longest(affine, affine_scaled, limit=1.0)) / gap) ** 3
        # Corrector: target σμ, less the predictor's second-order term.
        centre = (sigma * gap / degree).clamp(min=_CENTRALITY_FLOOR)
        orthant_target = centre - orthant_square - affine[:count] * affine[variables : variables + count]
        cone_target = None
        if cone is not None:
            cone_target = centre * _identity(u) - cone_square - _jordan(affine_scaled[0], affine_scaled[1])
        step, scaled = direction(orthant_target, cone_target)
        length = _BOUNDARY_FRACTION * longest(step, scaled, limit=1 / _BOUNDARY_FRACTION)
        return state + length * step


@dataclass(frozen=True)
class _ConeScaling:
    """The Nesterov–Todd scaling W = β(2w̄w̄ᵀ − J) of a pair s, u inside 𝒬, with J = diag(1, −I),
    w̄ᵀJw̄ = 1 and W u = W⁻¹s = λ (Vandenberghe 2010, §4.2).

    With s̄ = s/‖s‖_J, ū = u/‖u‖_J (‖v‖_J = sqrt(vᵀJv)), the point v = (s̄ + Jū)/sqrt(2(1 + s̄ᵀū))
    satisfies (2vvᵀ − J)ū = s̄; w̄ is its Jordan square root, so W²u = s; β = sqrt(‖s‖_J/‖u‖_J).
    """

    inverse: Tensor
    """W⁻¹ = (2Jw̄w̄ᵀJ − J)/β, as a matrix."""
    scaled: Tensor
    """λ."""
    determinant: Tensor
    """λᵀJλ = ‖s‖_J·‖u‖_J."""
    signs: Tensor
    """The diagonal of J."""

    @classmethod
    def of(cls, point: Tensor, dual: Tensor) -> _ConeScaling:
        signs = -torch.ones_like(point)
        signs[0] = 1
        point_norm, dual_norm = _lorentz_norm(point), _lorentz_norm(dual)
        point_unit, dual_unit = point / point_norm, dual / dual_norm
        middle = (point_unit + signs * dual_unit) / (2 * (1 + point_unit @ dual_unit)).sqrt()
        head = ((middle[0] + 1) / 2).sqrt()
        bar = middle / (2 * head)
        bar[0] = head
        beta = (point_norm / dual_norm).sqrt()
        flipped = signs * bar
        inverse = (2 * torch.outer(flipped, flipped) - torch.diag(signs)) / beta
        scaled = beta * (2 * bar * (bar @ dual) - signs * dual)
        return cls(inverse, scaled, point_norm * dual_norm, signs)

    def divide(self, vector: Tensor) -> Tensor:
        """λ∖vector: the v with λ∘v = vector."""
        lam = self.scaled
        head = (self.signs * lam) @ vector / self.determinant
        result = (vector - head * lam) / lam[0]
        result[0] = head
        return result


def _identity(like: Tensor) -> Tensor:
    """The identity (1, 0, ..., 0) of the cone's Jordan product."""
    result = torch.zeros_like(like)
    result[0] = 1
    return result


def _jordan(left: Tensor, right: Tensor) -> Tensor:
    """The cone's Jordan product (lᵀr, l₀r₁ + r₀l₁)."""
    result = left[0] * right + right[0] * left
    result[0] = left @ right
    return result


def _lorentz_norm(vector: Tensor) -> Tensor:
    """sqrt(v₀² − ‖v₁‖²), computed as a product to avoid cancellation near the cone's surface."""
    tail = vector[1:].norm()
    return ((vector[0] - tail) * (vector[0] + tail)).clamp(min=0).sqrt()


def _cone_shrink(cone: _ConeScaling, steps: Tensor) -> Tensor:
    """1/α for the first α > 0 with λ + α·step on the cone's surface (0 if none), for each row of `steps`.

    (λ + αd)ᵀJ(λ + αd) = aα² + bα + c has its first positive root at 2c/(sqrt(b² − 4ac) − b)
    whenever that denominator is positive (c = λᵀJλ > 0 as λ is inside).
    """
    flipped = steps * cone.signs
    a, b, c = (steps * flipped).sum(1), 2 * (flipped @ cone.scaled), cone.determinant
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
