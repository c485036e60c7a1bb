import copy

import numpy as np
import pytest
import torch

from mtrl.adatask import AdaTask
from tests.conftest import toy_config


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(3, 2, generator=g, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64)),
    ]


def _grads(k: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(k, 10, generator=g, dtype=torch.float64) * torch.arange(1, k + 1, dtype=torch.float64)[:, None]


def test_one_task_is_exactly_adam():
    ours, ref = _params(), _params()
    ada = AdaTask(ours, num_tasks=1, lr=0.01)
    adam = torch.optim.Adam(ref, lr=0.01)
    for step in range(5):
        grads = _grads(1, step)
        ada.step_tasks(grads)
        ref[0].grad, ref[1].grad = grads[0, :6].view(3, 2), grads[0, 6:]
        adam.step()
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def reference(
    start: np.ndarray, grads: list[np.ndarray], lr: np.ndarray, betas=(0.9, 0.999), eps=1e-8
) -> list[np.ndarray]:
    """AdaTask in float64, literally: per task k, m_k ← β1·m_k + (1−β1)·g_k and v_k ← β2·v_k + (1−β2)·g_k²,
    then θ ← θ − lr·Σ_k m̂_k/(sqrt(v̂_k) + ε) with m̂_k = m_k/(1 − β1^t), v̂_k = v_k/(1 − β2^t).
    Returns θ after each step; `lr` holds each entry's learning rate (its parameter group's)."""
    beta1, beta2 = betas
    theta, first, second, path = start.copy(), np.zeros_like(grads[0]), np.zeros_like(grads[0]), []
    for t, g in enumerate(grads, start=1):
        first = beta1 * first + (1 - beta1) * g
        second = beta2 * second + (1 - beta2) * g**2
        steps = (first / (1 - beta1**t)) / (np.sqrt(second / (1 - beta2**t)) + eps)
        theta = theta - lr * steps.sum(0)
        path.append(theta)
    return path


def flat(params: list[torch.nn.Parameter]) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy()


def test_two_tasks_sum_their_adaptive_steps():
    # After one step m_hat = g and v_hat = g^2, so each task contributes sign(g_k) * |g_k| / (|g_k| + eps).
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    ada = AdaTask(params, num_tasks=2, lr=0.1, eps=1e-8)
    grads = torch.tensor([[1.0, -2.0, 0.5], [3.0, 2.0, 0.0]], dtype=torch.float64)
    ada.step_tasks(grads)
    expected = -0.1 * (grads / (grads.abs() + 1e-8)).sum(0)
    torch.testing.assert_close(params[0].detach(), expected, rtol=1e-15, atol=0)


def test_steps_match_the_reference_per_parameter_group():
    # Three tasks of very different gradient scales, two parameter groups with their own learning rate.
    params = _params()
    ada = AdaTask([{"params": params[:1], "lr": 0.05}, {"params": params[1:]}], num_tasks=3, lr=0.01)
    start = flat(params)
    grads = [_grads(3, step) for step in range(6)]
    expected = reference(start, [g.numpy() for g in grads], np.repeat([0.05, 0.01], [6, 4]))
    for g, theta in zip(grads, expected, strict=True):
        ada.step_tasks(g)
        np.testing.assert_allclose(flat(params), theta, rtol=1e-14, atol=1e-15)


def test_state_dict_round_trip_gives_identical_steps():
    # An optimizer restored from a checkpoint continues exactly like the one that never stopped (moments and
    # the step count behind the bias correction included); one that starts afresh does not.
    a_params, b_params, fresh_params = _params(), _params(), _params()
    a = AdaTask(a_params, num_tasks=3, lr=0.01)
    grads = [_grads(3, step) for step in range(6)]
    for g in grads[:3]:
        a.step_tasks(g)
    with torch.no_grad():
        for p, q, r in zip(b_params, fresh_params, a_params, strict=True):
            p.copy_(r)
            q.copy_(r)
    b = AdaTask(b_params, num_tasks=3, lr=0.01)
    b.load_state_dict(copy.deepcopy(a.state_dict()))  # as a checkpoint would: no shared tensors
    fresh = AdaTask(fresh_params, num_tasks=3, lr=0.01)
    expected = reference(flat(_params()), [g.numpy() for g in grads], np.full(10, 0.01))
    for g, theta in zip(grads[3:], expected[3:], strict=True):
        a.step_tasks(g)
        b.step_tasks(g)
        fresh.step_tasks(g)
        np.testing.assert_allclose(flat(b_params), theta, rtol=1e-14, atol=1e-15)
    for p, q, r in zip(a_params, b_params, fresh_params, strict=True):
        assert torch.equal(p, q) and not torch.allclose(p, r, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tasks": 0}, "`num_tasks` must be >= 1, found 0"),
        ({"num_tasks": 2, "lr": -1.0}, "`lr` must be > 0, found -1.0"),
        ({"num_tasks": 2, "betas": (0.9, 1.0)}, "`betas` must be in [0, 1), found (0.9, 1.0)"),
        ({"num_tasks": 2, "eps": 0.0}, "`eps` must be > 0, found 0.0"),
    ],
)
def test_bad_hyper_parameters_name_themselves(kwargs, message):
    with pytest.raises(ValueError) as info:
        AdaTask(_params(), **kwargs)
    assert str(info.value) == message


