"""`SACUpdate` through its seams: construction, hooks, which tasks and draws each network gets, the
metrics it names, and the finiteness decision (eager, and decided on the device)."""

from __future__ import annotations

import pytest
import torch

from mtrl.combiners import Combiner, make_combiner
from mtrl.compiled import CompiledUpdate
from mtrl.networks import task_parameter_names
from mtrl.optim import Optimization
from mtrl.sac import MTSAC, NETWORKS, SACUpdate, UpdateHook
from tests.test_sac import ACT, OBS, K, make_agent, make_batch

MODES = pytest.mark.parametrize("device_steps", [False, True], ids=["eager", "device_steps"])


class Recording(Combiner):
    """Samples `rows` tasks (all if None) and draws one number per drawn task per call; records the draws."""

    def __init__(self, rows: int | None = 2) -> None:
        super().__init__()
        self.rows, self.received = rows, []

    def select_tasks(self, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
        if self.rows is None:
            return super().select_tasks(num_tasks, generator)
        return torch.randperm(num_tasks, generator=generator)[: self.rows].sort().values

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.rand(num_tasks, generator=generator, dtype=torch.float64)

    def weights(self, gramian: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
        assert draws.shape == gramian.shape[:1], "one draw per row of G"
        self.received.append(draws.clone())
        return gramian.new_full((gramian.shape[0],), 1.0 / gramian.shape[0])


class Recorder(UpdateHook):
    def __init__(self) -> None:
        self.targets, self.gradients, self.steps = [], [], []

    def on_target(self, target: torch.Tensor) -> None:
        self.targets.append(target.clone())

    def on_gradients(self, network: str, parameters: list[torch.nn.Parameter]) -> None:
        self.gradients.append((network, parameters, [p.grad.clone() for p in parameters]))

    def on_step(self, network: str, parameters: list[torch.nn.Parameter]) -> None:
        self.steps.append((network, parameters))


def build(
    agent: MTSAC,
    combiner: Combiner | str = "mean",
    device_steps: bool = False,
    hooks=(),
    combined=("critic", "actor"),
    **kwargs,
) -> SACUpdate | CompiledUpdate:
    optimization = Optimization(agent.params, "adam", agent.learning_rates, K)
    combiner = make_combiner(combiner) if isinstance(combiner, str) else combiner
    update = SACUpdate(agent, optimization, combiner, combined, hooks=hooks, **kwargs)
    return CompiledUpdate(update) if device_steps else update  # otherwise the default: the eager update


def run(update: SACUpdate, batches, diagnostics: bool = False):
    generator, combiner_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    return [update(batch, generator, combiner_generator, diagnostics) for batch in batches]


def test_the_agent_is_built_from_its_config():
    multihead = make_agent("multihead", log_std_min=-3.0, log_std_max=-1.0, target_entropy=-1.5)
    conditioned = make_agent("conditioned")
    assert task_parameter_names(multihead.actor) and task_parameter_names(multihead.critic)
    assert not task_parameter_names(conditioned.actor) and not task_parameter_names(conditioned.critic)
    assert multihead.target_entropy == -1.5 and conditioned.target_entropy == -float(ACT)
    assert not any(p.requires_grad for p in multihead.critic_target.parameters())
    # the policy's log-std stays within the configured bounds, and reaches both on saturating inputs
    obs = 1e4 * torch.randn(K, 64, OBS + K, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, log_std = multihead.actor(obs)
    assert log_std.min().item() == -3.0 and log_std.max().item() == -1.0


def test_unknown_networks_to_combine_are_refused_by_name():
    with pytest.raises(
        ValueError, match=r"^unknown network\(s\) \['policy'\] to combine; choose from: critic, actor, alpha$"
    ):
        build(make_agent("multihead"), combined=("critic", "policy"))


@MODES
def test_hooks_see_the_clipped_targets_each_networks_gradients_and_each_step(device_steps):
    recorder = Recorder()
    agent = make_agent("multihead")
    update = build(agent, device_steps=device_steps, hooks=[recorder], q_target_clip=0.05)
    run(update, [make_batch(1)])
    (target,) = recorder.targets
    assert target.abs().max().item() == pytest.approx(0.05)  # the clip binds: rewards are ~N(0, 1)
    assert [(net, params) for net, params, _ in recorder.gradients] == [
        (net, agent.params[net].all()) for net in ("critic", "actor", "alpha")
    ]
    assert all(g is not None for _, _, grads in recorder.gradients for g in grads)
    assert recorder.steps == [(net, agent.params[net].all()) for net in ("critic", "actor", "alpha")]
    assert all(p.grad is None for p in agent.parameters())  # the gradients' memory is let go


@MODES
def test_a_non_finite_gradient_alone_skips_the_update(device_steps):
    """Finite losses, one non-finite `.grad` (written by a hook): nothing moves."""

    class Poison(UpdateHook):
        def on_gradients(self, network, parameters):
            if network == "actor":
                parameters[0].grad[0, 0] = float("inf")

    agent = make_agent("multihead")
    before = {name: t.clone() for name, t in agent.state_dict().items()}
    (result,) = run(build(agent, device_steps=device_steps, hooks=[Poison()]), [make_batch(1)])
    assert not result.finite
    assert all(torch.isfinite(v).all() for k, v in result.metrics.items() if k.startswith("loss/"))
    assert all(torch.equal(value, before[name]) for name, value in agent.state_dict().items())


def test_a_skipped_update_calls_on_step_only_when_steps_are_decided_on_the_device():
    bad = make_batch(1)
    bad.reward[:, 0] = float("nan")
    for device_steps, expected in ((False, []), (True, ["critic", "actor", "alpha"])):
        recorder = Recorder()
        (result,) = run(build(make_agent("multihead"), device_steps=device_steps, hooks=[recorder]), [bad])
        assert not result.finite and [net for net, _ in recorder.steps] == expected


@MODES
def test_only_the_combined_networks_draw_and_each_gets_its_own_draws(device_steps):
    """Tasks first, then one draw per combined network in order, for the drawn rows only; a network
    left out of `combined` draws nothing and uses every task."""
    combiner = Recording(rows=2)
    agent = make_agent("multihead", shared_temperature=True)
    update = build(agent, combiner, device_steps, combined=("critic", "alpha"))
    results = run(update, [make_batch(1), make_batch(2)], diagnostics=True)
    replay = torch.Generator().manual_seed(4)
    expected = []
    for _ in results:
        torch.randperm(K, generator=replay)
        expected += [torch.rand(2, generator=replay, dtype=torch.float64) for _network in ("critic", "alpha")]
    assert len(combiner.received) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(combiner.received, expected, strict=True))
    metrics = results[-1].metrics
    assert {"combiner/critic/weights", "combiner/alpha/weights"} <= metrics.keys()
    assert not any(key.startswith("combiner/actor/") for key in metrics)
    assert torch.isfinite(metrics["loss/actor"]).all()  # the actor is not combined: every task's loss
    for combined in ("loss/critic", "loss/alpha"):
        assert torch.isnan(metrics[combined]).sum() == 1  # one task not drawn this update


@MODES
def test_a_task_not_drawn_has_a_zero_temperature_loss_and_gradient(device_steps):
    recorder = Recorder()
    agent = make_agent("multihead")
    update = build(agent, make_combiner("sdmgrad_os", n=1), device_steps, hooks=[recorder])
    (result,) = run(update, [make_batch(1)])
    drawn = torch.isfinite(result.metrics["loss/actor"])
    assert drawn.sum() < K
    assert torch.equal(result.metrics["loss/alpha"][~drawn], torch.zeros(int((~drawn).sum()), dtype=torch.float64))
    (alpha_grad,) = next(grads for net, _, grads in recorder.gradients if net == "alpha")
    assert (alpha_grad[~drawn] == 0).all() and (alpha_grad[drawn] != 0).all()


@MODES
def test_the_metrics_are_what_they_name(device_steps):
    agent = make_agent("multihead")
    alpha_before = agent.alpha().clone()
    update = build(agent, "cagrad", device_steps)
    (plain,) = run(update, [make_batch(1)])
    assert not any(key.startswith("combiner/") for key in plain.metrics)
    assert set(plain.metrics) == {"loss/critic", "loss/actor", "loss/alpha", "q_mean", "entropy", "alpha"}
    torch.testing.assert_close(plain.metrics["alpha"], alpha_before)  # the temperatures the losses used
    # the temperature loss is -log α (mean log π + target entropy), so the entropy is recovered from it
    log_alpha = alpha_before.log()
    entropy = plain.metrics["loss/alpha"] / log_alpha + agent.target_entropy
    torch.testing.assert_close(plain.metrics["entropy"], entropy, rtol=1e-9, atol=1e-12)
    eager = update.update if device_steps else update
    gradients = eager.gradients(make_batch(2), *(torch.zeros(K, 5, ACT, dtype=torch.float64),) * 2, None)
    assert not any(key.startswith("combiner/") for key in gradients.metrics)


@MODES
def test_diagnostics_cover_every_combined_network_even_with_the_mean(device_steps):
    """With `mean` no Jacobian is needed for the update; a diagnostics update computes it for each
    combined network (here the shared temperature too), and only then."""
    update = build(make_agent("multihead", shared_temperature=True), "mean", device_steps, combined=NETWORKS)
    plain, diagnosed = run(update, [make_batch(1)])[0], run(update, [make_batch(2)], diagnostics=True)[0]
    assert not any(key.startswith("combiner/") for key in plain.metrics)
    for net in NETWORKS:
        weights = diagnosed.metrics[f"combiner/{net}/weights"]
        torch.testing.assert_close(weights, torch.full((K,), 1 / K, dtype=torch.float64))
