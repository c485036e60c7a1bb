"""The SAC maths against independent computations.

Per-task losses and gradients of every network (critic, actor, temperature), for both agent
variants, are compared with a plain float64 loop over tasks that calls `torch.autograd.grad` on
the ordinary modules (no `vmap`, no `functional_call`). The Bellman target, the tanh log-prob
correction, the temperature's direction and the Polyak update are checked against formulas
written out here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mtrl.buffer import Batch
from mtrl.combiners import Combiner, make_combiner
from mtrl.config import AgentConfig
from mtrl.jacobian import mean_backward, mean_backward_functional, task_jacobian
from mtrl.networks import squashed_sample
from mtrl.optim import Optimization
from mtrl.sac import MTSAC, SACUpdate, policy_noise, polyak_update, soft_bellman_target

K, B, OBS, ACT = 3, 5, 6, 2


def make_agent(variant: str, **agent) -> MTSAC:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = AgentConfig(architecture=variant, hidden_sizes=[8, 7], init_temperature=0.3, **agent)
        return MTSAC(OBS + K, ACT, K, cfg).double()


def make_update(
    variant: str,
    combiner: Combiner | str = "mean",
    networks=("critic", "actor"),
    optimizer: str = "adam",
    grad_clip_norm: float | None = None,
    **agent,
) -> SACUpdate:
    """The update the trainer would build for this agent, combiner and optimizer."""
    model = make_agent(variant, **agent)
    optimization = Optimization(model.params, optimizer, model.learning_rates, K, grad_clip_norm)
    return SACUpdate(model, optimization, make_combiner(combiner) if isinstance(combiner, str) else combiner, networks)


def make_batch(seed: int = 1, terminated: float = 0.0, truncated: float = 0.0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    one_hot = torch.eye(K, dtype=torch.float64)[:, None, :].expand(K, B, K)

    def obs() -> torch.Tensor:
        return torch.cat([torch.randn(K, B, OBS, generator=g, dtype=torch.float64), one_hot], -1)

    action = torch.rand(K, B, ACT, generator=g, dtype=torch.float64) * 2 - 1
    reward = torch.randn(K, B, generator=g, dtype=torch.float64)
    full = torch.full((K, B), 1.0, dtype=torch.float64)
    return Batch(obs(), action, reward, obs(), full * terminated, full * truncated)


def noise(seed: int) -> torch.Tensor:
    return torch.randn(K, B, ACT, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_logp(mean: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor):
    """tanh(u) with u ~ N(mean, std), log-density written directly: log N(u) − Σ log(1 − tanh(u)²)."""
    u = mean + log_std.exp() * eps
    gaussian = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    return torch.tanh(u), (gaussian - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)


def reference_rows(loss_of_task, shared: dict, task: dict):
    """Per-task losses, shared-gradient rows and task-specific gradients, one autograd.grad per task."""
    losses, rows, task_grads = [], [], {name: [] for name in task}
    for k in range(K):
        loss = loss_of_task(k)
        grads = torch.autograd.grad(loss, [*shared.values(), *task.values()], allow_unused=True)
        shared_grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, shared.values(), strict=False)]
        rows.append(torch.cat([g.reshape(-1) for g in shared_grads]) if shared else None)
        for (name, p), g in zip(task.items(), grads[len(shared) :], strict=True):
            task_grads[name].append(torch.zeros_like(p)[k] if g is None else g[k])
        losses.append(loss.detach())
    matrix = torch.stack(rows) if shared else None
    return torch.stack(losses), matrix, {n: torch.stack(v) for n, v in task_grads.items()}


def assert_matches_reference(objective, reference) -> None:
    losses, matrix, task_grads = reference
    grads = task_jacobian(objective)
    torch.testing.assert_close(grads.losses, losses, rtol=1e-10, atol=1e-12)
    if matrix is not None:
        torch.testing.assert_close(grads.matrix, matrix, rtol=1e-9, atol=1e-12)
    for name, g in task_grads.items():
        torch.testing.assert_close(grads.task[name], g, rtol=1e-9, atol=1e-12)
    # the mean path: one backward gives the shared mean and every task its own gradient
    mean_losses, _ = mean_backward(objective)
    torch.testing.assert_close(mean_losses, losses, rtol=1e-10, atol=1e-12)
    offset = 0
    for p in objective.shared.values():
        n = p.numel()
        torch.testing.assert_close(p.grad.reshape(-1), matrix[:, offset : offset + n].mean(0), rtol=1e-9, atol=1e-12)
        offset += n
    for name, p in objective.task.items():
        torch.testing.assert_close(p.grad, task_grads[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["conditioned", "multihead"])
def test_critic_losses_and_gradients_equal_a_plain_loop(variant):
    agent, batch = make_agent(variant), make_batch()
    target = agent.bellman_target(batch, noise(2))
    shared, task = agent.params["critic"]

    def loss(k: int) -> torch.Tensor:
        q1, q2 = agent.critic(batch.obs, batch.action)  # [K, B]; row k went through task k's heads
        return ((q1[k] - target[k]) ** 2).mean() + ((q2[k] - target[k]) ** 2).mean()

    assert_matches_reference(agent.critic_objective(batch, target), reference_rows(loss, shared, task))


@pytest.mark.parametrize("variant", ["conditioned", "multihead"])
def test_actor_losses_and_gradients_equal_a_plain_loop_against_the_tasks_own_q_head(variant):
    agent, batch, eps = make_agent(variant), make_batch(), noise(3)
    shared, task = agent.params["actor"]
    alpha = agent.alpha()

    def loss(k: int) -> torch.Tensor:
        action, logp = reference_logp(*agent.actor(batch.obs), eps)
        q1, q2 = agent.critic(batch.obs, action)  # task k's row is scored by task k's Q-heads only
        return (alpha[k] * logp[k] - torch.minimum(q1[k], q2[k])).mean()

    objective = agent.actor_objective(batch, eps)
    assert_matches_reference(objective, reference_rows(loss, shared, task))
    for p in agent.critic.parameters():  # the actor loss leaves the critic alone
        assert p.grad is None


@pytest.mark.parametrize("variant", ["conditioned", "multihead"])
def test_the_functional_mean_backward_of_the_actor_loss_is_the_eager_one(variant):
    """The actor loss holds the critic's shared weights as constants: the form used while compiling
    (torch.func) must see them as the eager form does."""
    agent, batch, eps = make_agent(variant), make_batch(), noise(3)
    eager_losses, _ = mean_backward(agent.actor_objective(batch, eps))
    eager = {name: p.grad.clone() for name, p in agent.actor.named_parameters()}
    agent.zero_grad(set_to_none=True)
    losses, _ = mean_backward_functional(agent.actor_objective(batch, eps))
    torch.testing.assert_close(losses, eager_losses, rtol=1e-12, atol=1e-14)
    for name, p in agent.actor.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-12, atol=1e-14, msg=name)


def test_multihead_actor_would_differ_if_it_maximised_every_tasks_q_head():
    """The reference above can tell task k's own head from the mean of all heads."""
    agent, batch, eps = make_agent("multihead"), make_batch(), noise(3)
    action, logp = reference_logp(*agent.actor(batch.obs), eps)
    own = torch.minimum(*agent.critic(batch.obs, action))
    shared_critic = {n: p for n, p in agent.critic.named_parameters()}
    mixed = torch.stack(
        [
            torch.minimum(*torch.func.functional_call(agent.critic, shared_critic, (batch.obs[k], action[k]))).mean(0)
            for k in range(K)
        ]
    )
    assert (own - mixed).abs().max() > 1e-3


