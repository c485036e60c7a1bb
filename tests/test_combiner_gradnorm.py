"""GradNorm (Chen et al., ICML 2018): weight updates against a float64 loop of the paper's Algorithm 1
(L_grad differentiated by autograd, torch.optim.Adam on w) and of the v3 reference code's variant, the
last shared layer of the agent's networks, state round trips, and updates that must change nothing."""

import pytest
import torch

from mtrl.bench import ACT_DIM, OBS_DIM, synthetic_batch
from mtrl.combiners import make_combiner
from mtrl.combiners.base import TaskLosses
from mtrl.combiners.gradnorm import last_shared_layer
from mtrl.config import AgentConfig, ConfigError
from mtrl.optim import Optimization
from mtrl.sac import MTSAC, SACUpdate
from tests.conftest import toy_config

LAYOUT = (("q1.trunk.0.weight", 6), ("q1.head.weight", 3), ("q2.trunk.0.weight", 6), ("q2.head.weight", 3))
LAST_LAYER = [6, 7, 8, 15, 16, 17]


class Algorithm1:
    """GradNorm's weight update for one network, in float64, written independently of the combiner."""

    def __init__(self, k: int, alpha: float, lr: float, hold_target: bool, min_loss: float):
        self.weights = torch.ones(k, dtype=torch.float64, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.weights], lr=lr)
        self.alpha, self.hold_target, self.initial = alpha, hold_target, None
        self.min_loss = min_loss

    def step(self, norms: list[float], losses: list[float]) -> None:
        k = len(losses)
        losses = [loss - self.min_loss for loss in losses]
        if self.initial is None:
            self.initial = list(losses)
        ratios = [loss / first for loss, first in zip(losses, self.initial, strict=True)]
        rates = [ratio / (sum(ratios) / k) for ratio in ratios]
        grad_norms = self.weights * torch.tensor(norms, dtype=torch.float64)
        mean = grad_norms.mean()
        if self.hold_target:
            mean = mean.detach()
        targets = torch.stack([mean * rate**self.alpha for rate in rates])
        loss = (grad_norms - targets).abs().sum()
        self.optimizer.zero_grad()
        (self.weights.grad,) = torch.autograd.grad(loss, self.weights)
        self.optimizer.step()
        with torch.no_grad():
            self.weights.clamp_(min=1e-3)
            self.weights.mul_(k / self.weights.sum())


@pytest.mark.parametrize(("variant", "min_loss"), [("paper", 0.0), ("reference", 0.0), ("paper", -3.0)])
def test_weight_updates_follow_the_algorithm(variant, min_loss):
    k, steps, alpha, lr = 4, 15, 1.5, 0.05
    combiner = make_combiner("gradnorm", alpha=alpha, weight_lr=lr, variant=variant, min_loss=min_loss)
    reference = Algorithm1(k, alpha, lr, hold_target=variant == "paper", min_loss=min_loss)
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(k, generator=generator, dtype=torch.float64) + 0.5 + min_loss  # some negative if ℓ* < 0
    for _ in range(steps):
        matrix = torch.randn(k, 18, generator=generator, dtype=torch.float64) * torch.tensor([[0.5], [1], [2], [4]])
        losses = losses * (0.8 + 0.3 * torch.rand(k, generator=generator, dtype=torch.float64))
        used = reference.weights.detach().clone()
        columns = matrix[:, LAST_LAYER] if variant == "paper" else matrix
        norms = [sum(x * x for x in row) ** 0.5 for row in columns.tolist()]
        reference.step(norms, losses.tolist())
        task_losses = TaskLosses("critic", losses, LAYOUT)
        update = combiner(matrix, losses=task_losses)
        if variant == "paper":  # the step uses the weights from before their update, at the mean's scale
            torch.testing.assert_close(update, used @ matrix / k, rtol=1e-12, atol=1e-12)
        else:  # the new weights, summed
            torch.testing.assert_close(update, reference.weights.detach() @ matrix, rtol=1e-12, atol=1e-12)
        combiner.after_step(task_losses, None, None)
        torch.testing.assert_close(combiner.task_weights("critic"), reference.weights.detach(), rtol=1e-12, atol=0)
    assert combiner.task_weights("critic").sum().item() == pytest.approx(k, rel=1e-12)
    assert (combiner.task_weights("critic") - 1).abs().max() > lr  # the weights moved


