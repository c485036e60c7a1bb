"""A trained policy as `metaworld.evaluation.evaluation` expects it: `eval_action` and `reset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtrl.checkpoint import CheckpointError, load
from mtrl.config import ConfigError, config_from_dict
from mtrl.networks import Actor


class Policy:
    """Deterministic (mean) actions of a trained actor; stateless, so `reset` does nothing."""

    def __init__(self, actor: Actor, device: torch.device):
        self.actor, self.device = actor.eval(), device

    @torch.no_grad()
    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=self.device)
        return self.actor.deterministic(obs.unsqueeze(1)).squeeze(1).cpu().numpy()

    def reset(self, env_mask: np.ndarray) -> None:
        return None


def build_actor(state: dict, device: torch.device) -> Actor:
    try:
        cfg = config_from_dict(state["config"])
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"checkpoint holds no usable config: {err}") from None
    dims = state["dims"]
    a = cfg.agent
    actor = Actor(
        dims["obs"],
        dims["act"],
        a.hidden_sizes,
        dims["tasks"],
        a.variant == "multihead",
        a.log_std_min,
        a.log_std_max,
    )
    prefix = "actor."
    weights = {k[len(prefix) :]: v for k, v in state["agent"].items() if k.startswith(prefix)}
    try:
        actor.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"actor weights do not match the checkpoint's config: {str(err).splitlines()[0]}"
        ) from None
    return actor.to(device)


def load_policy(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> Policy:
    """Load the actor of an mtrl checkpoint (a file, or a run directory for its latest)."""
    device = torch.device(device)
    return Policy(build_actor(load(checkpoint_path, map_location=device), device), device)
