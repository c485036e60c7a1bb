"""Gradient combiners: the K×n matrix of per-task gradients in, one update direction out.

The registry `COMBINERS` maps each name to its class, one line per combiner. `check_hyper_parameter_names`
and `check_hyper_parameters` check a combiner's hyper-parameters without building it (what the run
configuration does); `make_combiner(name, **hyper_parameters)` builds one. `registered(name, cls)`
adds a combiner for the length of a `with` block (a test, an experiment) and removes it after. The maths of each is in
docs/combiners.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from mtrl.combiners.alignedmtl import AlignedMTL
from mtrl.combiners.base import Combiner, HyperParameters
from mtrl.combiners.cagrad import CAGrad
from mtrl.combiners.conicgrad import ConicGrad
from mtrl.combiners.fairgrad import FairGrad
from mtrl.combiners.famo import FAMO
from mtrl.combiners.gradnorm import GradNorm
from mtrl.combiners.imgrad import IMGrad
from mtrl.combiners.mean import Mean
from mtrl.combiners.mgda import MGDA
from mtrl.combiners.nashmtl import NashMTL
from mtrl.combiners.pcgrad import PCGrad
from mtrl.combiners.sdmgrad import SDMGrad
from mtrl.combiners.sdmgrad_os import SDMGradOS
from mtrl.combiners.upgrad import UPGrad

__all__ = [
    "COMBINERS",
    "Combiner",
    "HyperParameters",
    "check_hyper_parameter_names",
    "check_hyper_parameters",
    "combiner_class",
    "make_combiner",
    "registered",
]

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
    "fairgrad": FairGrad,
    "alignedmtl": AlignedMTL,
    "upgrad": UPGrad,
    "famo": FAMO,
    "gradnorm": GradNorm,
}


def combiner_class(name: str) -> type[Combiner]:
    """The class registered as `name`, or a ValueError listing the names."""
    if name not in COMBINERS:
        raise ValueError(f"unknown combiner {name!r}; choose from: {', '.join(sorted(COMBINERS))}")
    return COMBINERS[name]


def check_hyper_parameter_names(name: str, names: Iterable[str]) -> None:
    """A ValueError naming those of `names` that combiner `name` does not take, and the ones it does."""
    accepted = [field.name for field in dataclasses.fields(combiner_class(name).Parameters)]
    unknown = sorted(set(names) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter {', '.join(map(repr, unknown))} for combiner {name!r}; "
            f"accepted: {', '.join(accepted) if accepted else 'none'}"
        )


def check_hyper_parameters(name: str, values: Mapping[str, Any]) -> HyperParameters:
    """The hyper-parameters of combiner `name` from `values` (defaults for the others), checked.

    A ValueError names an unknown key (and the accepted ones) or a value out of range. Builds no combiner.
    """
    check_hyper_parameter_names(name, values)
    return combiner_class(name).Parameters(**values)


def make_combiner(name: str, **hyper_parameters: Any) -> Combiner:
    """The combiner registered as `name`, built with `hyper_parameters` (defaults for the others)."""
    return combiner_class(name)(check_hyper_parameters(name, hyper_parameters))


@contextmanager
def registered(name: str, combiner: type[Combiner]) -> Iterator[type[Combiner]]:
    """`combiner` registered as `name` inside the `with` block only: afterwards the registry, and the
    config sections made from it (`mtrl.config.combiner_section`), are as they were."""
    from mtrl.config import combiner_section

    if name in COMBINERS:
        raise ValueError(f"combiner {name!r} is already registered")
    COMBINERS[name] = combiner
    try:
        yield combiner
    finally:
        del COMBINERS[name]
        combiner_section.cache_clear()  # it holds `name`'s section