def test_wrong_matrix_shape_and_plain_step_are_refused():
    ada = AdaTask(_params(), num_tasks=2)
    with pytest.raises(ValueError, match=r"shape \(2, 10\)"):
        ada.step_tasks(torch.zeros(3, 10, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="step_tasks"):
        ada.step()


def test_training_with_adatask_moves_shared_weights_and_stays_finite(tmp_path):
    from mtrl.trainer import Trainer

    trainer = Trainer(
        toy_config(tmp_path / "run", "optimizer.name=adatask", "agent.architecture=multihead"), tmp_path / "run"
    )
    before = {n: p.detach().clone() for n, p in trainer.agent.critic.named_parameters()}
    assert trainer.train() == 0
    assert trainer.counters.updates == 161 and trainer.counters.bad_updates == 0
    # AdaTask takes the shared parameters of the critic and the actor, Adam their heads and the temperatures
    optimizers = {net: sorted(state) for net, state in trainer.optimization.state_dict().items()}
    assert optimizers == {"critic": ["adam", "adatask"], "actor": ["adam", "adatask"], "alpha": ["adam"]}
    for name, p in trainer.agent.critic.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[name]), name


def test_the_edges_of_the_hyper_parameter_ranges():
    with pytest.raises(ValueError, match="`lr` must be > 0, found 0.0"):
        AdaTask(_params(), num_tasks=2, lr=0.0)
    # beta = 0 is allowed: the moments are then the latest gradient alone, and one task steps like sign-SGD
    params = _params()
    AdaTask(params, num_tasks=1, lr=0.5, betas=(0.0, 0.0), eps=1e-12).step_tasks(
        torch.full((1, 10), -3.0, dtype=torch.float64)
    )
    assert torch.allclose(params[1], _params()[1] + 0.5)


def test_a_plain_step_says_which_method_to_call():
    with pytest.raises(RuntimeError) as err:
        AdaTask(_params(), num_tasks=2).step()
    assert str(err.value) == "AdaTask needs the per-task gradients: call step_tasks(task_grads)"


# ----- AdaTask inside mtrl.optim: clipping the rows, and its refusals ---------------------------------
def _adatask_optimization(grad_clip_norm=None, task_params=False) -> tuple:
    from mtrl.optim import NetworkParameters, Optimization

    w = torch.nn.Parameter(torch.zeros(3))
    task = {"head": torch.nn.Parameter(torch.zeros(2, 1))} if task_params else {}
    params = NetworkParameters({"w": w}, task)
    return Optimization({"critic": params}, "adatask", {"critic": 0.1}, 2, grad_clip_norm), w


