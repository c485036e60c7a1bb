"""The per-task gradient stage: one vmapped pass equals K separate autograd calls."""

import pytest
import torch
from torch.func import functional_call

from mtrl.jacobian import (
    JacobianBuffer,
    TaskObjective,
    mean_backward,
    mean_backward_functional,
    task_jacobian,
    write_shared_grad,
    write_task_grads,
)
from mtrl.networks import TwinCritic, task_parameter_names

K, B, OBS, ACT = 4, 6, 5, 2


def _objective(multihead: bool, seed: int = 0) -> tuple[TwinCritic, TaskObjective]:
    torch.manual_seed(seed)
    critic = TwinCritic(OBS, ACT, [16, 16], K, "multihead" if multihead else "conditioned").double()
    names = task_parameter_names(critic)
    shared = {n: p for n, p in critic.named_parameters() if n not in names}
    task = {n: p for n, p in critic.named_parameters() if n in names}
    g = torch.Generator().manual_seed(seed + 1)
    obs = torch.randn(K, B, OBS, generator=g, dtype=torch.float64)
    act = torch.randn(K, B, ACT, generator=g, dtype=torch.float64)
    target = torch.randn(K, B, generator=g, dtype=torch.float64) * torch.arange(1, K + 1)[:, None]

    def loss_fn(shared_p, task_p, inputs, consts):
        o, a, y = inputs
        q1, q2 = functional_call(critic, {**shared_p, **task_p}, (o, a))
        return (q1 - y).pow(2).mean() + (q2 - y).pow(2).mean(), q1.mean()

    return critic, TaskObjective(loss_fn, shared, task, (obs, act, target))


def _reference_task_grads(critic: TwinCritic, objective: TaskObjective) -> list[dict[str, torch.Tensor]]:
    """Task k's loss on its own slice, differentiated with plain autograd, one task at a time."""
    obs, act, target = objective.inputs
    out = []
    for k in range(K):
        # the full-batch forward, then pick task k's loss: no vmap involved
        q1, q2 = critic(obs, act)
        loss = (q1[k] - target[k]).pow(2).mean() + (q2[k] - target[k]).pow(2).mean()
        names, params = zip(*critic.named_parameters(), strict=True)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads, strict=True)})
    return out


@pytest.mark.parametrize("multihead", [False, True])
def test_jacobian_rows_equal_per_task_autograd(multihead):
    critic, objective = _objective(multihead)
    grads = task_jacobian(objective)
    reference = _reference_task_grads(critic, objective)
    expected_rows = torch.stack([torch.cat([r[n].reshape(-1) for n in objective.shared]) for r in reference])
    assert grads.matrix.shape == (K, sum(p.numel() for p in objective.shared.values()))
    torch.testing.assert_close(grads.matrix, expected_rows, rtol=1e-10, atol=1e-12)
    for name in objective.task:  # task k's head gradient is the slice k of its own loss's gradient
        expected = torch.stack([reference[k][name][k] for k in range(K)])
        torch.testing.assert_close(grads.task[name], expected, rtol=1e-10, atol=1e-12)
    assert bool(multihead) == bool(objective.task)


@pytest.mark.parametrize("backward", [mean_backward, mean_backward_functional])
@pytest.mark.parametrize("multihead", [False, True])
def test_mean_stage_equals_plain_mean_loss_backward(multihead, backward):
    """Both forms (autograd eagerly, torch.func while compiling), against `loss.mean().backward()`."""
    critic, objective = _objective(multihead)
    losses, aux = backward(objective)
    staged = {n: p.grad.clone() for n, p in critic.named_parameters()}
    expected_losses, expected_aux = task_jacobian(objective).losses, task_jacobian(objective).aux
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(aux, expected_aux, rtol=1e-12, atol=1e-14)
    assert not losses.requires_grad
    critic.zero_grad(set_to_none=True)

    obs, act, target = objective.inputs
    q1, q2 = critic(obs, act)
    per_task = (q1 - target).pow(2).mean(1) + (q2 - target).pow(2).mean(1)
    per_task.mean().backward()
    for name, p in critic.named_parameters():
        # task-specific slices receive their own task's gradient unchanged (K x the mean's 1/K share)
        expected = p.grad * K if name in objective.task else p.grad
        torch.testing.assert_close(staged[name], expected, rtol=1e-10, atol=1e-12)


