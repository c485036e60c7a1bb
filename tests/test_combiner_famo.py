"""FAMO (Liu et al., NeurIPS 2023): its weights and logit updates against a float64 loop of the paper's
Algorithm 1 (softmax Jacobian by autograd, torch.optim.Adam for the logits), one backward per update,
exact resume, a skipped update that changes nothing, and the config's refusals."""

import math

import pytest
import torch

from mtrl.bench import ACT_DIM, OBS_DIM, synthetic_batch
from mtrl.combiners import make_combiner
from mtrl.combiners.base import TaskLosses
from mtrl.compiled import CompiledUpdate
from mtrl.config import AgentConfig, ConfigError
from mtrl.optim import Optimization
from mtrl.sac import MTSAC, SACUpdate, network_gradients
from mtrl.trainer import Trainer
from tests.conftest import toy_config


class Algorithm1:
    """The paper's Algorithm 1 for one network, in float64, written independently of the combiner:
    weights z_i/(c ℓ̃_i) with c = Σ z_j/ℓ̃_j, then δ = J_softmax(ξ)ᵀ(log ℓ̃ − log ℓ̃') by autograd and
    one step of torch.optim.Adam with weight decay γ on ξ, as the authors' code does."""

    def __init__(self, k: int, lr: float, decay: float, min_loss: float, variant: str):
        self.logits = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=decay)
        self.min_loss, self.variant = min_loss, variant

    def weights(self, losses: list[float]) -> list[float]:
        z = torch.softmax(self.logits.detach(), 0).tolist()
        shifted = [loss - self.min_loss + 1e-8 for loss in losses]
        c = sum(z_i / s for z_i, s in zip(z, shifted, strict=True))
        if self.variant == "mtrl":
            return [c * z_i / s for z_i, s in zip(z, shifted, strict=True)]
        return [z_i / (c * s) for z_i, s in zip(z, shifted, strict=True)]

    def update(self, before: list[float], after: list[float]) -> None:
        shift = 1e-8 - self.min_loss
        decrease = [math.log(b + shift) - math.log(a + shift) for b, a in zip(before, after, strict=True)]
        decrease = torch.tensor(decrease, dtype=torch.float64)
        (delta,) = torch.autograd.grad(torch.softmax(self.logits, 0), self.logits, grad_outputs=decrease)
        self.optimizer.zero_grad()
        self.logits.grad = delta
        self.optimizer.step()


@pytest.mark.parametrize(
    ("variant", "lr", "decay", "min_loss"), [("paper", 0.025, 0.01, 0.0), ("mtrl", 0.3, 0.1, -0.5)]
)
def test_weights_and_logits_follow_algorithm_1(variant, lr, decay, min_loss):
    k, steps = 5, 12
    combiner = make_combiner("famo", logit_lr=lr, logit_decay=decay, min_loss=min_loss, variant=variant)
    reference = Algorithm1(k, lr, decay, min_loss, variant)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        before = torch.rand(k, generator=generator, dtype=torch.float64) * 3 + 0.01
        after = before * (0.5 + torch.rand(k, generator=generator, dtype=torch.float64))  # some fall, some rise
        losses = TaskLosses("critic", before)
        weights = combiner.loss_weights(losses)
        torch.testing.assert_close(weights, torch.tensor(reference.weights(before.tolist()), dtype=torch.float64))
        combiner.after_step(losses, after, None)
        reference.update(before.tolist(), after.tolist())
    torch.testing.assert_close(combiner.logits("critic"), reference.logits.detach(), rtol=1e-12, atol=1e-14)
    assert combiner.logits("critic").abs().max() > lr / 2  # the logits did move (Adam steps are ~lr)


