"""Per-task random state: each agent draws from its own copy of the process-wide torch and numpy generators.

SB3 draws from the process-wide generators; `RngScope` installs a task's states for the time it learns
and puts the process's back after, so the agents neither see each other's draws nor leave the process's
generators changed. A state saves to JSON (`rng_to_json`) and back (`rng_from_json`) exactly.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def fresh_rng(seed: int, device: torch.device) -> dict[str, Any]:
    """Generator states seeded with `seed`: torch, numpy, and the device's when it is a GPU."""
    import torch

    state: dict[str, Any] = {
        "torch": torch.Generator().manual_seed(seed).get_state(),
        "numpy": np.random.RandomState(seed).get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return state


def _capture_rng(device: torch.device) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _install_rng(state: dict[str, Any], device: torch.device) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class RngScope:
    """Installs a task's generator states in torch and numpy, and puts back the previous ones after."""

    def __init__(self, state: dict[str, Any], device: torch.device):
        self.state, self.device = state, device

    def __enter__(self) -> None:
        self.outer = _capture_rng(self.device)
        _install_rng(self.state, self.device)

    def __exit__(self, *exc: object) -> None:
        self.state.update(_capture_rng(self.device))
        _install_rng(self.outer, self.device)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """`state` as JSON values: the generators' bytes in base64."""
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out: dict[str, Any] = {
        "torch": _b64(state["torch"].numpy().tobytes()),
        "numpy": [kind, _b64(np.asarray(keys, dtype="<u4").tobytes()), int(pos), int(has_gauss), float(cached)],
    }
    if "cuda" in state:
        out["cuda"] = _b64(state["cuda"].numpy().tobytes())
    return out


def rng_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The state that `rng_to_json` wrote."""
    import torch

    def tensor(text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())

    kind, keys, pos, has_gauss, cached = data["numpy"]
    state: dict[str, Any] = {
        "torch": tensor(data["torch"]),
        "numpy": (kind, np.frombuffer(base64.b64decode(keys), dtype="<u4").astype(np.uint32), pos, has_gauss, cached),
    }
    if "cuda" in data:
        state["cuda"] = tensor(data["cuda"])
    return state
