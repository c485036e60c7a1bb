"""Gradient combiners: the K×n matrix of per-task gradients in, one update direction out.

`make_combiner(name, **hyper_parameters)` builds one from the registry `COMBINERS`; the maths of
each is in docs/combiners.md.
"""

from __future__ import annotations

import inspect
from typing import Any

from mtrl.combiners.base import Combiner
from mtrl.combiners.cagrad import CAGrad
from mtrl.combiners.conicgrad import ConicGrad
from mtrl.combiners.imgrad import IMGrad
from mtrl.combiners.mean import Mean
from mtrl.combiners.mgda import MGDA
from mtrl.combiners.nashmtl import NashMTL
from mtrl.combiners.pcgrad import PCGrad
from mtrl.combiners.sdmgrad import SDMGrad
from mtrl.combiners.sdmgrad_os import SDMGradOS

__all__ = ["COMBINERS", "Combiner", "make_combiner"]

COMBINERS: dict[str, type[Combiner]] = {
    "mean": Mean,
    "cagrad": CAGrad,
    "conicgrad": ConicGrad,
    "sdmgrad": SDMGrad,
    "sdmgrad_os": SDMGradOS,
    "imgrad": IMGrad,
    "mgda": MGDA,
    "pcgrad": PCGrad,
    "nashmtl": NashMTL,
}


def make_combiner(name: str, **hyper_parameters: Any) -> Combiner:
    """The combiner registered as `name`, built with `hyper_parameters` (defaults for the others)."""
    if name not in COMBINERS:
        raise ValueError(f"unknown combiner {name!r}; choose from: {', '.join(sorted(COMBINERS))}")
    combiner = COMBINERS[name]
    accepted = [parameter for parameter in inspect.signature(combiner.__init__).parameters if parameter != "self"]
    unknown = sorted(set(hyper_parameters) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter {', '.join(map(repr, unknown))} for combiner {name!r}; "
            f"accepted: {', '.join(accepted) if accepted else 'none'}"
        )
    return combiner(**hyper_parameters)