def test_paper_weights_sum_to_one_and_the_ports_to_c_squared():
    losses = TaskLosses("critic", torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64))
    paper = make_combiner("famo").loss_weights(losses)
    port = make_combiner("famo", variant="mtrl").loss_weights(losses)
    c = (1 / 3) * (1 / 0.5 + 1 / 2.0 + 1 / 8.0)  # z = 1/3 at the start; ℓ̃ = ℓ + 1e-8
    assert paper.sum().item() == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(port, paper * c**2, rtol=1e-6, atol=0)
    # the smallest loss gets the largest weight: z_i/ℓ̃_i, so each task's log-loss counts alike
    assert paper.argmax().item() == 0 and paper.tolist() == pytest.approx([16 / 21, 4 / 21, 1 / 21], rel=1e-7)


def test_logits_are_kept_per_network():
    combiner = make_combiner("famo")
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64)
    combiner.loss_weights(TaskLosses("critic", losses))
    combiner.after_step(TaskLosses("critic", losses), losses * torch.tensor([0.5, 1.0], dtype=torch.float64), None)
    assert set(combiner.state_dict()) == {"critic"}
    assert combiner.logits("actor") is None
    assert combiner.logits("critic")[0] < combiner.logits("critic")[1]  # task 0's loss fell: it loses weight


def _update(k=3, combiner="famo", architecture="conditioned", device_steps=False) -> SACUpdate | CompiledUpdate:
    torch.manual_seed(0)
    agent = MTSAC(OBS_DIM + k, ACT_DIM, k, AgentConfig(hidden_sizes=[16, 16], architecture=architecture))
    optimization = Optimization(agent.params, "adam", agent.learning_rates, k)
    update = SACUpdate(agent, optimization, make_combiner(combiner), ["critic"])
    return CompiledUpdate(update) if device_steps else update


def _batch(k=3, seed=0):
    return synthetic_batch(k, 8, OBS_DIM, torch.device("cpu"), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["conditioned", "multihead"])
def test_the_gradient_is_the_weighted_sum_of_task_gradients_from_one_backward(variant):
    """No Jacobian: one backward of Σ w_i L_i; shared `.grad` = Σ_i w_i ∇L_i, each head its own ∇L_i."""
    update = _update(architecture=variant)
    agent, combiner = update.agent, update.combiner
    batch = _batch()
    objective = agent.critic_objective(batch, batch.reward.clone())
    backward_passes = []
    hooks = [p.register_hook(lambda g: backward_passes.append(1)) for p in agent.params["critic"].shared.values()]
    grads = network_gradients(objective, combiner, None, None, per_task=False, network="critic")
    assert grads.matrix is None and len(backward_passes) == len(hooks)  # each shared tensor reached once
    for hook in hooks:
        hook.remove()
    shared, task = agent.params["critic"]
    combined = 0
    for i, weight in enumerate(grads.weights.tolist()):  # task by task, with plain autograd
        loss = objective.loss_fn(shared, {n: p[i] for n, p in task.items()}, [x[i] for x in objective.inputs], ())[0]
        task_grads = torch.autograd.grad(loss, [*shared.values(), *task.values()])
        combined = combined + weight * torch.cat([g.flatten() for g in task_grads[: len(shared)]])
        for p, g in zip(task.values(), task_grads[len(shared) :], strict=True):
            torch.testing.assert_close(p.grad[i], g[i], rtol=1e-5, atol=1e-6)
    found = torch.cat([p.grad.flatten() for p in shared.values()])
    torch.testing.assert_close(found, combined, rtol=1e-5, atol=1e-6)


def test_a_full_update_runs_one_critic_backward_and_learns_from_the_step():
    update = _update()
    critic_shared = list(update.agent.params["critic"].shared.values())
    backward_passes = []
    critic_shared[0].register_hook(lambda g: backward_passes.append(1))
    generator, draws = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for step in range(1, 4):
        result = update(_batch(seed=step), generator, draws)
        assert result.finite and len(backward_passes) == step
    assert update.combiner.logits("critic").abs().max() > 0


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][key], b[n][key]) for key in a[n]) for n in a
    )


