"""Every combiner: shared properties, limits, and the exact solvers against cvxpy.

The reference solutions are computed by cvxpy (a general-purpose convex solver) directly on
the n-dimensional primal or dual of each method as shared/spec/combiners.md states it.
"""

import math

import cvxpy as cp
import numpy as np
import pytest
import torch

from mtrl.combiners import COMBINERS, make_combiner

ALL = sorted(COMBINERS)
SCALE_EQUIVARIANT = ["mean", "cagrad", "conicgrad", "sdmgrad", "sdmgrad_os", "imgrad", "mgda", "pcgrad"]


def conflicting(k: int, n: int, seed: int) -> torch.Tensor:
    """A shared direction plus task-specific parts, a third of the tasks pulling against it."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(n, generator=g, dtype=torch.float64)
    rows = 0.6 * common + torch.randn(k, n, generator=g, dtype=torch.float64)
    sign = torch.ones(k, 1, dtype=torch.float64)
    sign[: max(1, k // 3)] = -0.5
    return rows * sign


def combine(name: str, matrix: torch.Tensor, seed: int = 0, **hp) -> torch.Tensor:
    return make_combiner(name, **hp)(matrix, generator=torch.Generator().manual_seed(seed))


# ----- shared properties -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_finite(name, dtype):
    matrix = conflicting(5, 30, 0).to(dtype)
    d = combine(name, matrix)
    assert d.shape == (30,) and d.dtype == dtype and d.device == matrix.device
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("scale", [0.0, 1e-20, 1e20])
def test_finite_on_zero_tiny_and_huge_inputs(name, scale):
    matrix = conflicting(4, 12, 1) * scale
    d = combine(name, matrix)
    assert torch.isfinite(d).all()
    if scale == 0.0:
        assert torch.count_nonzero(d) == 0


@pytest.mark.parametrize("name", SCALE_EQUIVARIANT)
def test_scale_equivariance(name):
    matrix = conflicting(4, 12, 2)
    # iterative solvers converge to ~1e-5; a non-equivariant method would be off by O(1)
    torch.testing.assert_close(combine(name, 7.5 * matrix), 7.5 * combine(name, matrix), rtol=1e-3, atol=1e-6)


def test_nashmtl_norm_is_sqrt_k_at_any_scale():
    for scale in (1e-3, 1.0, 1e3):
        matrix = conflicting(6, 40, 3) * scale
        d = combine("nashmtl", matrix)
        # the fixed point alpha_i (A alpha)_i = 1 gives d.d = sum_i alpha_i (A alpha)_i = K
        assert d.norm().item() == pytest.approx(math.sqrt(6), rel=1e-4)


@pytest.mark.parametrize("name", [n for n in ALL if n != "pcgrad"])
def test_permutation_invariance(name):
    matrix = conflicting(6, 20, 4)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(combine(name, matrix[perm]), combine(name, matrix), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_identical_rows(name):
    g = conflicting(1, 15, 5)[0]
    d = combine(name, g.expand(4, 15).clone())
    expected = {
        "cagrad": (1 + 0.4) / (1 + 0.4**2),  # (1 + c) g / r with the defaults c = 0.4, rescale 1
        "imgrad": (1 + 0.8) / (1 + 0.8**2),
    }.get(name)
    if name == "nashmtl":  # alpha = 1/(sqrt(K)|g|) per task: d = sqrt(K) g/|g|
        torch.testing.assert_close(d, 2.0 * g / g.norm(), rtol=1e-5, atol=1e-8)
    else:
        torch.testing.assert_close(d, (expected or 1.0) * g, rtol=1e-5, atol=1e-8)


def test_two_opposing_rows():
    g = torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]], dtype=torch.float64)
    for name in ("mean", "mgda", "pcgrad", "sdmgrad", "cagrad", "conicgrad"):
        assert combine(name, g).abs().max() < 1e-9, name


def test_pcgrad_projects_conflicts_away_and_is_deterministic_per_generator():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    d = combine("pcgrad", g)
    # g1 against g2: g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2 against g1: (0, 1); mean (0.25, 0.75)
    torch.testing.assert_close(d, torch.tensor([0.25, 0.75], dtype=torch.float64))
    matrix = conflicting(8, 20, 6)
    assert torch.equal(combine("pcgrad", matrix, seed=3), combine("pcgrad", matrix, seed=3))
    assert not torch.equal(combine("pcgrad", matrix, seed=3), combine("pcgrad", matrix, seed=4))


# ----- limits ------------------------------------------------------------------------------------
def test_limits_reduce_to_the_mean():
    matrix = conflicting(5, 25, 7)
    mean = matrix.mean(0)
    torch.testing.assert_close(combine("cagrad", matrix, c=0.0), mean)
    torch.testing.assert_close(combine("conicgrad", matrix, c=1.0), mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(combine("sdmgrad", matrix, lam=1e6), mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(combine("sdmgrad", matrix, lam=1e-9), combine("mgda", matrix), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "hp", "message"),
    [
        ("cagrad", {"c": -0.1}, "`c`"),
        ("cagrad", {"rescale": 3}, "`rescale`"),
        ("cagrad", {"solver": "fast"}, "`solver`"),
        ("conicgrad", {"c": 1.3}, "`c`"),
        ("conicgrad", {"c": 0.0}, "`c`"),
        ("sdmgrad", {"lam": -1.0}, "`lam`"),
        ("sdmgrad_os", {"n": 0}, "`n`"),
        ("imgrad", {"variant": "blog"}, "`variant`"),
        ("mean", {"c": 0.5}, "unknown hyper-parameter 'c'"),
        ("fancy", {}, "unknown combiner 'fancy'"),
    ],
)
def test_bad_hyper_parameters_name_the_parameter_and_value(name, hp, message):
    with pytest.raises(ValueError) as info:
        make_combiner(name, **hp)
    assert message in str(info.value)


# ----- SDMGrad-OS task selection -------------------------------------------------------------------
def test_sdmgrad_os_selection_is_sorted_nonempty_seeded_and_has_the_right_rate():
    comb = make_combiner("sdmgrad_os", n=4)
    draws = [comb.select_tasks(10, torch.Generator().manual_seed(s)) for s in range(2000)]
    for d in draws[:50]:
        assert d.numel() >= 1 and torch.equal(d, d.sort().values)
    assert torch.equal(comb.select_tasks(10, torch.Generator().manual_seed(9)), draws[9])
    counts = torch.zeros(10)
    for d in draws:
        counts[d] += 1
    assert (counts / 2000).mean().item() == pytest.approx(0.4, abs=0.02)  # n/K, nudged up by redraws of empty sets


# ----- exact solvers against cvxpy --------------------------------------------------------------
K_VALUES = [2, 3, 10, 50]


def _problem(k: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    matrix = conflicting(k, 2 * k + 6, 10 + k)
    g = matrix.numpy()
    return matrix, g, g.mean(0)


def _solve(objective, constraints) -> None:
    cp.Problem(objective, constraints).solve(solver=cp.CLARABEL)


@pytest.mark.parametrize("k", K_VALUES)
def test_mgda_matches_cvxpy(k):
    matrix, g, _ = _problem(k)
    w = cp.Variable(k)
    _solve(cp.Minimize(cp.sum_squares(g.T @ w)), [w >= 0, cp.sum(w) == 1])
    np.testing.assert_allclose(combine("mgda", matrix).numpy(), g.T @ w.value, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_exact_matches_cvxpy(k, c):
    matrix, g, g0 = _problem(k)
    w = cp.Variable(k)
    gw = g.T @ w
    norm_g0 = np.linalg.norm(g0)
    _solve(cp.Minimize(gw @ g0 + c * norm_g0 * cp.norm(gw)), [w >= 0, cp.sum(w) == 1])
    gw_star = g.T @ w.value
    expected = (g0 + c * norm_g0 * gw_star / np.linalg.norm(gw_star)) / (1 + c**2)
    d = combine("cagrad", matrix, c=c).numpy()
    np.testing.assert_allclose(d, expected, rtol=1e-3, atol=1e-4 * np.linalg.norm(expected))
    # the primal's guarantee: d stays in the ball ||d r - g0|| <= c ||g0||
    assert np.linalg.norm(d * (1 + c**2) - g0) <= c * norm_g0 * (1 + 1e-6)


@pytest.mark.parametrize("k", K_VALUES)
def test_sdmgrad_exact_matches_cvxpy(k):
    matrix, g, g0 = _problem(k)
    lam = 0.6
    w = cp.Variable(k)
    _solve(cp.Minimize(0.5 * cp.sum_squares(g.T @ w + lam * g0)), [w >= 0, cp.sum(w) == 1])
    expected = (g.T @ w.value + lam * g0) / (1 + lam)
    np.testing.assert_allclose(combine("sdmgrad", matrix, lam=lam).numpy(), expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("k", K_VALUES)
def test_conicgrad_matches_the_cvxpy_primal(k):
    matrix, g, g0 = _problem(k)
    c = 0.5
    d, t = cp.Variable(g.shape[1]), cp.Variable()
    norm_g0 = np.linalg.norm(g0)
    _solve(cp.Maximize(t), [g @ d >= t, cp.norm(d) <= 1, c * norm_g0 * cp.norm(d) <= g0 @ d])
    ours = combine("conicgrad", matrix, c=c).numpy()
    if t.value <= 1e-9:  # no direction in the cone helps every task: the spec returns g0
        np.testing.assert_allclose(ours, g0, rtol=1e-6)
    else:
        np.testing.assert_allclose(ours, norm_g0 * d.value, rtol=1e-3, atol=1e-4 * norm_g0)
        assert (g @ ours).min() / norm_g0 == pytest.approx(t.value, rel=1e-3)


@pytest.mark.parametrize("k", K_VALUES)
def test_imgrad_paper_matches_cvxpy(k):
    matrix, g, g0 = _problem(k)
    c = 0.8
    w_m = cp.Variable(k)
    _solve(cp.Minimize(cp.sum_squares(g.T @ w_m)), [w_m >= 0, cp.sum(w_m) == 1])
    g_m = g.T @ w_m.value
    mu = max(g_m @ g0 / (np.linalg.norm(g_m) * np.linalg.norm(g0)), 0.0)
    w = cp.Variable(k)
    gw = g.T @ w
    norm_g0 = np.linalg.norm(g0)
    objective = (1 - mu) * (gw @ g0 + c * norm_g0 * cp.norm(gw)) + mu * cp.sum_squares(gw)
    _solve(cp.Minimize(objective), [w >= 0, cp.sum(w) == 1])
    gw_star = g.T @ w.value
    expected = (g0 + c * norm_g0 * gw_star / np.linalg.norm(gw_star)) / (1 + c**2)
    d = combine("imgrad", matrix, c=c, variant="paper").numpy()
    np.testing.assert_allclose(d, expected, rtol=2e-3, atol=2e-4 * np.linalg.norm(expected))


@pytest.mark.parametrize("k", K_VALUES)
def test_nashmtl_solves_its_equations(k):
    matrix, g, _ = _problem(k)
    comb = make_combiner("nashmtl")
    d = comb(matrix)
    alpha = comb.last_weights.numpy()
    a = g @ g.T
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha * (a @ alpha), np.ones(k), rtol=1e-5)
    np.testing.assert_allclose(d.numpy(), g.T @ alpha, rtol=1e-6)
    state = comb.state_dict()
    again = make_combiner("nashmtl")
    again.load_state_dict(state)
    torch.testing.assert_close(again(matrix), d, rtol=1e-6, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_cuda_results_match_cpu(name):
    matrix = conflicting(10, 64, 11)
    torch.testing.assert_close(combine(name, matrix.cuda()).cpu(), combine(name, matrix), rtol=1e-4, atol=1e-6)


# ----- the authors' Meta-World recipes, step for step ---------------------------------------------
def _project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the simplex (sort-based)."""
    u = v.sort(descending=True).values
    css = u.cumsum(0) - 1
    idx = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int((u - css / idx > 0).nonzero().max())
    return (v - css[rho] / (rho + 1)).clamp(min=0)