@pytest.mark.parametrize("shared_temperature", [False, True])
def test_temperature_losses_and_gradients_equal_a_plain_loop(shared_temperature):
    agent = make_agent("conditioned", shared_temperature=shared_temperature)
    mean_logp = torch.tensor([-1.0, 2.5, 0.3], dtype=torch.float64)
    shared, task = agent.params["alpha"]

    def loss(k: int) -> torch.Tensor:
        log_alpha = agent.log_alpha[0 if shared_temperature else k]
        return -log_alpha * (mean_logp[k] + agent.target_entropy)

    assert_matches_reference(agent.alpha_objective(mean_logp), reference_rows(loss, shared, task))


def test_bellman_target_is_min_of_twin_targets_minus_entropy_masked_by_terminated_only():
    agent, eps = make_agent("multihead"), noise(4)
    with torch.no_grad():  # make the target critics differ from the critics, and the twins from each other
        for p in agent.critic_target.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    gamma = agent.cfg.gamma
    for terminated, truncated in [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]:
        batch = make_batch(5, terminated, truncated)
        target = agent.bellman_target(batch, eps)
        expected = torch.empty(K, B, dtype=torch.float64)
        with torch.no_grad():
            next_action, next_logp = reference_logp(*agent.actor(batch.next_obs), eps)
            q1, q2 = agent.critic_target(batch.next_obs, next_action)
            for k in range(K):
                for i in range(B):
                    value = min(float(q1[k, i]), float(q2[k, i])) - float(agent.alpha()[k]) * float(next_logp[k, i])
                    bootstrap = 0.0 if terminated else gamma * value
                    expected[k, i] = float(batch.reward[k, i]) + bootstrap
        torch.testing.assert_close(target, expected, rtol=1e-12, atol=1e-12)
        if terminated:
            assert torch.equal(target, batch.reward)  # a real end: nothing is bootstrapped


