"""PCGrad, projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl.combiners.base import Combiner, move, normalised


class PCGrad(Combiner):
    """d = mean_i g_i', g_i' = g_i projected in turn on the normal plane of each conflicting g_j.

    For each i, over the other tasks j in a random order: if g_i'ᵀg_j < 0 then
    g_i' ← g_i' − (g_i'ᵀg_j/‖g_j‖²) g_j, against the original g_j (Yu et al., 2020, Alg. 1).
    Each g_i' is tracked as coefficients on the rows of G, so only A is needed. The orders come from
    a K×K block of uniform keys (`draw`: from the `generator` passed to the call, torch's default CPU
    generator when None, on the generator's device), task i visiting the others by increasing key.
    """

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(num_tasks, num_tasks, generator=generator, device=device, dtype=torch.float64)

    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        gramian, _ = normalised(gramian)
        size = gramian.shape[0]
        if draws is None:
            raise ValueError("PCGrad needs its random keys: call it with a generator, or with `draws` from `draw`")
        keys = move(draws.to(gramian.dtype), gramian.device).clone()
        keys.fill_diagonal_(2.0)  # sorts each task itself last, out of its own order
        orders = keys.argsort(dim=1)[:, : size - 1]

        rows = torch.arange(size, device=gramian.device)
        squared_norms = gramian.diagonal()
        coefficients = torch.eye(size, dtype=gramian.dtype, device=gramian.device)
        for position in range(size - 1):
            other = orders[:, position]
            products = (coefficients * gramian[other]).sum(1)  # g_i'ᵀg_j for each i and its j
            conflict = products < 0
            shift = products / squared_norms[other].clamp(min=torch.finfo(gramian.dtype).tiny)
            coefficients[rows, other] -= torch.where(conflict, shift, torch.zeros_like(shift))
        return coefficients.mean(0)
