"""Multi-task SAC: per-task losses, and one update that reads top to bottom.

Each update builds K per-task losses for the critics, the actor and the temperature. For every
network, the losses go through one stage: per-task gradients of the shared parameters ->
combiner -> `.grad` -> optimizer step. Nothing is stepped until every loss and gradient of the
update is known to be finite, so a bad batch changes neither weights nor optimizer state.
The maths, with the choices made here, is in docs/mtsac.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from mtrl.buffer import Batch
from mtrl.combiners import Combiner
from mtrl.config import AgentConfig
from mtrl.jacobian import (
    TaskGradients,
    TaskObjective,
    mean_backward,
    task_jacobian,
    write_shared_grad,
    write_task_grads,
)
from mtrl.networks import Actor, TwinCritic, squashed_sample, task_parameter_names

NETWORKS = ("critic", "actor", "alpha")


@dataclass
class UpdateResult:
    finite: bool
    metrics: dict[str, torch.Tensor]  # scalars and per-task vectors, still on the device


@dataclass
class StageResult:
    """What one network's stage leaves besides `.grad`: per-task losses and aux, and which tasks took part."""

    losses: torch.Tensor  # [K]; NaN for tasks that were not drawn
    aux: torch.Tensor  # [K]; NaN for tasks that were not drawn
    finite: torch.Tensor  # whether every computed loss is finite (a 0-d bool on the device)
    drawn: torch.Tensor | None  # indices of the drawn tasks; None: every task
    task_matrix: torch.Tensor | None  # [K, n] shared-parameter gradients, kept for task-wise optimizers


