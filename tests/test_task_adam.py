"""Adam on task-specific parameters counts each task row's own steps (docs/mtsac.md, "How the combiners plug in").

A sampling combiner (SDMGrad-OS) steps a task's own slices (its heads, its log α) only when it
draws that task. Each row is then bias-corrected by the number of steps it took, exactly as if the
task had its own Adam; shared parameters count every update that was taken. Checked against an
independent float64 Adam loop, eagerly and with the steps decided on the device, through a
checkpoint and from a checkpoint of the older format (one count for the whole tensor).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtrl.optim import NetworkParameters, Optimization

K, LR, BETAS, EPS = 4, 0.01, (0.9, 0.999), 1e-8
UPDATES = 12
MODES = pytest.mark.parametrize("device_steps", [False, True], ids=["eager", "device_steps"])


class ReferenceAdam:
    """Adam (Kingma & Ba, 2015, Algorithm 1) in float64 with one step count per row of `start`."""

    def __init__(self, start: np.ndarray) -> None:
        self.theta = start.astype(np.float64).copy()
        self.m, self.v = np.zeros_like(self.theta), np.zeros_like(self.theta)
        self.t = np.zeros(self.theta.shape[0])

    def step(self, grad: np.ndarray, rows: np.ndarray) -> None:
        beta1, beta2 = BETAS
        for k in np.flatnonzero(rows):
            self.t[k] += 1
            self.m[k] = beta1 * self.m[k] + (1 - beta1) * grad[k]
            self.v[k] = beta2 * self.v[k] + (1 - beta2) * grad[k] ** 2
            m_hat, v_hat = self.m[k] / (1 - beta1 ** self.t[k]), self.v[k] / (1 - beta2 ** self.t[k])
            self.theta[k] -= LR * m_hat / (np.sqrt(v_hat) + EPS)


def parameters() -> NetworkParameters:
    g = torch.Generator().manual_seed(0)
    shared = {"w": torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))}
    task = {
        "head": torch.nn.Parameter(torch.randn(K, 2, 3, generator=g, dtype=torch.float64)),
        "log_alpha": torch.nn.Parameter(torch.randn(K, generator=g, dtype=torch.float64)),
    }
    return NetworkParameters(shared, task)


def schedule() -> list[tuple[torch.Tensor, bool, dict[str, torch.Tensor]]]:
    """Per update: the drawn tasks (sorted indices, about half of them), whether it is finite, the gradients."""
    g = torch.Generator().manual_seed(1)
    out = []
    for update in range(UPDATES):
        drawn = torch.nonzero(torch.rand(K, generator=g) < 0.4).flatten()
        if drawn.numel() == 0:
            drawn = torch.tensor([update % K])
        if update == 0:
            drawn = torch.tensor([1, 3])  # tasks 0 and 2 wait: their first step comes later
        grads = {
            "w": torch.randn(3, generator=g, dtype=torch.float64),
            "head": torch.randn(K, 2, 3, generator=g, dtype=torch.float64),
            "log_alpha": torch.randn(K, generator=g, dtype=torch.float64),
        }
        out.append((drawn, update not in (3, 7), grads))
    return out


def optimization(params: NetworkParameters, optimizer: str) -> Optimization:
    return Optimization({"net": params}, optimizer, {"net": LR}, K)


def take(opt: Optimization, params: NetworkParameters, update, device_steps: bool) -> None:
    drawn, finite, grads = update
    for name, p in {**params.shared, **params.task}.items():
        p.grad = grads[name].clone()
    matrix = grads["w"].expand(K, 3).clone()  # AdaTask's G (every task the same gradient)
    if device_steps:
        opt.prepare_device_steps()
        opt.step_where("net", matrix, drawn, torch.tensor(finite))
    elif finite:  # the eager update steps only when finite
        opt.step("net", matrix, drawn)


def references(params: NetworkParameters) -> dict[str, ReferenceAdam]:
    return {name: ReferenceAdam(p.detach().numpy()) for name, p in params.task.items()}


def reference_step(refs: dict[str, ReferenceAdam], update) -> None:
    drawn, finite, grads = update
    rows = np.zeros(K, dtype=bool)
    rows[drawn.numpy()] = finite
    for name, ref in refs.items():
        ref.step(grads[name].numpy(), rows)


def assert_as_reference(params: NetworkParameters, refs: dict[str, ReferenceAdam], where: str) -> None:
    for name, ref in refs.items():
        np.testing.assert_allclose(params.task[name].detach().numpy(), ref.theta, rtol=1e-13, atol=1e-15, err_msg=where)


@MODES
@pytest.mark.parametrize("optimizer", ["adam", "adatask"])
def test_each_task_row_steps_with_its_own_adam(device_steps, optimizer):
    params = parameters()
    opt, refs = optimization(params, optimizer), references(params)
    for i, update in enumerate(schedule()):
        take(opt, params, update, device_steps)
        reference_step(refs, update)
        assert_as_reference(params, refs, f"update {i}")
    counts = opt.state_dict()["net"]["adam"]["state"]
    drawn_and_finite = sum(np.isin(np.arange(K), d.numpy()) for d, finite, _ in schedule() if finite)
    for count in [c["step"] for c in counts.values() if c["step"].dim() == 1]:
        assert count.tolist() == drawn_and_finite.tolist()


@MODES
def test_shared_parameters_count_every_update_taken(device_steps):
    params = parameters()
    opt = optimization(params, "adam")
    ref = ReferenceAdam(params.shared["w"].detach().numpy()[None])
    for update in schedule():
        take(opt, params, update, device_steps)
        ref.step(update[2]["w"].numpy()[None], np.array([update[1]]))
    np.testing.assert_allclose(params.shared["w"].detach().numpy(), ref.theta[0], rtol=1e-13, atol=1e-15)


@MODES
def test_per_row_counts_go_through_a_checkpoint(device_steps):
    params = parameters()
    opt, refs = optimization(params, "adam"), references(params)
    updates = schedule()
    for update in updates[:5]:
        take(opt, params, update, device_steps)
        reference_step(refs, update)
    saved = opt.state_dict()
    resumed = optimization(params, "adam")
    resumed.load_state_dict(saved)
    for update in updates[5:]:
        take(resumed, params, update, device_steps)
        reference_step(refs, update)
    assert_as_reference(params, refs, "after the resume")


@MODES
def test_a_checkpoint_with_one_count_per_tensor_loads_as_that_count_for_every_row(device_steps):
    params = parameters()
    opt = optimization(params, "adam")
    take(opt, params, (torch.arange(K), True, schedule()[0][2]), device_steps=False)
    saved = opt.state_dict()
    for state in saved["net"]["adam"]["state"].values():
        state["step"] = torch.tensor(5.0)  # as older versions saved it: one count for the whole tensor
    resumed = optimization(params, "adam")
    resumed.load_state_dict(saved)
    counts = [s["step"] for s in resumed.state_dict()["net"]["adam"]["state"].values()]
    assert sorted(tuple(c.shape) for c in counts) == [(), (K,), (K,)]
    assert all(c.eq(5).all() for c in counts)
    take(resumed, params, schedule()[1], device_steps)  # and it steps
