"""A trained policy as `metaworld.evaluation.evaluation` expects it: `eval_action` and `reset`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtrl.networks import Actor
from mtrl.runstate import load


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


def load_policy(checkpoint_path: str | Path, device: str | torch.device = "cpu") -> Policy:
    """Load the actor of an mtrl checkpoint (a file, or a run directory for its latest)."""
    device = torch.device(device)
    return Policy(load(checkpoint_path, map_location=device).actor(device), device)