def test_selected_tasks_only_compute_those_rows_and_write_back():
    critic, objective = _objective(True)
    full = task_jacobian(objective)
    tasks = torch.tensor([1, 3])
    part = task_jacobian(objective, tasks)
    torch.testing.assert_close(part.matrix, full.matrix[tasks])
    torch.testing.assert_close(part.losses, full.losses[tasks])
    write_task_grads(objective.task, part.task, tasks)
    for name, p in objective.task.items():
        assert torch.count_nonzero(p.grad[[0, 2]]) == 0
        torch.testing.assert_close(p.grad[tasks], full.task[name][tasks])


def test_write_shared_grad_round_trips_the_flat_vector_and_checks_length():
    _, objective = _objective(False)
    n = sum(p.numel() for p in objective.shared.values())
    update = torch.arange(n, dtype=torch.float64)
    write_shared_grad(objective.shared, update)
    flat = torch.cat([p.grad.reshape(-1) for p in objective.shared.values()])
    assert torch.equal(flat, update)
    with pytest.raises(ValueError, match="entries"):
        write_shared_grad(objective.shared, torch.zeros(n + 1, dtype=torch.float64))


def test_a_parameter_the_loss_ignores_gets_zero_gradient_and_counts_in_the_flat_size():
    from mtrl.jacobian import flat_numel

    critic, objective = _objective(multihead=True)
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    objective.shared["unused"] = unused
    losses, _ = mean_backward(objective)
    assert torch.equal(unused.grad, torch.zeros(3, dtype=torch.float64))
    assert losses.shape == (K,)
    assert (
        flat_numel(objective.shared)
        == task_jacobian(objective).matrix.shape[1]
        == 3 + sum(p.numel() for n, p in critic.named_parameters() if n in objective.shared)
    )


def test_a_kept_buffer_holds_the_same_matrix_in_the_same_memory_update_after_update():
    critic, objective = _objective(multihead=True)
    reference = _reference_task_grads(critic, objective)
    expected = torch.stack([torch.cat([r[n].reshape(-1) for n in objective.shared]) for r in reference])
    buffer = JacobianBuffer()
    first = task_jacobian(objective, out=buffer).matrix
    address = first.data_ptr()
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(first, task_jacobian(objective).matrix)  # bit for bit what a fresh matrix holds

    with torch.no_grad():  # the next update: new parameters, the same storage
        for p in critic.parameters():
            p.mul_(0.5)
    second = task_jacobian(objective, out=buffer).matrix
    assert second.data_ptr() == address
    assert torch.equal(second, task_jacobian(objective).matrix)
    assert not torch.equal(second, expected)

    tasks = torch.tensor([3, 1])  # fewer rows: the first rows of the same storage
    subset = task_jacobian(objective, tasks, out=buffer).matrix
    assert subset.shape == (2, first.shape[1]) and subset.data_ptr() == address
    assert torch.equal(subset, task_jacobian(objective, tasks).matrix)


def test_a_kept_buffer_follows_the_dtype_and_the_row_count():
    buffer = JacobianBuffer()
    like = torch.zeros(1, dtype=torch.float64)
    two = buffer.rows(2, 5, like)
    assert two.shape == (2, 5) and two.dtype == torch.float64
    assert buffer.rows(1, 5, like).data_ptr() == two.data_ptr()
    assert buffer.rows(3, 5, like).shape == (3, 5)  # more rows than kept: grown
    assert buffer.rows(3, 5, like.float()).dtype == torch.float32
    assert buffer.rows(3, 4, like).shape == (3, 4)
