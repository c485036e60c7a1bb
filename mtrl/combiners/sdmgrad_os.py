"""SDMGrad-OS: SDMGrad with objective sampling (Xiao, Ban & Ji, NeurIPS 2023, Sec. 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrl.combiners.base import check_number, hyper_parameter
from mtrl.combiners.sdmgrad import SDMGrad, SDMGradParameters


@dataclass(frozen=True)
class SDMGradOSParameters(SDMGradParameters):
    n: int = hyper_parameter(4, "expected number of tasks drawn per update (each with probability n/K); >= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("n", check_number("n", self.n, low=1, integer=True))


class SDMGradOS(SDMGrad):
    """SDMGrad on a random subset of tasks: each task is drawn independently with probability n/K.

    `select_tasks` draws the subset before any gradient is computed (only those rows are needed);
    the combiner then runs SDMGrad on the rows it is given, g0 being their mean. The authors' recipe
    uses SGD learning rate 50 for every K here (docs/combiners.md#sdmgrad-os).
    """

    Parameters = SDMGradOSParameters
    parameters: SDMGradOSParameters

    def select_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        """Sorted indices of the drawn tasks; drawn again while none is drawn."""
        check_number("num_tasks", num_tasks, low=1, integer=True)
        probability = min(1.0, self.parameters.n / num_tasks)
        while True:
            drawn = torch.rand(num_tasks, generator=generator, device=generator.device) < probability
            if drawn.any():
                return drawn.nonzero().squeeze(1)

    def _learning_rate(self, num_tasks: int) -> float:
        return 50.0