def split_parameters(module: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(shared, task-specific) parameters of `module`; task-specific ones have a leading task dimension."""
    task_names = task_parameter_names(module)
    shared, task = {}, {}
    for name, p in module.named_parameters():
        (task if name in task_names else shared)[name] = p
    return shared, task


def soft_bellman_target(
    reward: torch.Tensor,
    terminated: torch.Tensor,
    q1_next: torch.Tensor,
    q2_next: torch.Tensor,
    next_logp: torch.Tensor,
    alpha: torch.Tensor,
    gamma: float,
    clip: float | None = None,
) -> torch.Tensor:
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


class MTSAC(nn.Module):
    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        num_tasks: int,
        cfg: AgentConfig,
        combiner: Combiner,
        combined: list[str],
        optimizer: str = "adam",
        grad_clip_norm: float | None = None,
        q_target_clip: float | None = None,
    ):
        super().__init__()
        multihead = cfg.variant == "multihead"
        self.cfg, self.num_tasks, self.act_dim = cfg, num_tasks, act_dim
        self.actor = Actor(obs_dim, act_dim, cfg.hidden_sizes, num_tasks, multihead, cfg.log_std_min, cfg.log_std_max)
        self.critic = TwinCritic(obs_dim, act_dim, cfg.hidden_sizes, num_tasks, multihead)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        n_alpha = 1 if cfg.shared_temperature else num_tasks
        self.log_alpha = nn.Parameter(torch.full((n_alpha,), math.log(cfg.init_temperature)))
        self.target_entropy = -float(act_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.combiner, self.combined = combiner, set(combined)
        self.optimizer_name = optimizer
        self.grad_clip_norm, self.q_target_clip = grad_clip_norm, q_target_clip

        self.params: dict[str, tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]] = {
            "critic": split_parameters(self.critic),
            "actor": split_parameters(self.actor),
            "alpha": ({"log_alpha": self.log_alpha}, {})
            if cfg.shared_temperature
            else ({}, {"log_alpha": self.log_alpha}),
        }
        lrs = {"critic": cfg.critic_lr, "actor": cfg.actor_lr, "alpha": cfg.alpha_lr}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for net, (shared, task) in self.params.items():
            if optimizer == "adatask" and shared:
                from mtrl.adatask import AdaTask

                self.optimizers[f"{net}_shared"] = AdaTask(list(shared.values()), num_tasks, lr=lrs[net])
                if task:
                    self.optimizers[net] = torch.optim.Adam(list(task.values()), lr=lrs[net])
            else:
                self.optimizers[net] = torch.optim.Adam([*shared.values(), *task.values()], lr=lrs[net])

    # ----- acting -------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None, deterministic: bool = False):
        """One action per task for `obs` of shape [K, obs_dim] (a sample, or the mean action)."""
        obs = obs.unsqueeze(1)  # [K, 1, obs_dim]: multi-head layers need the task dimension first
        if deterministic:
            return self.actor.deterministic(obs).squeeze(1)
        noise = torch.randn(*obs.shape[:2], self.act_dim, generator=generator, device=obs.device)
        return self.actor.sample(obs, noise)[0].squeeze(1)

    def alpha(self) -> torch.Tensor:
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
    def bellman_target(self, batch: Batch, noise: torch.Tensor) -> torch.Tensor:
        """Soft Bellman targets `[K, B]` of the batch, with next actions drawn from `noise`."""
        next_action, next_logp = self.actor.sample(batch.next_obs, noise)
        q1_next, q2_next = self.critic_target(batch.next_obs, next_action)
        return soft_bellman_target(
            batch.reward,
            batch.terminated,
            q1_next,
            q2_next,
            next_logp,
            self.alpha(),
            self.cfg.gamma,
            self.q_target_clip,
        )

    def critic_objective(self, batch: Batch, target: torch.Tensor) -> TaskObjective:
        shared, task = self.params["critic"]
        return TaskObjective("critic", self._critic_loss, shared, task, (batch.obs, batch.action, target))

    def actor_objective(self, batch: Batch, noise: torch.Tensor) -> TaskObjective:
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
            "actor", self._actor_loss, shared, task, inputs, ({n: p.detach() for n, p in critic_shared.items()},)
        )

    def alpha_objective(self, mean_logp: torch.Tensor) -> TaskObjective:
        shared, task = self.params["alpha"]
        return TaskObjective("alpha", self._alpha_loss, shared, task, (mean_logp,))

    # ----- the update ----------------------------------------------------------------------
    def update(
        self,
        batch: Batch,
        generator: torch.Generator,
        combiner_generator: torch.Generator,
        diagnostics: bool = False,
    ) -> UpdateResult:
        """One SAC update on a stratified batch: target -> critic -> actor -> temperature -> one
        finiteness decision -> step. `generator` draws the policy noise (on the batch's device);
        `combiner_generator` (CPU) draws task subsets and PCGrad's orders."""
        k, b = batch.reward.shape
        device = batch.obs.device
        next_noise = torch.randn(k, b, self.act_dim, generator=generator, device=device)
        target = self.bellman_target(batch, next_noise)
        tasks = self._draw_tasks(k, combiner_generator, device)
        actor_noise = torch.randn(k, b, self.act_dim, generator=generator, device=device)
        metrics: dict[str, torch.Tensor] = {}

        def stage(objective: TaskObjective) -> StageResult:
            return self._stage(objective, tasks, combiner_generator, diagnostics, metrics)

        critic = stage(self.critic_objective(batch, target))
        actor = stage(self.actor_objective(batch, actor_noise))
        # A task whose actor loss was not drawn has no log-prob this update: the target entropy's
        # value gives its temperature a zero gradient, and `_step` leaves it untouched anyway.
        mean_logp = actor.aux
        if actor.drawn is not None:
            mean_logp = torch.full_like(actor.aux, -self.target_entropy).index_copy(
                0, actor.drawn, actor.aux.index_select(0, actor.drawn)
            )
        temperature = stage(self.alpha_objective(mean_logp))
        stages = {"critic": critic, "actor": actor, "alpha": temperature}

        finite = torch.stack([s.finite for s in stages.values()]).all()
        for net, s in stages.items():
            for p in self._parameters_of(net):
                finite &= torch.isfinite(p.grad).all()
            metrics[f"loss/{net}"] = s.losses
        metrics["q_mean"] = critic.aux
        metrics["entropy"] = -actor.aux
        metrics["alpha"] = self.alpha()
        ok = bool(finite.item())  # the update's one host sync
        if ok:
            self._step(stages)
        self.zero_grad(set_to_none=True)
        return UpdateResult(ok, metrics)

    def _draw_tasks(self, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
        """The tasks this update's combined losses use (None: all of them)."""
        if not self.combined:
            return None
        tasks = self.combiner.select_tasks(k, generator)
        return None if tasks.numel() == k else tasks.to(device)

    def _parameters_of(self, net: str) -> list[nn.Parameter]:
        shared, task = self.params[net]
        return [*shared.values(), *task.values()]

    def _stage(
        self,
        objective: TaskObjective,
        tasks: torch.Tensor | None,
        generator: torch.Generator,
        diagnostics: bool,
        metrics: dict,
    ) -> StageResult:
        """Per-task gradients -> combiner -> `.grad` for one network."""
        net = objective.name
        shared, task = objective.shared, objective.task
        combined = net in self.combined and bool(shared)
        drawn = tasks if combined else None
        task_wise = self.optimizer_name == "adatask" and bool(shared)
        if not (task_wise or (combined and (self.combiner.needs_jacobian or diagnostics or drawn is not None))):
            losses, aux = mean_backward(objective)
            return StageResult(losses, aux, torch.isfinite(losses).all(), None, None)
        grads: TaskGradients = task_jacobian(objective, drawn)
        write_task_grads(task, grads.task, grads.tasks)
        if task_wise:  # the shared .grad (the mean) feeds the finiteness check and the clipping norm
            update = grads.matrix.mean(0)
        else:
            update = self.combiner(grads.matrix, generator=generator) if combined else grads.matrix.mean(0)
        write_shared_grad(shared, update)
        if diagnostics and combined:
            metrics.update(gradient_diagnostics(net, grads.matrix, update, self.combiner.last_weights))
        losses, aux = grads.losses, grads.aux
        finite = torch.isfinite(losses).all()
        if drawn is not None:  # tasks that were not drawn have no loss this update
            losses = losses.new_full((self.num_tasks,), float("nan")).index_copy(0, drawn, losses)
            aux = aux.new_full((self.num_tasks,), float("nan")).index_copy(0, drawn, aux)
        return StageResult(losses, aux, finite, drawn, grads.matrix if task_wise else None)

    def _step(self, stages: dict[str, StageResult]) -> None:
        """Clip, step every optimizer, then the target critics.

        The task-specific slices of tasks that took no part in a stage (and their optimizer
        moments) are put back after the step: a zero gradient would still move them through
        Adam's momentum. The temperature of a task follows its actor loss.
        """
        drawn = {net: s.drawn for net, s in stages.items()}
        drawn["alpha"] = stages["actor"].drawn
        saved = [self._undrawn_slices(net, tasks) for net, tasks in drawn.items() if tasks is not None]
        if self.grad_clip_norm is not None:
            for net, s in stages.items():
                norm = torch.nn.utils.clip_grad_norm_(self._parameters_of(net), self.grad_clip_norm)
                if s.task_matrix is not None:  # a task-wise optimizer steps on the rows: clip them alike
                    s.task_matrix.mul_(torch.clamp(self.grad_clip_norm / (norm + 1e-6), max=1.0))
        for name, opt in self.optimizers.items():
            if name.endswith("_shared"):  # AdaTask: consumes the per-task gradient matrix itself
                opt.step_tasks(stages[name.removesuffix("_shared")].task_matrix)
            else:
                opt.step()
        for slices in saved:
            _put_back(slices)
        polyak_update(self.critic_target, self.critic, self.cfg.tau)

    def _undrawn_slices(self, net: str, drawn: torch.Tensor) -> list[tuple]:
        """Copies of the undrawn tasks' slices of `net`'s task-specific parameters and moments."""
        _, task = self.params[net]
        opt = self.optimizers[net]  # holds the task-specific parameters, whatever steps the shared ones
        out = []
        for p in task.values():
            undrawn = torch.ones(p.shape[0], dtype=torch.bool, device=p.device).index_fill_(0, drawn, False)
            moments = {key: v.clone() for key, v in opt.state.get(p, {}).items() if _is_moment(v, p)}
            out.append((opt, p, undrawn, p.detach().clone(), moments))
        return out


def _is_moment(value: object, p: nn.Parameter) -> bool:
    return torch.is_tensor(value) and value.shape == p.shape


@torch.no_grad()
def _put_back(slices: list[tuple]) -> None:
    for opt, p, undrawn, old, moments in slices:
        p[undrawn] = old[undrawn]
        for key, value in opt.state[p].items():
            if _is_moment(value, p):  # moments created by this very step start from zero
                value[undrawn] = moments[key][undrawn] if key in moments else 0.0


def gradient_diagnostics(net: str, matrix: torch.Tensor, update: torch.Tensor, weights) -> dict[str, torch.Tensor]:
    """Conflict statistics of the per-task gradients and how the update relates to their mean."""
    norms = matrix.norm(dim=1)
    unit = matrix / norms.clamp_min(1e-12)[:, None]
    cos = unit @ unit.T
    k = matrix.shape[0]
    off = ~torch.eye(k, dtype=torch.bool, device=matrix.device)
    pair_cos = cos[off] if k > 1 else cos.new_ones(1)
    mean_grad = matrix.mean(0)
    angle = torch.rad2deg(
        torch.arccos(torch.clamp(update @ mean_grad / (update.norm() * mean_grad.norm()).clamp_min(1e-12), -1.0, 1.0))
    )
    out = {
        f"combiner/{net}/cos_mean": pair_cos.mean(),
        f"combiner/{net}/cos_min": pair_cos.min(),
        f"combiner/{net}/conflict_share": (pair_cos < 0).float().mean(),
        f"combiner/{net}/grad_norm": norms,
        f"combiner/{net}/update_angle_deg": angle,
        f"combiner/{net}/update_norm": update.norm(),
    }
    if weights is not None:
        out[f"combiner/{net}/weights"] = weights
    return out
