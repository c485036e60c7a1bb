"""Hooks into the training loop, as in Stable-Baselines3: subclass `Callback`, override what you need,
and hand instances to `Trainer(..., callbacks=[...])`, `Trainer.resume(run_dir, callbacks=[...])` or
`mtrl.cli.main(argv, callbacks=[...])`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mtrl.buffer import Batch
    from mtrl.evaluation import EvalResult
    from mtrl.sac import UpdateResult
    from mtrl.trainer import Trainer

Phase = Literal["restore", "collect", "update", "eval", "checkpoint"]


class Callback:
    """Every hook does nothing until overridden.

    `on_phase` is called on entering and on leaving each phase, also when it ends by an exception:
    "restore" (`Trainer.resume`: reading the checkpoint, merging the config, building the parts and
    loading the state into them), "collect" (one vector step: acting, stepping the envs, storing the
    transitions; with `train.overlap` it encloses the updates that run while the envs step),
    "update" (one gradient update), "eval" (one evaluation) and "checkpoint" (writing one). It gets
    no trainer: a resume's phase begins before the trainer exists. `on_batch` sees each batch
    sampled for an update and may return another to update on instead (fault injection, data
    filters). `on_update` sees every update's result (finite or not) before the trainer acts on it,
    `on_eval` every evaluation's result, `on_checkpoint` the path of every checkpoint written.
    `on_step` runs after every vector step, its updates, logs, evaluations and checkpoints:
    returning False ends the run there, with a checkpoint and exit code 0.
    """

    def on_phase(self, phase: Phase, entering: bool) -> None:
        return None

    def on_step(self, trainer: Trainer) -> bool | None:
        return None

    def on_batch(self, trainer: Trainer, batch: Batch) -> Batch | None:
        """None: update on `batch`; a Batch: update on that one instead."""
        return None

    def on_update(self, trainer: Trainer, result: UpdateResult) -> None:
        return None

    def on_eval(self, trainer: Trainer, result: EvalResult) -> None:
        return None

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        return None


@contextmanager
def phase(callbacks: Sequence[Callback], name: Phase) -> Iterator[None]:
    """The body of the `with` block is phase `name`, for every callback."""
    for callback in callbacks:
        callback.on_phase(name, True)
    try:
        yield
    finally:
        for callback in callbacks:
            callback.on_phase(name, False)