def _recipe(matrix: torch.Tensor, objective, start: torch.Tensor, lr: float, project: bool) -> torch.Tensor:
    """21 evaluations, keep the best (compared before stepping), SGD momentum 0.5 after each of the first 20."""
    x = start.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr, momentum=0.5)
    best, best_x = math.inf, None
    for i in range(21):
        value = objective(x)
        if value.item() < best:
            best, best_x = value.item(), x.detach().clone()
        if i < 20:
            opt.zero_grad()
            value.backward()
            opt.step()
            if project:
                with torch.no_grad():
                    x.copy_(_project_simplex(x))
    return best_x


def _scaled(matrix: torch.Tensor):
    a = matrix @ matrix.T
    s = torch.sqrt(a.diagonal() + 1e-4).mean()
    scaled = a / s**2
    b = scaled.mean(1)
    return scaled, b, b.mean()


@pytest.mark.parametrize("k", [10, 50])
def test_cagrad_mtrl_recipe_step_for_step(k):
    matrix, c = conflicting(k, 3 * k, 20 + k), 0.9
    scaled, b, gg = _scaled(matrix)
    cc = c * torch.sqrt(gg + 1e-4)

    def objective(v):
        w = v.softmax(0)
        return w @ b + cc * torch.sqrt(w @ scaled @ w + 1e-4)

    v = _recipe(matrix, objective, torch.zeros(k, dtype=torch.float64), 50.0 if k == 50 else 25.0, project=False)
    w = v.softmax(0)
    lam = cc / (torch.sqrt(w @ scaled @ w + 1e-4) + 1e-4)
    expected = ((1 / k + lam * w) @ matrix) / (1 + c**2)
    torch.testing.assert_close(combine("cagrad", matrix, c=c, solver="mtrl"), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("name", "k"), [("sdmgrad", 10), ("sdmgrad", 50), ("sdmgrad_os", 10)])
def test_sdmgrad_mtrl_recipe_step_for_step(name, k):
    matrix, lam = conflicting(k, 3 * k, 30 + k), 0.6
    scaled, b, gg = _scaled(matrix)

    def objective(w):
        return w @ scaled @ w + 2 * lam * (w @ b) + lam**2 * gg

    lr = 50.0 if (k == 50 or name == "sdmgrad_os") else 25.0
    w = _recipe(matrix, objective, torch.full((k,), 1 / k, dtype=torch.float64), lr, project=True)
    expected = (w @ matrix + lam * matrix.mean(0)) / (1 + lam)
    torch.testing.assert_close(combine(name, matrix, lam=lam, solver="mtrl"), expected, rtol=1e-6, atol=1e-9)
