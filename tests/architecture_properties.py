"""Checks every architecture must pass, shared by the tests/test_architecture_<name>.py files.

- Task isolation: on the ordinary modules (plain autograd on the full `[K, B, in]` forward, no
  vmap), task k's loss has exactly zero gradient on every other task's rows of the task-owned
  parameters; and what the per-task Jacobian hands each task's rows equals that plain gradient.
- Every combiner (the registry, so new ones join automatically) and AdaTask: a few updates are
  finite and change the weights, and an update resumed from a checkpoint written to disk continues
  bit for bit like the uninterrupted run; the device-step update equals the eager one.
- A toy run learns (slow).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from mtrl.bench import bench_networks
from mtrl.buffer import Batch
from mtrl.combiners import COMBINERS, make_combiner
from mtrl.compiled import CompiledUpdate
from mtrl.config import load_config
from mtrl.jacobian import task_jacobian
from mtrl.networks import Actor, NetworkShape, TwinCritic, architecture_class, task_parameter_names
from mtrl.optim import Optimization
from mtrl.sac import MTSAC, SACUpdate
from mtrl.trainer import Trainer
from tests.conftest import toy_config

K, B, OBS, ACT = 3, 4, 5, 2
HIDDEN = [8, 7]
OPTIMIZERS = ("adatask",)  # beside the combiners: the task-wise optimizer, which replaces the combiner
ArchitectureContract_FAST = ("mean", "sdmgrad_os")  # the combiner matrix's subset in the default suite


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks on one thread: on a busy machine, handing a small op to a second thread costs
    more than the op (a softmax over 3×4 rows took 30 ms with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(architecture: str) -> dict:
    """Hyper-parameters that keep the networks tiny (every architecture's own keys, small)."""
    return {
        "soft_modules": {"num_layers": 3, "num_modules": 2, "module_width": 6, "routing_width": 5},
        "film": {"encoder_width": 6, "embedding_dim": 8},
        "care": {"num_experts": 3, "encoder_width": 6, "embedding_dim": 8},
        "moore": {"num_experts": 3},
        "paco": {"num_parameter_sets": 3},
    }.get(architecture, {})


def network(architecture: str, in_dim: int = OBS + K, out_dim: int = 3, dtype=torch.float64, **hyper):
    """The bare network of `architecture` (seeded), on an input that ends with the one-hot."""
    cls = architecture_class(architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        shape = NetworkShape(in_dim, out_dim, K, one_hot_at=in_dim - K)
        return cls(shape, HIDDEN, cls.Parameters(**{**small(architecture), **hyper})).to(dtype)


def inputs(seed: int = 1, dtype=torch.float64, obs: int = OBS) -> torch.Tensor:
    """`[K, B, obs + K]`: random states, each task's one-hot at the end."""
    g = torch.Generator().manual_seed(seed)
    one_hot = torch.eye(K, dtype=dtype)[:, None, :].expand(K, B, K)
    return torch.cat([torch.randn(K, B, obs, generator=g, dtype=dtype), one_hot], -1)


def agent(architecture: str, **agent_keys) -> MTSAC:
    cfg = load_config(
        None,
        [f"agent.architecture={architecture}", f"agent.hidden_sizes={HIDDEN}", "agent.init_temperature=0.3"]
        + [f"agent.{k}={v}" for k, v in {**small(architecture), **agent_keys}.items()],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MTSAC(OBS + K, ACT, K, cfg.agent).double()


def batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    action = torch.rand(K, B, ACT, generator=g, dtype=torch.float64) * 2 - 1
    reward = torch.randn(K, B, generator=g, dtype=torch.float64)
    zeros = torch.zeros(K, B, dtype=torch.float64)
    return Batch(inputs(seed), action, reward, inputs(seed + 100), zeros, zeros)


# ----- task isolation ----------------------------------------------------------------------------
def check_task_isolation(architecture: str) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        actor = Actor(OBS + K, ACT, HIDDEN, K, -5.0, 2.0, architecture, small(architecture)).double()
        critic = TwinCritic(OBS + K, ACT, HIDDEN, K, architecture, small(architecture)).double()
        action = torch.rand(K, B, ACT, dtype=torch.float64)
    obs = inputs()
    nets = ((actor, lambda: sum(actor(obs))), (critic, lambda: sum(critic(obs, action))))
    for net, outputs in nets:
        names = task_parameter_names(net)
        assert bool(names) == (architecture != "conditioned"), names
        params = dict(net.named_parameters())
        for k in range(K if names else 0):
            loss = outputs()[k].pow(2).sum()  # task k's samples only
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            touched = False
            for name, g in zip(names, grads, strict=True):
                g = torch.zeros_like(params[name]) if g is None else g
                others = torch.cat([g[:k], g[k + 1 :]])
                assert torch.equal(others, torch.zeros_like(others)), (name, k)
                touched |= bool(g[k].abs().sum() > 0)
            assert touched, f"task {k}'s loss reaches none of its own parameters"


def check_jacobian_hands_each_task_its_own_gradient(architecture: str) -> None:
    """The per-task Jacobian's task-owned gradients equal plain autograd on task k's loss (row k),
    and its shared rows equal the plain gradients of each task's loss."""
    model, data = agent(architecture), batch(3)
    objective = model.critic_objective(data, data.reward)
    grads = task_jacobian(objective)
    for k in range(K):
        q1, q2 = model.critic(data.obs, data.action)
        loss = (q1[k] - data.reward[k]).pow(2).mean() + (q2[k] - data.reward[k]).pow(2).mean()
        shared = list(objective.shared.values())
        plain = torch.autograd.grad(loss, [*shared, *objective.task.values()], allow_unused=True)
        plain = [torch.zeros_like(p) if g is None else g for g, p in zip(plain, objective.parameters(), strict=True)]
        row = torch.cat([g.reshape(-1) for g in plain[: len(shared)]])
        torch.testing.assert_close(grads.matrix[k], row, rtol=1e-10, atol=1e-12)
        for name, g in zip(objective.task, plain[len(shared) :], strict=True):
            torch.testing.assert_close(grads.task[name][k], g[k], rtol=1e-10, atol=1e-12)


# ----- every combiner: finite updates, exact resume --------------------------------------------
def _update(architecture: str, method: str, device_steps: bool = False) -> SACUpdate | CompiledUpdate:
    model = agent(architecture)
    optimizer = "adatask" if method == "adatask" else "adam"
    optimization = Optimization(model.params, optimizer, model.learning_rates, K, grad_clip_norm=1.0)
    combiner = make_combiner("mean" if method == "adatask" else method)
    # critic and actor, or the critic alone for a combiner that weighs only the critic's losses
    update = SACUpdate(model, optimization, combiner, bench_networks(combiner))
    return CompiledUpdate(update, "none") if device_steps else update


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


def _save(update: SACUpdate, generators: tuple[torch.Generator, torch.Generator]) -> bytes:
    state = {
        "agent": update.agent.state_dict(),
        "optimizers": update.optimization.state_dict(),
        "combiner": update.combiner.state_dict(),
        "rng": [g.get_state() for g in generators],
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _load(update: SACUpdate, data: bytes) -> tuple[torch.Generator, torch.Generator]:
    state = torch.load(io.BytesIO(data), weights_only=True)
    update.agent.load_state_dict(state["agent"])
    update.optimization.load_state_dict(state["optimizers"])
    update.combiner.load_state_dict(state["combiner"])
    generators = _generators(0)
    for g, s in zip(generators, state["rng"], strict=True):
        g.set_state(s)
    return generators


def _equal(a, b) -> bool:
    """Nested states (dicts, lists, tensors, numbers) equal value for value."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def check_updates_are_finite_and_resume_exactly(architecture: str, method: str, steps: int = 2) -> None:
    straight = _update(architecture, method)
    initial = {k: v.clone() for k, v in straight.agent.state_dict().items()}
    generators = _generators(0)
    for i in range(steps):
        assert straight(batch(10 + i), *generators).finite
    checkpoint = _save(straight, generators)
    state = straight.agent.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    changed = {k.split(".")[0] for k, v in state.items() if not torch.equal(v, initial[k])}
    assert {"actor", "critic", "critic_target"} <= changed, changed
    for i in range(steps):
        straight(batch(20 + i), *generators)

    resumed = _update(architecture, method)
    generators = _load(resumed, checkpoint)
    for i in range(steps):
        resumed(batch(20 + i), *generators)
    expected, found = straight.agent.state_dict(), resumed.agent.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name
    for part in ("optimization", "combiner"):  # their states too, value by value
        assert _equal(getattr(straight, part).state_dict(), getattr(resumed, part).state_dict()), part


def check_device_steps_equal_the_eager_update(architecture: str, method: str) -> None:
    eager, device = _update(architecture, method), _update(architecture, method, device_steps=True)
    for update in (eager, device):
        generators = _generators(0)
        for i in range(2):
            update(batch(10 + i), *generators)
    found = device.agent.state_dict()
    for name, tensor in eager.agent.state_dict().items():
        torch.testing.assert_close(found[name], tensor, rtol=1e-12, atol=1e-14, msg=name)


# ----- a toy run learns -----------------------------------------------------------------------------
def check_toy_run_learns(architecture: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
    """As tests/test_trainer.py's toy run: from 0 successes before learning to most episodes solved."""
    run = tmp_path / "run"
    overrides = [f"agent.architecture={architecture}"]
    overrides += ["env.max_episode_steps=30", "agent.hidden_sizes=[64,64]", "train.batch_per_task=64"]
    overrides += ["train.total_steps=2500", "eval.every=500", "eval.episodes=10", "log.every=500", *extra]
    trainer = Trainer(toy_config(run, *overrides), run)
    assert trainer.train() == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/mean_success"] for r in records if r["kind"] == "eval"]
    assert evals[0] == 0.0
    assert evals[-1] >= 0.7, evals


def check_undrawn_tasks_keep_their_own_parameters(architecture: str) -> None:
    """SDMGrad-OS drawing one task of K: the other tasks' task-owned rows, and their Adam moments, stay put."""
    model = agent(architecture)
    optimization = Optimization(model.params, "adam", model.learning_rates, K)
    update = SACUpdate(model, optimization, make_combiner("sdmgrad_os", n=1), ("critic", "actor"))
    drawn = update.draw_tasks(K, torch.Generator().manual_seed(1), torch.device("cpu"))
    (only,) = drawn.tolist()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert update(batch(5), torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)).finite
    for net in ("critic", "actor"):
        for name, p in model.params[net].task.items():
            full = f"{net}.{name}"
            for k in range(K):
                assert torch.equal(p[k], before[full][k]) == (k != only), (full, k)
            moments = optimization[net].adam.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                others = torch.cat([moments[key][:only], moments[key][only + 1 :]])
                assert torch.equal(others, torch.zeros_like(others)), (full, key)


class ArchitectureContract:
    """What every architecture must do; a test file subclasses it as `Test...` with `architecture` set.

    The combiner matrix's default-suite subset is `ArchitectureContract_FAST`; the rest of the registry
    (and AdaTask) is `slow`.
    """

    architecture: str
    toy_overrides: tuple[str, ...] = ()  # what the toy run needs beyond tests/test_trainer.py's settings

    def test_task_isolation(self):
        check_task_isolation(self.architecture)

    def test_the_jacobian_hands_each_task_its_own_gradient(self):
        check_jacobian_hands_each_task_its_own_gradient(self.architecture)

    def test_undrawn_tasks_keep_their_own_parameters(self):
        check_undrawn_tasks_keep_their_own_parameters(self.architecture)

    @pytest.mark.parametrize("method", [m for m in (*COMBINERS, *OPTIMIZERS) if m in ArchitectureContract_FAST])
    def test_updates_are_finite_and_resume_bit_for_bit(self, method):
        check_updates_are_finite_and_resume_exactly(self.architecture, method)

    @pytest.mark.slow
    @pytest.mark.parametrize("method", [m for m in (*COMBINERS, *OPTIMIZERS) if m not in ArchitectureContract_FAST])
    def test_updates_are_finite_and_resume_bit_for_bit_with_every_method(self, method):
        check_updates_are_finite_and_resume_exactly(self.architecture, method)

    def test_the_device_step_update_equals_the_eager_one(self):
        check_device_steps_equal_the_eager_update(self.architecture, "cagrad")

    @pytest.mark.slow
    def test_a_toy_run_learns(self, tmp_path):
        check_toy_run_learns(self.architecture, tmp_path, self.toy_overrides)


# ----- independent forward passes, from the weights alone ----------------------------------------
def plain_mlp(h: torch.Tensor, sequential: torch.nn.Module) -> torch.Tensor:
    """An nn.Sequential of Linear and ReLU layers, written out: h Wᵀ + b, max(·, 0)."""
    for layer in sequential:
        if isinstance(layer, torch.nn.Linear):
            h = h @ layer.weight.T + layer.bias
        else:
            assert isinstance(layer, torch.nn.ReLU)
            h = h.clamp_min(0)
    return h


def plain_expert(h: torch.Tensor, experts: torch.nn.Module, e: int) -> torch.Tensor:
    """Expert e of an expert MLP (stacked weights `[E, in, out]`), written out for one input."""
    layers = [m for m in experts if not isinstance(m, torch.nn.ReLU)]
    for i, layer in enumerate(layers):
        h = h @ layer.weight[e] + layer.bias[e]
        if i < len(layers) - 1:
            h = h.clamp_min(0)
    return h
