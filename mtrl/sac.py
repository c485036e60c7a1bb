"""Multi-task SAC: per-task losses, and one update that reads top to bottom.

Each update builds K per-task losses for the critics, the actor and the temperature. For every
network, the losses go through one stage: per-task gradients of the shared parameters ->
combiner -> `.grad` -> optimizer step. Nothing is stepped until every loss and gradient of the
update is known to be finite, so a bad batch changes neither weights nor optimizer state.
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


def _split_parameters(module: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    task_names = task_parameter_names(module)
    shared, task = {}, {}
    for name, p in module.named_parameters():
        (task if name in task_names else shared)[name] = p
    return shared, task


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
            "critic": _split_parameters(self.critic),
            "actor": _split_parameters(self.actor),
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
        loss = (q1 - target).pow(2).mean() + (q2 - target).pow(2).mean()
        return loss, q1.detach().mean()

    def _actor_loss(self, shared, task, inputs, consts):
        obs, noise, alpha = inputs
        (critic_params,) = consts
        action, logp = squashed_sample(*functional_call(self.actor, {**shared, **task}, (obs,)), noise)
        q1, q2 = functional_call(self.critic, critic_params, (obs, action))
        loss = (alpha * logp - torch.minimum(q1, q2)).mean()
        return loss, logp.detach().mean()

    def _alpha_loss(self, shared, task, inputs, consts):
        (mean_logp,) = inputs
        log_alpha = {**shared, **task}["log_alpha"].reshape(())
        return -log_alpha * (mean_logp + self.target_entropy), log_alpha.detach()

    # ----- the update ----------------------------------------------------------------------
    def update(
        self,
        batch: Batch,
        generator: torch.Generator,
        combiner_generator: torch.Generator,
        diagnostics: bool = False,
    ) -> UpdateResult:
        """One SAC update on a stratified batch. `generator` draws the policy noise (on the
        batch's device); `combiner_generator` (CPU) draws task subsets and PCGrad's orders."""
        k, b = batch.reward.shape
        alpha = self.alpha()
        metrics: dict[str, torch.Tensor] = {}

        # Soft Bellman target; `next_obs` is the true next state, so only real terminations stop
        # the bootstrap and time limits do not.
        with torch.no_grad():
            noise = torch.randn(k, b, self.act_dim, generator=generator, device=batch.obs.device)
            next_action, next_logp = self.actor.sample(batch.next_obs, noise)
            q1_next, q2_next = self.critic_target(batch.next_obs, next_action)
            next_value = torch.minimum(q1_next, q2_next) - alpha[:, None] * next_logp
            target = batch.reward + self.cfg.gamma * (1.0 - batch.terminated) * next_value
            if self.q_target_clip is not None:
                target = target.clamp(-self.q_target_clip, self.q_target_clip)

        tasks = self.combiner.select_tasks(k, combiner_generator) if self.combined else None
        if tasks is not None:
            tasks = None if tasks.numel() == k else tasks.to(batch.obs.device)

        critic_params = {n: p.detach() for n, p in self.critic.named_parameters()}
        actor_noise = torch.randn(k, b, self.act_dim, generator=generator, device=batch.obs.device)
        objectives = {
            "critic": (self._critic_loss, (batch.obs, batch.action, target), ()),
            "actor": (
                self._actor_loss,
                (batch.obs, actor_noise, alpha[:, None].expand(k, b)),
                (critic_params,),
            ),
        }
        finite = torch.ones((), dtype=torch.bool, device=batch.obs.device)
        aux_out = {}
        task_matrices: dict[str, torch.Tensor] = {}  # what AdaTask steps on, per network
        for net in NETWORKS:
            if net == "alpha":
                objectives["alpha"] = (self._alpha_loss, (aux_out["actor"],), ())
            loss_fn, inputs, consts = objectives[net]
            shared, task = self.params[net]
            objective = TaskObjective(net, loss_fn, shared, task, inputs, consts)
            drawn_tasks = tasks if net in self.combined else None
            losses, drawn, aux = self._stage(
                objective, drawn_tasks, combiner_generator, diagnostics, metrics, task_matrices
            )
            finite &= torch.isfinite(losses).all()
            if drawn is not None:  # tasks that were not drawn have no loss this update
                losses = torch.full((k,), float("nan"), device=losses.device).index_copy(0, drawn, losses)
                # An undrawn task's temperature sees log-prob = -target entropy: a zero gradient.
                fill = -self.target_entropy if net == "actor" else float("nan")
                aux = torch.full((k,), fill, device=aux.device).index_copy(0, drawn, aux)
            aux_out[net] = aux
            metrics[f"loss/{net}"] = losses
            for p in objective.parameters():
                finite &= torch.isfinite(p.grad).all()

        metrics["q_mean"] = aux_out["critic"]
        metrics["entropy"] = -aux_out["actor"]
        metrics["alpha"] = alpha
        ok = bool(finite.item())  # the update's one host sync
        if ok:
            self._step(task_matrices)
        self.zero_grad(set_to_none=True)
        return UpdateResult(ok, metrics)

    def _stage(
        self,
        objective: TaskObjective,
        tasks: torch.Tensor | None,
        generator: torch.Generator,
        diagnostics: bool,
        metrics: dict,
        task_matrices: dict[str, torch.Tensor],
    ) -> tuple:
        """Per-task gradients -> combiner -> `.grad` for one network."""
        net = objective.name
        shared, task = objective.shared, objective.task
        combined = net in self.combined and bool(shared)
        adatask = self.optimizer_name == "adatask" and bool(shared)
        if not (adatask or (combined and (self.combiner.needs_jacobian or diagnostics or tasks is not None))):
            losses, aux = mean_backward(objective)
            return losses, None, aux
        grads: TaskGradients = task_jacobian(objective, tasks if combined else None)
        write_task_grads(task, grads.task, grads.tasks)
        if adatask:  # the shared .grad (the mean) only feeds the finiteness check and clipping
            task_matrices[net] = grads.matrix
            update = grads.matrix.mean(0)
        else:
            update = self.combiner(grads.matrix, generator=generator) if combined else grads.matrix.mean(0)
        write_shared_grad(shared, update)
        if diagnostics and combined:
            metrics.update(gradient_diagnostics(net, grads.matrix, update, self.combiner.last_weights))
        return grads.losses, grads.tasks, grads.aux

    def _step(self, task_matrices: dict[str, torch.Tensor]) -> None:
        if self.grad_clip_norm is not None:
            for net in NETWORKS:
                shared, task = self.params[net]
                torch.nn.utils.clip_grad_norm_([*shared.values(), *task.values()], self.grad_clip_norm)
        for name, opt in self.optimizers.items():
            if name.endswith("_shared"):  # AdaTask: consumes the per-task gradient matrix itself
                opt.step_tasks(task_matrices[name.removesuffix("_shared")])
            else:
                opt.step()
        with torch.no_grad():
            target = list(self.critic_target.parameters())
            torch._foreach_lerp_(target, list(self.critic.parameters()), self.cfg.tau)


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