def test_clipping_scales_the_rows_adatask_steps_on_by_the_factor_of_the_mean_gradient():
    optimization, w = _adatask_optimization(grad_clip_norm=0.5)
    rows = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # their mean (the .grad) has norm 2
    w.grad = rows.mean(0)
    factor = 0.5 / (2.0 + 1e-6)
    torch.testing.assert_close(optimization.clip("critic", rows), rows * factor)
    torch.testing.assert_close(w.grad, rows.mean(0) * factor)
    w.grad = rows.mean(0) * 0.1  # norm 0.2, under the bound: nothing changes
    torch.testing.assert_close(optimization.clip("critic", rows * 0.1), rows * 0.1)
    tiny, _ = _adatask_optimization(grad_clip_norm=1e-6)  # where the 1e-6 in the divisor matters
    tiny_w = tiny["critic"].params.shared["w"]
    tiny_w.grad = rows.mean(0) * 1e-6  # norm 2e-6: factor 1e-6 / 3e-6
    torch.testing.assert_close(tiny.clip("critic", rows * 1e-6), rows * 1e-6 / 3, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("optimizer", ["adam", "adatask"])
def test_each_optimizer_steps_with_its_own_learning_rate(optimizer):
    """Adam's and AdaTask's first step moves each weight by about its learning rate (m/sqrt(v) = sign(g))."""
    from mtrl.optim import NetworkParameters, Optimization

    w = torch.nn.Parameter(torch.zeros(3))
    head = torch.nn.Parameter(torch.zeros(2, 1))
    optimization = Optimization({"critic": NetworkParameters({"w": w}, {"head": head})}, optimizer, {"critic": 0.05}, 2)
    rows = torch.tensor([[1.0, -2.0, 3.0], [1.0, -2.0, 3.0]])
    w.grad, head.grad = rows.mean(0), torch.ones(2, 1)
    optimization.step("critic", rows)
    scale = 2 if optimizer == "adatask" else 1  # AdaTask sums the tasks' adaptive steps
    torch.testing.assert_close(w.detach(), -0.05 * scale * torch.tensor([1.0, -1.0, 1.0]), rtol=1e-4, atol=0.0)
    torch.testing.assert_close(head.detach(), torch.full((2, 1), -0.05), rtol=1e-4, atol=0.0)


def test_a_first_step_on_a_subset_of_tasks_leaves_the_others_and_their_fresh_moments_at_zero():
    from mtrl.optim import NetworkParameters, Optimization

    head = torch.nn.Parameter(torch.zeros(3, 2))
    optimization = Optimization({"actor": NetworkParameters({}, {"head": head})}, "adam", {"actor": 0.1}, 3)
    head.grad = torch.ones(3, 2)
    optimization.step("actor", None, drawn=torch.tensor([1]))  # no optimizer state exists yet
    assert torch.equal(head.detach()[[0, 2]], torch.zeros(2, 2))
    assert (head.detach()[1] < 0).all()
    state = optimization["actor"].task_optimizer.state[head]
    assert torch.equal(state["exp_avg"][[0, 2]], torch.zeros(2, 2)) and (state["exp_avg"][1] > 0).all()


def test_a_network_without_a_learning_rate_is_refused():
    from mtrl.optim import NetworkParameters, Optimization

    params = NetworkParameters({"w": torch.nn.Parameter(torch.zeros(1))}, {})
    with pytest.raises(ValueError, match=r"^no learning rate for network\(s\) \['critic'\]$"):
        Optimization({"critic": params}, "adam", {"actor": 0.1}, 2)


def test_adatask_refuses_what_it_cannot_step_on():
    from mtrl.optim import AdaTaskOptimizer, NetworkParameters

    with pytest.raises(ValueError, match=r"^AdaTask needs shared parameters; a network without them steps with Adam$"):
        AdaTaskOptimizer(NetworkParameters({}, {"head": torch.nn.Parameter(torch.zeros(2, 1))}), 0.1, 2)
    optimization, w = _adatask_optimization()
    w.grad = torch.zeros(3)
    with pytest.raises(ValueError, match=r"^AdaTask steps on the per-task gradient matrix; none was given$"):
        optimization.step("critic", None)


@pytest.mark.parametrize("task_params", [False, True])
def test_adatask_state_must_hold_exactly_its_parts(task_params):
    optimization, _ = _adatask_optimization(task_params=task_params)
    state = optimization.state_dict()
    assert sorted(state["critic"]) == (["adam", "adatask"] if task_params else ["adatask"])
    optimization.load_state_dict(state)
    wrong = (
        {"critic": {k: v for k, v in state["critic"].items() if k != "adam"}}
        if task_params
        else {
            "critic": {**state["critic"], "adam": torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]).state_dict()}
        }
    )
    with pytest.raises(ValueError, match="optimizer state holds"):
        optimization.load_state_dict(wrong)
