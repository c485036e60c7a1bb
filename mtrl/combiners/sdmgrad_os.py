"""SDMGrad-OS: SDMGrad with objective sampling (Xiao, Ban & Ji, NeurIPS 2023, Sec. 5)."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrl.combiners.base import check_number
from mtrl.combiners.sdmgrad import SDMGrad


class SDMGradOS(SDMGrad):
    """SDMGrad on a random subset of tasks: each task is drawn independently with probability n/K.

    `select_tasks` draws the subset before any gradient is computed (only those rows are needed);
    the combiner then runs SDMGrad on the rows it is given, g0 being their mean. The authors' recipe
    uses SGD learning rate 50 for every K here (docs/combiners.md#sdmgrad-os).
    """

    def __init__(self, lam: float = 0.6, n: int = 4, solver: str = "exact") -> None:
        super().__init__(lam=lam, solver=solver)
        self.n = check_number("n", n, low=1, integer=True)

    def select_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        """Sorted indices of the drawn tasks; drawn again while none is drawn."""
        check_number("num_tasks", num_tasks, low=1, integer=True)
        probability = min(1.0, self.n / num_tasks)
        while True:
            drawn = torch.rand(num_tasks, generator=generator, device=generator.device) < probability
            if drawn.any():
                return drawn.nonzero().squeeze(1)

    def _learning_rate(self, num_tasks: int) -> float:
        return 50.0