def test_a_time_limit_bootstraps_through_the_true_final_observation():
    agent, eps = make_agent("conditioned"), noise(6)
    batch = make_batch(7, terminated=0.0, truncated=1.0)
    target = agent.bellman_target(batch, eps)
    other_next = batch._replace(next_obs=make_batch(8).next_obs)  # e.g. the next episode's reset observation
    assert (agent.bellman_target(other_next, eps) - target).abs().min() > 0  # every target depends on s'
    assert (target - batch.reward).abs().min() > 0


def test_target_clipping_clamps_exactly_the_independent_target():
    reward = torch.tensor([[3.0, -80.0, 10.0]], dtype=torch.float64)
    q1, q2 = torch.tensor([[100.0, 1.0, -5.0]]), torch.tensor([[90.0, 2.0, -6.0]])
    q1, q2 = q1.double(), q2.double()
    logp = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    alpha, done = torch.tensor([0.2], dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    raw = [3.0 + 0.9 * (90.0 - 0.1), -80.0 + 0.9 * (1.0 + 0.2), 10.0 + 0.9 * (-6.0 - 0.4)]
    torch.testing.assert_close(
        soft_bellman_target(reward, done, q1, q2, logp, alpha, 0.9), torch.tensor([raw]).double()
    )
    clipped = soft_bellman_target(reward, done, q1, q2, logp, alpha, 0.9, clip=50.0)
    torch.testing.assert_close(clipped, torch.tensor([[50.0, -50.0, raw[2]]], dtype=torch.float64))


@pytest.mark.parametrize("mean,log_std", [(0.3, -0.5), (-1.2, 0.4), (2.0, -1.0)])
def test_tanh_log_prob_matches_a_finite_difference_density(mean, log_std):
    """P(a ∈ [x, x + h]) / h from the Gaussian CDF through atanh, against exp(log π(x))."""
    std = math.exp(log_std)
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    eps = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)
    m = torch.full_like(eps, mean)[:, None]
    s = torch.full_like(eps, log_std)[:, None]
    action, logp = squashed_sample(m, s, eps[:, None])
    h = 1e-6
    x = action[:, 0]
    density = (normal.cdf(torch.atanh(x + h / 2)) - normal.cdf(torch.atanh(x - h / 2))) / h
    torch.testing.assert_close(logp.exp(), density, rtol=1e-5, atol=0)


