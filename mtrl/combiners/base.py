"""The combiner interface, the Gramian it is computed from, and hyper-parameter declarations and checks.

A combiner is pure maths: the K×n matrix G of per-task gradients (row i = ∇L_i) in, one update
vector d of length n out. Every method except `mean` reduces to task weights w computed from the
K×K Gramian A = G Gᵀ, followed by d = Gᵀw (see docs/combiners.md#notation).

Loss-weighting methods (FAMO, GradNorm) fit the same interface: their weights come from the
per-task losses (`TaskLosses`) rather than, or besides, the Gramian. A method that needs no Jacobian
(`needs_jacobian = False`) gives its weights before the backward (`loss_weights`), and the update
then backpropagates Σ_i w_i L_i once. A method that learns from the step it caused reads the losses
after it (`after_step`), where it also commits its state, and only once the update is known to be
taken: a skipped update leaves that state exactly as it was.

Each combiner declares its hyper-parameters as a frozen dataclass (`HyperParameters`), which the
run configuration reads for the keys, types, defaults and help of its `combiner` section
(docs/config.md#combiner-keys).
"""

from __future__ import annotations

import dataclasses
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor


def hyper_parameter(default: Any, help: str) -> Any:  # noqa: A002 - the config's name for it
    """A field of a `HyperParameters` dataclass: its default, and the help `mtrl train --help` prints."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class HyperParameters:
    """A combiner's hyper-parameters: one `hyper_parameter` field each, typed, in a frozen dataclass.

    Building one checks the values (`__post_init__`, a ValueError naming the parameter) without
    building the combiner. This base declares none: it is the `Parameters` of combiners without any.
    """

    def _store(self, name: str, value: Any) -> None:
        """Keep the checked form of a value (e.g. 1 as 1.0); the dataclass is frozen after construction."""
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class TaskLosses:
    """One network's per-task losses in an update, for the combiners that weigh losses.

    `network` names whose losses they are ("critic", "actor", "alpha"): a method that learns its
    weights keeps them per network. `shared_layout` lists the shared parameters as (name, numel) in
    the order of G's columns, so a method can find a layer's columns (GradNorm's last shared layer).
    """

    network: str
    values: Tensor  # [K], detached, at the parameters before the step
    shared_layout: tuple[tuple[str, int], ...] = field(default=())


class Combiner(ABC):
    """Maps per-task gradients G ([K, n]) to one update direction d ([n]) with d = Gᵀw.

    Subclasses implement `weights`, which sees only the float64 Gramian, and name their
    hyper-parameters' dataclass as `Parameters`. After each call, `last_weights` holds the w that
    was used (in G's dtype), for diagnostics.
    """

    needs_jacobian: ClassVar[bool] = True
    """False when the weights come from the losses alone (`loss_weights`), so one backward of
    Σ_i w_i L_i suffices (the plain mean: w = 1/K)."""

    needs_losses_after: ClassVar[bool] = False
    """True when `after_step` needs the losses at the parameters after the step (same batch, noise
    and targets), which costs the update one more forward pass of that network."""

    supports_compile: ClassVar[bool] = True
    """False when the combiner cannot run inside the compiled update (`train.compile`)."""

    Parameters: ClassVar[type[HyperParameters]] = HyperParameters
    """The dataclass of this combiner's hyper-parameters."""

    def __init__(self, parameters: HyperParameters | None = None) -> None:
        expected = type(self).Parameters
        parameters = expected() if parameters is None else parameters
        if type(parameters) is not expected:
            raise TypeError(f"{type(self).__name__} takes {expected.__name__}, found {type(parameters).__name__}")
        self.parameters = parameters
        self.last_weights: Tensor | None = None

    def __call__(
        self,
        matrix: Tensor,
        generator: torch.Generator | None = None,
        draws: Tensor | None = None,
        losses: TaskLosses | None = None,
    ) -> Tensor:
        """d for G = `matrix`. A combiner that draws random numbers takes them from `draws` (made by
        `draw`) or, without them, draws them now from `generator`. `losses`: the rows' losses, which
        a loss-weighting method needs (the others ignore them)."""
        check_matrix(matrix)
        products = gramian(matrix)
        if draws is None:
            draws = self.draw(matrix.shape[0], generator)
        with _one_thread(matrix.device):
            weights = self.weights(products, draws).to(matrix.dtype)
        self.last_weights = weights
        return weights @ matrix

    @abstractmethod
    def weights(self, gramian: Tensor, draws: Tensor | None = None) -> Tensor:
        """Task weights w ([K], float64, on the Gramian's device) such that the update is d = Gᵀw."""

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> Tensor | None:
        """The random numbers one call on `num_tasks` rows uses, drawn on `generator`'s device
        (torch's default CPU generator when None); None for a combiner that draws none.

        The update draws them before any gradient, so that what runs on the device afterwards
        reads no generator (a compiled update cannot).
        """
        return None

    def loss_weights(self, losses: TaskLosses) -> Tensor | None:
        """Weights w ([K], detached) of a combiner that needs no Jacobian: the update backpropagates
        Σ_i w_i L_i once. None (the default): the plain mean, w = 1/K."""
        return None

    def after_step(self, losses: TaskLosses, after: Tensor | None, taken: Tensor | None) -> None:  # noqa: B027 - an optional hook
        """The update of `losses.network` has ended: commit whatever state this update changes.

        `after` holds the losses on the same batch at the parameters after the step when
        `needs_losses_after`, else None. `taken` is None when the step was taken (the eager update
        calls this only then); with the steps decided on the device it is a 0-d bool tensor, and the
        state may change only where it holds. Stateless combiners do nothing.
        """

    @classmethod  # noqa: B027 - an optional check
    def check_networks(cls, networks: Sequence[str]) -> None:
        """A ValueError if the combiner cannot weigh the losses of these networks (`combiner.networks`)."""

    def select_tasks(self, num_tasks: int, generator: torch.Generator) -> Tensor:
        """Indices of the tasks whose gradients this update needs (drawn before any gradient is computed)."""
        return torch.arange(num_tasks, device=generator.device)

    @property
    def hyper_parameters(self) -> dict[str, Any]:
        """The hyper-parameters by name, as given or defaulted."""
        return dataclasses.asdict(self.parameters)

    def state_dict(self) -> dict[str, Any]:
        """State carried from one update to the next; empty for stateless combiners."""
        return {}

    def snapshot(self) -> Any:
        """The state before an update, for `restore_where`: no copy and no host read (state
        tensors are replaced, never written in place); None for stateless combiners."""
        return None

    def restore_where(self, snapshot: Any, skipped: Tensor) -> None:  # noqa: B027 - stateless: nothing to do
        """Put the state of `snapshot` back where `skipped` (a 0-d bool tensor) holds, decided on
        the device: an update that is skipped leaves the combiner exactly as it was."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless, found state keys {sorted(state)}")

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.hyper_parameters.items())
        return f"{type(self).__name__}({arguments})"


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Run the K×K solve on one CPU thread.

    Its matrices are far too small to gain from threads, and on a busy CPU each tiny LAPACK call
    that wakes the OpenMP thread pool can stall far longer than the call itself. The setting is
    process-wide, so it is restored at once.
    """
    if device.type != "cpu" or torch.compiler.is_compiling():  # a compiled graph cannot change threads
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def move(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`; from the CPU to a GPU through pinned memory, so that the copy is
    asynchronous (no host synchronisation)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def check_matrix(matrix: Tensor) -> None:
    """Raise a ValueError unless `matrix` is a floating K×n tensor with K ≥ 1."""
    if not isinstance(matrix, Tensor):
        raise ValueError(f"the gradient matrix must be a torch.Tensor, found {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"the gradient matrix must be 2-D [K, n], found shape {tuple(matrix.shape)}")
    if matrix.shape[0] < 1:
        raise ValueError(f"the gradient matrix needs at least one task (row), found shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise ValueError(f"the gradient matrix must be floating point, found {matrix.dtype}")


def gramian(matrix: Tensor) -> Tensor:
    """A = G Gᵀ in float64, free of overflow and underflow for any scale of G.

    G is first divided by the power of two nearest its largest entry; that division is exact, so A
    equals G Gᵀ bit for bit wherever G Gᵀ is representable in G's dtype (a float32 row of 1e20s is not).
    Entries smaller than the largest by more than the dtype's range (about 2^-126 in float32) are then
    lost: A is accurate relative to its largest entry. Where G Gᵀ exceeds float64, A holds ±inf there.
    On the CPU the extra pass over G costs more than the product itself, so there it is only made
    when G's scale needs it.
    """
    low, high = torch.aminmax(matrix)
    largest = torch.maximum(high, -low)
    cpu = matrix.device.type == "cpu" and not torch.compiler.is_compiling()  # compiled: no host read of `largest`
    if cpu and _product_is_safe(largest.item(), matrix.dtype, matrix.shape[1]):
        product = (matrix @ matrix.T).double()
    else:
        # 2^(e−1) for largest = f·2^e, f in [0.5, 1): entries below 2 in magnitude, and the scale itself
        # representable (2^e overflows for entries within a factor 2 of the dtype's largest number).
        scale = torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 1)
        scaled = matrix / scale
        # Scaled back one factor at a time: a product beyond float64 is ±inf, a zero stays 0 (not 0·inf).
        product = (scaled @ scaled.T).double() * scale.double() * scale.double()
    return product / 2 + product.T / 2  # (A + Aᵀ)/2, where A + Aᵀ could overflow


def _product_is_safe(largest: float, dtype: torch.dtype, length: int) -> bool:
    # Every entry of G Gᵀ is at most n·largest², and products of the largest entries must stay normal.
    info = torch.finfo(dtype)
    square = largest * largest  # a float product: inf past float64's range, where ** raises OverflowError
    return largest == 0 or info.tiny / info.eps < square < info.max / (4 * max(length, 1))


def normalised(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """(A / t, t) with t the mean diagonal of A (1 when A = 0): solvers then see entries of order one."""
    trace = gramian.diagonal().mean()
    trace = torch.where(trace > 0, trace, torch.ones_like(trace))
    return gramian / trace, trace


def rescale_divisor(c: float, rescale: int) -> float:
    """CAGrad's final divisor r: 1, 1 + c², 1 + c for rescale 0, 1, 2 (Liu et al., 2021, official code)."""
    return (1.0, 1.0 + c**2, 1.0 + c)[rescale]


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float:
    """Return `value` as a float (an int if `integer`), or raise a ValueError naming `name`."""
    kind = "an integer" if integer else "a number"
    wanted = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise ValueError(f"`{name}` must be {kind}, found {value!r}")
    number = int(value) if integer else float(value)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high or number != number:
        if high is None:
            bound = f"> {low:g}" if low_open else f">= {low:g}"
            raise ValueError(f"`{name}` must be {bound}, found {value!r}")
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be in {interval}, found {value!r}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Return `value` if it is one of `choices`, or raise a ValueError naming `name`."""
    if isinstance(value, bool) or value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"`{name}` must be one of {listed}, found {value!r}")
    return value
