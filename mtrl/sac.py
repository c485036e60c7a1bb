"""Multi-task SAC: the agent's networks and per-task losses, and one update that reads top to bottom.

`MTSAC` holds the actor, the twin critics and their targets, the temperatures, the per-task losses
and `act`. `SACUpdate` is one update on a stratified batch:

    Bellman target -> critic gradients -> actor gradients -> temperature gradients
        -> one finiteness decision -> step (optimizers, then the target critics)

Every network's per-task losses become `.grad` the same way (`network_gradients`): the combiner's
direction for the shared parameters, each task's own gradient for the task-specific ones. Nothing
is stepped until every loss and gradient of the update is known to be finite, so a bad batch
changes neither weights nor optimizer state. The maths, with the choices made here, is in
docs/mtsac.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtrl.buffer import Batch
from mtrl.combiners import Combiner
from mtrl.combiners.base import TaskLosses, move
from mtrl.combiners.diagnostics import gradient_diagnostics
from mtrl.config import AgentConfig
from mtrl.jacobian import (
    JacobianBuffer,
    TaskObjective,
    mean_backward,
    task_jacobian,
    task_losses,
    weighted_backward,
    write_shared_grad,
    write_task_grads,
)
from mtrl.networks import Actor, TwinCritic, squashed_sample, task_parameter_names
from mtrl.optim import NetworkParameters, Optimization

NETWORKS = ("critic", "actor", "alpha")


def split_parameters(module: nn.Module) -> NetworkParameters:
    """(shared, task-specific) parameters of `module`; task-specific ones have a leading task dimension."""
    task_names = task_parameter_names(module)
    shared, task = {}, {}
    for name, p in module.named_parameters():
        (task if name in task_names else shared)[name] = p
    return NetworkParameters(shared, task)


def soft_bellman_target(
    reward: Tensor,
    terminated: Tensor,
    q1_next: Tensor,
    q2_next: Tensor,
    next_logp: Tensor,
    alpha: Tensor,
    gamma: float,
    clip: float | None = None,
) -> Tensor:
    """r + γ (1 − terminated) (min(Q1', Q2') − α log π(a'|s')), all `[K, B]` except α `[K]`.

    Only a real termination stops the bootstrap: at a time limit, s' is the true final observation
    and the target bootstraps through it (docs/mtsac.md, "Bellman target").
    """
    next_value = torch.minimum(q1_next, q2_next) - alpha[:, None] * next_logp
    target = reward + gamma * (1.0 - terminated) * next_value
    return target if clip is None else target.clamp(-clip, clip)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 − τ) target + τ source, parameter by parameter."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


@torch.no_grad()
def polyak_update_where(target: nn.Module, source: nn.Module, tau: float, where: Tensor) -> None:
    """`polyak_update` taken only where `where` (a 0-d bool tensor) holds, decided on the device."""
    for t, p in zip(target.parameters(), source.parameters(), strict=True):
        t.copy_(torch.where(where, t.lerp(p, tau), t))


def policy_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Standard normal noise drawn on `generator`'s own device, then moved to `device`.

    The update draws all its noise here, so a CPU generator can drive an update on a GPU (the
    stream then does not depend on where the update runs); with a generator on `device` this is
    `torch.randn(..., device=device)`.
    """
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class MTSAC(nn.Module):
    """Actor, twin critics and their targets, and the temperatures of K tasks, with their per-task losses."""

    def __init__(self, obs_dim: int, act_dim: int, num_tasks: int, cfg: AgentConfig):
        super().__init__()
        self.cfg, self.num_tasks, self.act_dim = cfg, num_tasks, act_dim
        network = (cfg.architecture, cfg.hyper_parameters())
        self.actor = Actor(obs_dim, act_dim, cfg.hidden_sizes, num_tasks, cfg.log_std_min, cfg.log_std_max, *network)
        self.critic = TwinCritic(obs_dim, act_dim, cfg.hidden_sizes, num_tasks, *network)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        n_alpha = 1 if cfg.shared_temperature else num_tasks
        self.log_alpha = nn.Parameter(torch.full((n_alpha,), math.log(cfg.init_temperature)))
        self.target_entropy = -float(act_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.params: dict[str, NetworkParameters] = {
            "critic": split_parameters(self.critic),
            "actor": split_parameters(self.actor),
            "alpha": NetworkParameters({"log_alpha": self.log_alpha}, {})
            if cfg.shared_temperature
            else NetworkParameters({}, {"log_alpha": self.log_alpha}),
        }

    @property
    def learning_rates(self) -> dict[str, float]:
        return {"critic": self.cfg.critic_lr, "actor": self.cfg.actor_lr, "alpha": self.cfg.alpha_lr}

    # ----- acting -------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: Tensor, generator: torch.Generator | None = None, deterministic: bool = False) -> Tensor:
        """One action per task for `obs` of shape [K, obs_dim] (a sample, or the mean action)."""
        obs = obs.unsqueeze(1)  # [K, 1, obs_dim]: multi-head layers need the task dimension first
        if deterministic:
            return self.actor.deterministic(obs).squeeze(1)
        if generator is None:
            noise = torch.randn(*obs.shape[:2], self.act_dim, device=obs.device)
        else:
            noise = policy_noise((*obs.shape[:2], self.act_dim), generator, obs.device)
        return self.actor.sample(obs, noise)[0].squeeze(1)

    def alpha(self) -> Tensor:
        """Per-task temperatures, shape [K]."""
        return self.log_alpha.detach().exp().expand(self.num_tasks)

    # ----- per-task losses (pure functions of one task's slice) ----------------------------
    def _critic_loss(self, shared, task, inputs, consts):
        obs, action, target = inputs
        q1, q2 = functional_call(self.critic, {**shared, **task}, (obs, action))
        # The sum of the twin MSEs, as in the MT-SAC reference implementations (docs/mtsac.md).
        loss = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
        return loss, q1.detach().mean()

    def _actor_loss(self, shared, task, inputs, consts):
        obs, noise, alpha, critic_task = inputs  # critic_task: this task's critic heads (multi-head)
        (critic_shared,) = consts
        action, logp = squashed_sample(*functional_call(self.actor, {**shared, **task}, (obs,)), noise)
        q1, q2 = functional_call(self.critic, {**critic_shared, **critic_task}, (obs, action))
        loss = (alpha * logp - torch.minimum(q1, q2)).mean()
        return loss, logp.detach().mean()

    def _alpha_loss(self, shared, task, inputs, consts):
        (mean_logp,) = inputs
        log_alpha = {**shared, **task}["log_alpha"].reshape(())
        return -log_alpha * (mean_logp + self.target_entropy), log_alpha.detach()

    # ----- the objectives of one update ----------------------------------------------------
    @torch.no_grad()
    def bellman_target(self, batch: Batch, noise: Tensor, clip: float | None = None) -> Tensor:
        """Soft Bellman targets `[K, B]` of the batch, with next actions drawn from `noise`, clamped to ±`clip`."""
        next_action, next_logp = self.actor.sample(batch.next_obs, noise)
        q1_next, q2_next = self.critic_target(batch.next_obs, next_action)
        return soft_bellman_target(
            batch.reward, batch.terminated, q1_next, q2_next, next_logp, self.alpha(), self.cfg.gamma, clip
        )

    def critic_objective(self, batch: Batch, target: Tensor) -> TaskObjective:
        shared, task = self.params["critic"]
        return TaskObjective(self._critic_loss, shared, task, (batch.obs, batch.action, target))

    def actor_objective(self, batch: Batch, noise: Tensor) -> TaskObjective:
        """Task k's policy against task k's critic: task-specific critic parameters (multi-head
        layers) are sliced per task like the inputs, shared ones are constants."""
        k, b = batch.reward.shape
        shared, task = self.params["actor"]
        critic_shared, critic_task = self.params["critic"]
        inputs = (
            batch.obs,
            noise,
            self.alpha()[:, None].expand(k, b),
            {n: p.detach() for n, p in critic_task.items()},
        )
        return TaskObjective(
            self._actor_loss, shared, task, inputs, ({n: p.detach() for n, p in critic_shared.items()},)
        )

    def alpha_objective(self, mean_logp: Tensor) -> TaskObjective:
        shared, task = self.params["alpha"]
        return TaskObjective(self._alpha_loss, shared, task, (mean_logp,))


# ----- from per-task losses to `.grad` -------------------------------------------------------
@dataclass
class NetworkGradients:
    """What one network's gradients leave besides `.grad`."""

    losses: Tensor  # [K]; NaN for tasks that were not drawn
    aux: Tensor  # [K]; NaN for tasks that were not drawn
    finite: Tensor  # whether every computed loss is finite (a 0-d bool on the device)
    drawn: Tensor | None  # indices of the tasks that took part; None: every task
    matrix: Tensor | None = None  # [k, n] per-task gradients of the shared parameters, when computed
    update: Tensor | None = None  # the direction written to the shared `.grad`, when `matrix` was computed
    weights: Tensor | None = None  # the combiner's task weights of `update`, when a combiner ran
    objective: TaskObjective | None = None  # the losses, to evaluate again after the step
    task_losses: TaskLosses | None = None  # what the combiner saw of the losses, when a combiner ran


def network_gradients(
    objective: TaskObjective,
    combiner: Combiner | None,
    tasks: Tensor | None,
    draws: Tensor | None,
    per_task: bool,
    network: str = "",
    out: JacobianBuffer | None = None,
) -> NetworkGradients:
    """Write `.grad` of one network (named `network`) from its K per-task losses.

    Shared parameters get the combiner's direction d = combiner(G), the plain mean of the rows when
    `combiner` is None; task-specific parameters get their own task's gradient. G, the per-task
    gradient matrix of the shared parameters, is computed in one batched pass (for `tasks` only,
    when given) if `per_task` is set or the combiner needs it; otherwise one backward of the
    losses weighted by the combiner's `loss_weights` (the plain mean: of their sum) gives the
    same `.grad` as d = Gᵀw would. G is written into `out` if given.
    """
    layout = tuple((name, p.numel()) for name, p in objective.shared.items())

    def seen(values: Tensor) -> TaskLosses:
        return TaskLosses(network, values, layout)

    if not per_task and (combiner is None or not combiner.needs_jacobian):
        if combiner is None:
            losses, aux = mean_backward(objective)
            return NetworkGradients(losses, aux, torch.isfinite(losses).all(), None)
        losses, aux, weights = weighted_backward(objective, lambda values: combiner.loss_weights(seen(values)))
        finite = torch.isfinite(losses).all()
        return NetworkGradients(
            losses, aux, finite, None, weights=weights, objective=objective, task_losses=seen(losses)
        )
    grads = task_jacobian(objective, tasks, out)
    write_task_grads(objective.task, grads.task, tasks)
    losses, aux = grads.losses, grads.aux
    update = grads.matrix.mean(0) if combiner is None else combiner(grads.matrix, draws=draws, losses=seen(losses))
    write_shared_grad(objective.shared, update)
    finite = torch.isfinite(losses).all()
    record = None if combiner is None else seen(losses)
    if tasks is not None:  # tasks that were not drawn have no loss this update
        losses = losses.new_full((objective.num_tasks,), float("nan")).index_copy(0, tasks, losses)
        aux = aux.new_full((objective.num_tasks,), float("nan")).index_copy(0, tasks, aux)
    weights = None if combiner is None else combiner.last_weights
    return NetworkGradients(losses, aux, finite, tasks, grads.matrix, update, weights, objective, record)


def all_finite(tensors: Iterable[Tensor]) -> Tensor:
    """Whether every entry of every tensor is finite, as a 0-d bool on their device (no host read)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


# ----- the update ----------------------------------------------------------------------------
@dataclass
class UpdateResult:
    finite: bool
    metrics: dict[str, Tensor]  # scalars and per-task vectors, still on the device


@dataclass
class UpdateGradients:
    """One update up to its finiteness decision: every network's gradients, the metrics, and the decision."""

    critic: NetworkGradients
    actor: NetworkGradients
    alpha: NetworkGradients
    finite: Tensor  # 0-d bool on the device
    metrics: dict[str, Tensor]


class UpdateHook:
    """Points inside an update where tests and instrumentation may look (and, for gradients, write).

    Subclass and override what you need; pass instances to `SACUpdate(hooks=...)` or append them
    to its `hooks` list.
    """

    def on_target(self, target: Tensor) -> None:
        """The Bellman targets `[K, B]` of this update, as the critic loss uses them."""

    def on_gradients(self, network: str, parameters: list[nn.Parameter]) -> None:
        """`network`'s `.grad` has been written; the finiteness decision, next, sees changes made here."""

    def on_step(self, network: str, parameters: list[nn.Parameter]) -> None:
        """`network` is about to step: `.grad` as its optimizer steps on it (clipped). Eagerly only
        for an update that is taken; with the steps decided on the device (`mtrl.compiled`), for
        every update, the step then being taken or not by the flag."""


class UpdateDraws(NamedTuple):
    """An update's randomness, drawn before its first gradient (`SACUpdate.draw`)."""

    next_noise: Tensor  # [K, B, act_dim]: the next actions of the Bellman target
    actor_noise: Tensor  # [K, B, act_dim]: the actions of the actor loss
    tasks: Tensor | None  # the tasks a sampling combiner drew (None: all of them)
    combiner: dict[str, Tensor | None]  # each combined network's combiner randomness


class SACUpdate:
    """One multi-task SAC update: `update(batch, generator, combiner_generator, diagnostics)`.

    `combined` names the networks whose shared parameters go through `combiner` (the others get
    the plain mean); a task-wise optimizer (AdaTask) replaces the combiner. `q_target_clip` clamps
    the Bellman targets. `generator` draws the policy noise; `combiner_generator` (on the CPU) draws
    a sampling combiner's tasks and any randomness of the combiner itself (`draw_combiner`), all
    before the first gradient.

    An update reads draw -> gradients -> step. Between the sampled batch and the finiteness read,
    it (`gradients`) is a function of tensors with no host synchronisation and, except for a
    sampling combiner's subset (SDMGrad-OS, drawn on the CPU before anything else), fixed shapes:
    `mtrl.compiled.CompiledUpdate` runs it, steps included, as one function on the device, under
    `torch.compile` if asked (`train.compile`).
    """

    def __init__(
        self,
        agent: MTSAC,
        optimization: Optimization,
        combiner: Combiner,
        combined: Iterable[str] = ("critic", "actor"),
        q_target_clip: float | None = None,
        hooks: Sequence[UpdateHook] = (),
    ):
        unknown = sorted(set(combined) - set(NETWORKS))
        if unknown:
            raise ValueError(f"unknown network(s) {unknown} to combine; choose from: {', '.join(NETWORKS)}")
        self.agent, self.optimization, self.combiner = agent, optimization, combiner
        self.q_target_clip = q_target_clip
        self.hooks = list(hooks)
        # The networks combined for real (a network without shared parameters has nothing to
        # combine): they get the combiner's tasks and direction, and the diagnostics.
        self.combined = [net for net in NETWORKS if net in combined and agent.params[net].shared]
        self.combiners: dict[str, Combiner | None] = {
            net: combiner if net in self.combined and not optimization[net].takes_task_gradients else None
            for net in NETWORKS
        }
        self.jacobians = {net: JacobianBuffer() for net in NETWORKS}  # each network's G, kept between updates

    def __call__(
        self,
        batch: Batch,
        generator: torch.Generator,
        combiner_generator: torch.Generator,
        diagnostics: bool = False,
    ) -> UpdateResult:
        """One update on a stratified batch `[K, B, ...]`; skipped whole (nothing stepped) unless finite."""
        drawn = self.draw(batch, generator, combiner_generator)
        gradients = self.gradients(batch, drawn.next_noise, drawn.actor_noise, drawn.tasks, drawn.combiner, diagnostics)
        finite = bool(gradients.finite)  # the update's one host synchronisation
        if finite:
            self.step(gradients)
        self.agent.zero_grad(set_to_none=True)
        return UpdateResult(finite, gradients.metrics)

    def draw(self, batch: Batch, generator: torch.Generator, combiner_generator: torch.Generator) -> UpdateDraws:
        """The update's randomness, in a fixed order: the target's noise, the tasks, the actor's noise,
        the combiners' draws."""
        k, b = batch.reward.shape
        device = batch.obs.device
        next_noise = policy_noise((k, b, self.agent.act_dim), generator, device)
        tasks = self.draw_tasks(k, combiner_generator, device)
        actor_noise = policy_noise((k, b, self.agent.act_dim), generator, device)
        draws = self.draw_combiner(k if tasks is None else tasks.numel(), combiner_generator, device)
        return UpdateDraws(next_noise, actor_noise, tasks, draws)

    def draw_tasks(self, k: int, generator: torch.Generator, device: torch.device) -> Tensor | None:
        """The tasks this update's combined losses use (None: all of them), drawn before any gradient."""
        if not self.combined:
            return None
        tasks = self.combiner.select_tasks(k, generator)
        return None if tasks.numel() == k else tasks.to(device)

    def draw_combiner(
        self, num_rows: int, generator: torch.Generator, device: torch.device
    ) -> dict[str, Tensor | None]:
        """Each combined network's combiner randomness for `num_rows` drawn tasks, in the order the
        networks use it, moved to `device` (asynchronously from the CPU)."""
        draws = {}
        for net, combiner in self.combiners.items():
            if combiner is not None:
                drawn = combiner.draw(num_rows, generator)
                draws[net] = None if drawn is None else move(drawn, device)
        return draws

    def gradients(
        self,
        batch: Batch,
        next_noise: Tensor,
        actor_noise: Tensor,
        tasks: Tensor | None,
        draws: dict[str, Tensor | None] | None = None,
        diagnostics: bool = False,
    ) -> UpdateGradients:
        """Targets, then the critic's, the actor's and the temperature's `.grad`, the metrics, and
        whether everything is finite. All losses see the parameters from before this update.
        `draws`: each network's combiner randomness (`draw_combiner`); None: its combiner draws none."""
        draws = draws or {}
        agent = self.agent
        combiner_before = self.combiner.snapshot()
        target = agent.bellman_target(batch, next_noise, self.q_target_clip)
        for hook in self.hooks:
            hook.on_target(target)
        critic = self._network_gradients(
            "critic", agent.critic_objective(batch, target), tasks, draws.get("critic"), diagnostics
        )
        actor = self._network_gradients(
            "actor", agent.actor_objective(batch, actor_noise), tasks, draws.get("actor"), diagnostics
        )
        # A task whose actor loss was not drawn has no log-prob this update: the target entropy's
        # value gives its temperature a zero gradient, and the step leaves it untouched anyway.
        mean_logp = actor.aux
        if actor.drawn is not None:
            mean_logp = torch.full_like(actor.aux, -agent.target_entropy).index_copy(
                0, actor.drawn, actor.aux.index_select(0, actor.drawn)
            )
        alpha = self._network_gradients(
            "alpha", agent.alpha_objective(mean_logp), tasks, draws.get("alpha"), diagnostics
        )

        finite = torch.stack([critic.finite, actor.finite, alpha.finite]).all() & all_finite(
            p.grad for net in NETWORKS for p in agent.params[net].all()
        )
        self.combiner.restore_where(combiner_before, ~finite)  # a skipped update leaves the combiner as it was
        metrics = {
            "loss/critic": critic.losses,
            "loss/actor": actor.losses,
            "loss/alpha": alpha.losses,
            "q_mean": critic.aux,
            "entropy": -actor.aux,
            "alpha": agent.alpha(),
        }
        if diagnostics:
            for net, grads in (("critic", critic), ("actor", actor), ("alpha", alpha)):
                if net in self.combined:
                    metrics.update(gradient_diagnostics(net, grads.matrix, grads.update, grads.weights))
        return UpdateGradients(critic, actor, alpha, finite, metrics)

    def _network_gradients(
        self,
        net: str,
        objective: TaskObjective,
        tasks: Tensor | None,
        draws: Tensor | None,
        diagnostics: bool,
    ) -> NetworkGradients:
        combiner = self.combiners[net]
        per_task = self.optimization[net].takes_task_gradients or (diagnostics and net in self.combined)
        grads = network_gradients(
            objective, combiner, None if combiner is None else tasks, draws, per_task, net, self.jacobians[net]
        )
        for hook in self.hooks:
            hook.on_gradients(net, objective.parameters())
        return grads

    def step(self, gradients: UpdateGradients, where: Tensor | None = None) -> None:
        """Clip and step every network, then move the target critics; with `where` (a 0-d bool
        tensor), all of it only where it holds, decided on the device.

        Tasks that took no part in a network's losses keep its task-specific slices and their
        optimizer moments; a task's temperature follows its actor loss. Last, each combiner ends its
        update (`Combiner.after_step`, given the losses after the step if it needs them), where the
        loss-weighting methods commit what they learned: only for a step that is taken.
        """
        steps = (
            ("critic", gradients.critic, gradients.critic.drawn),
            ("actor", gradients.actor, gradients.actor.drawn),
            ("alpha", gradients.alpha, gradients.actor.drawn),
        )
        for net, grads, drawn in steps:
            task_gradients = self.optimization.clip(net, grads.matrix)
            for hook in self.hooks:
                hook.on_step(net, self.agent.params[net].all())
            if where is None:
                self.optimization.step(net, task_gradients, drawn)
            else:
                self.optimization.step_where(net, task_gradients, drawn, where)
        if where is None:
            polyak_update(self.agent.critic_target, self.agent.critic, self.agent.cfg.tau)
        else:
            polyak_update_where(self.agent.critic_target, self.agent.critic, self.agent.cfg.tau, where)
        for net, grads, _ in steps:
            combiner = self.combiners[net]
            if combiner is not None and grads.task_losses is not None:
                # The same batch, noise and targets at the stepped parameters (FAMO's loss decrease).
                after = task_losses(grads.objective) if combiner.needs_losses_after else None
                combiner.after_step(grads.task_losses, after, where)