def test_the_first_update_is_the_mean():
    matrix = torch.randn(3, 18, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    update = make_combiner("gradnorm")(matrix, losses=TaskLosses("critic", torch.ones(3), LAYOUT))
    torch.testing.assert_close(update, matrix.mean(0), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    ("architecture", "network", "expected"),
    [
        ("conditioned", "critic", {f"q{i}.net.head.{p}" for i in (1, 2) for p in ("weight", "bias")}),
        ("multihead", "critic", {f"q{i}.net.trunk.2.{p}" for i in (1, 2) for p in ("weight", "bias")}),
        ("conditioned", "actor", {"net.head.weight", "net.head.bias"}),
        ("multihead", "actor", {"net.trunk.2.weight", "net.trunk.2.bias"}),
        ("moore", "critic", {f"q{i}.net.experts.2.{p}" for i in (1, 2) for p in ("weight", "bias")}),
    ],
)
def test_the_last_shared_layer_of_the_agents_networks(architecture, network, expected):
    agent = MTSAC(5, 2, 3, AgentConfig(hidden_sizes=[8, 8], architecture=architecture))
    layout = [(name, p.numel()) for name, p in agent.params[network].shared.items()]
    columns, start = [], 0
    for name, size in layout:
        if name in expected:
            columns.extend(range(start, start + size))
        start += size
    assert last_shared_layer(layout) == columns
    assert last_shared_layer(LAYOUT) == LAST_LAYER


def _stepped(combiner, seed: int) -> TaskLosses:
    generator = torch.Generator().manual_seed(seed)
    losses = TaskLosses("critic", torch.rand(3, generator=generator) + 0.5, LAYOUT)
    combiner(torch.randn(3, 18, generator=generator), losses=losses)
    return losses


def test_the_state_round_trips_through_a_file_and_continues_alike(tmp_path):
    combiner = make_combiner("gradnorm", weight_lr=0.1)
    for seed in range(3):
        combiner.after_step(_stepped(combiner, seed), None, None)
    torch.save(combiner.state_dict(), tmp_path / "state.pt")
    restored = make_combiner("gradnorm", weight_lr=0.1)
    restored.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert set(restored.state_dict()["critic"]) == {"weights", "exp_avg", "exp_avg_sq", "step", "initial_losses"}
    for each in (combiner, restored):
        each.after_step(_stepped(each, 7), None, None)
    assert torch.equal(restored.task_weights("critic"), combiner.task_weights("critic"))
    assert torch.equal(
        restored.state_dict()["critic"]["initial_losses"], combiner.state_dict()["critic"]["initial_losses"]
    )


def test_an_update_not_taken_or_not_finite_changes_nothing():
    combiner = make_combiner("gradnorm", weight_lr=0.1)
    combiner.after_step(_stepped(combiner, 0), None, None)
    state = combiner.state_dict()
    combiner.after_step(_stepped(combiner, 1), None, torch.tensor(False))
    assert all(torch.equal(combiner.state_dict()["critic"][key], value) for key, value in state["critic"].items())
    losses = TaskLosses("critic", torch.tensor([1.0, -1.0, 1.0]), LAYOUT)  # a negative training rate: r^α is NaN
    combiner(torch.randn(3, 18), losses=losses)
    combiner.after_step(losses, None, torch.tensor(True))
    assert all(torch.equal(combiner.state_dict()["critic"][key], value) for key, value in state["critic"].items())


def test_a_skipped_update_leaves_the_weights_and_their_first_losses_unset():
    torch.manual_seed(0)
    agent = MTSAC(OBS_DIM + 3, ACT_DIM, 3, AgentConfig(hidden_sizes=[16, 16]))
    update = SACUpdate(
        agent, Optimization(agent.params, "adam", agent.learning_rates, 3), make_combiner("gradnorm"), ["critic"]
    )
    generator, draws = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    bad = synthetic_batch(3, 8, OBS_DIM, torch.device("cpu"), generator)
    bad.reward[0, 0] = float("nan")
    assert not update(bad, generator, draws).finite
    assert update.combiner.state_dict() == {}  # L(0) is not taken from a skipped update
    good = synthetic_batch(3, 8, OBS_DIM, torch.device("cpu"), generator)
    assert update(good, generator, draws).finite
    assert torch.isfinite(update.combiner.state_dict()["critic"]["initial_losses"]).all()


def test_the_config_refuses_networks_whose_losses_change_sign(tmp_path):
    with pytest.raises(ConfigError, match=r"gradnorm's training rates .* found \['critic', 'actor'\]"):
        toy_config(tmp_path, "combiner.name=gradnorm")
    assert toy_config(tmp_path, "combiner.name=gradnorm", "combiner.networks=[critic]").combiner.alpha == 0.12