def test_temperature_rises_when_entropy_is_below_target_and_falls_above():
    # target entropy −|A| = −2; the entropy estimate −log π is below it exactly when log π > 2
    for mean_logp, direction in [(3.0, 1.0), (10.0, 1.0), (1.0, -1.0), (-6.0, -1.0)]:
        agent = make_agent("conditioned")
        optimization = Optimization(agent.params, "adam", agent.learning_rates, K)
        mean_backward(agent.alpha_objective(torch.full((K,), mean_logp, dtype=torch.float64)))
        before = agent.log_alpha.detach().clone()
        optimization.step("alpha")
        change = agent.log_alpha.detach() - before
        entropy_below_target = -mean_logp < agent.target_entropy
        assert entropy_below_target == (direction > 0)
        assert (torch.sign(change) == direction).all()


def test_polyak_update_moves_targets_by_tau():
    source, target = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    old = [p.detach().clone() for p in target.parameters()]
    polyak_update(target, source, 0.25)
    for t, s, o in zip(target.parameters(), source.parameters(), old, strict=True):
        torch.testing.assert_close(t, 0.75 * o + 0.25 * s, rtol=1e-15, atol=1e-15)


def test_an_update_steps_the_target_critic_by_tau_towards_the_stepped_critic():
    update = make_update("multihead")
    agent = update.agent
    before = copy.deepcopy(agent.critic_target.state_dict())
    result = update(make_batch(), torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
    assert result.finite
    tau = agent.cfg.tau
    for name, p in agent.critic_target.state_dict().items():
        torch.testing.assert_close(p, (1 - tau) * before[name] + tau * agent.critic.state_dict()[name])


def _task_slices(update: SACUpdate) -> dict[str, torch.Tensor]:
    """Every task-specific tensor (parameters and their Adam moments), cloned."""
    out = {}
    for net in ("critic", "actor", "alpha"):
        opt = update.optimization[net].task_optimizer
        for name, p in update.agent.params[net].task.items():
            out[f"{net}.{name}"] = p.detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{net}.{name}.{key}"] = opt.state[p][key].clone()
    return out


def test_tasks_not_drawn_keep_heads_temperature_and_moments_bit_for_bit():
    update = make_update("multihead", make_combiner("sdmgrad_os", n=1))
    combiner_gen = torch.Generator().manual_seed(3)
    noise_gen = torch.Generator().manual_seed(4)
    for _ in range(3):  # Adam has momentum in every slice before the update under test
        update(make_batch(), noise_gen, combiner_gen)
    subset_seen = False
    for step in range(6):
        drawn = update.combiner.select_tasks(K, torch.Generator().set_state(combiner_gen.get_state()))
        undrawn = [k for k in range(K) if k not in drawn.tolist()]
        before = _task_slices(update)
        assert update(make_batch(10 + step), noise_gen, combiner_gen).finite
        after = _task_slices(update)
        for key, value in before.items():
            for k in range(K):
                unchanged = torch.equal(after[key][k], value[k])
                assert unchanged == (k in undrawn), (key, k, drawn)
        subset_seen |= bool(undrawn)
    assert subset_seen


def test_adatask_steps_on_clipped_task_gradients():
    """`train.grad_clip_norm` bounds what AdaTask steps on, as it bounds what Adam steps on."""

    def shared_step(clip: float | None) -> torch.Tensor:
        update = make_update("conditioned", optimizer="adatask", grad_clip_norm=clip)
        weight = update.agent.critic.q1.net.trunk[0].weight
        before = weight.detach().clone()
        update(make_batch(), torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
        return (weight.detach() - before).abs().max()

    unclipped, clipped = shared_step(None), shared_step(1e-12)
    # Adam-like steps are scale-free except for eps: gradients clipped to ~1e-12 make steps ~1e-4 as large.
    assert clipped < 1e-2 * unclipped


def test_update_metrics_are_the_per_task_quantities_they_name():
    """`q_mean`, the losses and the combiner diagnostics, against independent computations."""
    update, batch = make_update("multihead", "cagrad"), make_batch()
    agent = update.agent
    q_before = agent.critic(batch.obs, batch.action)[0].detach().mean(1)
    # the update's first draw from its generator is the next-action noise of the target
    next_noise = torch.randn(K, B, ACT, generator=torch.Generator().manual_seed(0))  # float32, as drawn there
    rows = task_jacobian(agent.critic_objective(batch, agent.bellman_target(batch, next_noise))).matrix
    result = update(batch, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0), diagnostics=True)
    m = result.metrics
    torch.testing.assert_close(m["q_mean"], q_before, rtol=1e-12, atol=1e-12)
    assert m["loss/critic"].shape == m["loss/actor"].shape == m["loss/alpha"].shape == (K,)
    norms = rows.norm(dim=1)
    cosines = (rows @ rows.T / torch.outer(norms, norms))[~torch.eye(K, dtype=torch.bool)]
    torch.testing.assert_close(m["combiner/critic/grad_norm"], norms, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m["combiner/critic/cos_mean"], cosines.mean(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m["combiner/critic/cos_min"], cosines.min(), rtol=1e-9, atol=1e-12)
    assert float(m["combiner/critic/conflict_share"]) == pytest.approx(float((cosines < 0).double().mean()), rel=1e-6)
    for net in ("critic", "actor"):
        weights = m[f"combiner/{net}/weights"]
        assert weights.shape == (K,) and (weights > 0).all()  # CAGrad's weights are 1/K plus a positive part


def test_policy_noise_comes_from_the_generator_whatever_the_update_device():
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    drawn = policy_noise((2, 3), torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(drawn, expected)
    # A CPU generator serves an update on another device: drawn where the generator lives, then moved.
    moved = policy_noise((2, 3), torch.Generator().manual_seed(5), torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (2, 3)


@pytest.mark.parametrize("optimizer", ["adam", "adatask"])
def test_optimization_state_round_trips_to_identical_updates(optimizer):
    """An update restored from the agent's and the optimization's state dicts continues bit for bit."""
    a = make_update("multihead", optimizer=optimizer, grad_clip_norm=1.0)
    noise_gen, combiner_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for step in range(2):
        assert a(make_batch(20 + step), noise_gen, combiner_gen).finite
    b = make_update("multihead", optimizer=optimizer, grad_clip_norm=1.0)
    b.agent.load_state_dict(copy.deepcopy(a.agent.state_dict()))
    b.optimization.load_state_dict(copy.deepcopy(a.optimization.state_dict()))
    fresh = make_update("multihead", optimizer=optimizer, grad_clip_norm=1.0)
    fresh.agent.load_state_dict(copy.deepcopy(a.agent.state_dict()))  # same weights, optimizers from scratch
    for update in (a, b, fresh):
        state = (torch.Generator().set_state(noise_gen.get_state()), torch.Generator().manual_seed(3))
        assert update(make_batch(30), *state).finite
    for name, p in a.agent.state_dict().items():
        assert torch.equal(b.agent.state_dict()[name], p), name
    assert any(not torch.equal(fresh.agent.state_dict()[n], p) for n, p in a.agent.state_dict().items())


def test_optimization_refuses_state_of_another_optimizer_and_unknown_names():
    adam, adatask = make_update("multihead"), make_update("multihead", optimizer="adatask")
    with pytest.raises(ValueError, match=r"optimizer state holds \['adam'\], expected \['adam', 'adatask'\]"):
        adatask.optimization.load_state_dict(adam.optimization.state_dict())
    agent = adam.agent
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose from: adam, adatask"):
        Optimization(agent.params, "sgd", agent.learning_rates, K)
    with pytest.raises(ValueError, match=r"unknown network\(s\) \['policy'\] to combine"):
        SACUpdate(agent, adam.optimization, make_combiner("mean"), ["critic", "policy"])