@pytest.mark.parametrize("device_steps", [False, True])
def test_a_skipped_update_leaves_the_logits_and_their_moments_exactly_as_they_were(device_steps):
    update = _update(device_steps=device_steps)
    generator, draws = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    assert update(_batch(seed=1), generator, draws).finite
    before = update.combiner.state_dict()
    bad = _batch(seed=2)
    bad.reward[1, 3] = float("nan")  # task 1's loss is NaN, the others are fine
    assert not update(bad, generator, draws).finite
    assert _states_equal(update.combiner.state_dict(), before)
    assert update(_batch(seed=3), generator, draws).finite
    assert not _states_equal(update.combiner.state_dict(), before)


def test_an_update_not_taken_on_the_device_or_with_non_finite_losses_changes_nothing():
    combiner = make_combiner("famo")
    before = TaskLosses("critic", torch.tensor([1.0, 2.0, 3.0]))
    after = torch.tensor([0.5, 2.0, 3.5])
    combiner.loss_weights(before)
    combiner.after_step(before, after, None)
    state = combiner.state_dict()
    combiner.after_step(before, after, torch.tensor(False))  # finite, but the step was not taken
    assert _states_equal(combiner.state_dict(), state)
    combiner.after_step(before, torch.tensor([0.5, float("inf"), 3.5]), torch.tensor(True))  # taken, not finite
    assert _states_equal(combiner.state_dict(), state)
    combiner.after_step(before, after, torch.tensor(True))
    assert combiner.state_dict()["critic"]["step"].item() == 2


def test_device_steps_learn_the_logits_the_eager_update_learns():
    results = []
    for device_steps in (False, True):
        update = _update(device_steps=device_steps)
        generator, draws = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        for seed in range(3):
            update(_batch(seed=seed), generator, draws)
        results.append(update.combiner.state_dict())
    torch.testing.assert_close(results[1]["critic"]["logits"], results[0]["critic"]["logits"], rtol=1e-6, atol=1e-9)
    assert torch.equal(results[1]["critic"]["step"], results[0]["critic"]["step"])


def _train(run_dir, *overrides):
    trainer = Trainer(toy_config(run_dir, *overrides), run_dir)
    assert trainer.train() == 0
    return trainer


def test_resume_restores_the_logits_and_their_adam_state_exactly(tmp_path):
    overrides = ["combiner.name=famo", "combiner.networks=[critic]", "checkpoint.save_buffer=true"]
    # 40 ends an episode: from there a resumed run continues bit for bit
    overrides += ["train.warmup_steps=20", "train.total_steps=80", "checkpoint.every=40", "eval.every=0"]
    straight = _train(tmp_path / "straight", *overrides)
    split = tmp_path / "split"
    _train(split, *overrides, "train.total_steps=40")
    resumed = Trainer.resume(split, overrides)
    assert resumed.combiner.state_dict()["critic"]["step"].item() == 21  # the updates of steps 20 to 40
    assert resumed.train() == 0
    assert _states_equal(resumed.combiner.state_dict(), straight.combiner.state_dict())
    for name, tensor in straight.agent.state_dict().items():
        assert torch.equal(resumed.agent.state_dict()[name], tensor), name


def test_a_state_of_other_keys_is_refused():
    with pytest.raises(ValueError, match=r"^FAMO state of 'critic' must hold \['exp_avg', 'exp_avg_sq', 'logits'"):
        make_combiner("famo").load_state_dict({"critic": {"logits": torch.zeros(3)}})


def test_calling_it_without_losses_is_refused():
    with pytest.raises(ValueError, match="FAMO weighs the task losses"):
        make_combiner("famo")(torch.ones(2, 3))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], r"combiner.networks must be \[critic\], found \['critic', 'actor'\]"),
        (["combiner.networks=[critic]", "train.compile=default"], "train.compile must be none for combiner 'famo'"),
        (["combiner.networks=[critic]", "combiner.logit_lr=0"], r"`logit_lr` must be > 0, found 0"),
        (["combiner.networks=[critic]", "combiner.variant=port"], "`variant` must be one of 'paper', 'mtrl'"),
    ],
)
def test_the_config_refuses_what_famo_cannot_do(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        toy_config(tmp_path, "combiner.name=famo", *overrides)
