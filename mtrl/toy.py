"""`mtrl toy`: the two-objective toy of Liu et al. (CAGrad, NeurIPS 2021, Fig. 1), for every combiner.

Two losses of a point x = (x₁, x₂) share one landscape: above the x₁ axis each is a narrow logarithmic
valley, below it each is a wide bowl centred at x₁ = +7 (task 1) or x₁ = −7 (task 2), so that their
Pareto set is a curve from one bowl's minimum to the other's near x₂ = −8.36, and the average loss is
smallest in its middle, at x₁ = 0. From three starts each method follows its update direction with
Adam (learning rate 1e-3, 100,000 steps, as in the paper), all starts in one batched landscape
evaluation per step; each start has its own combiner (Nash-MTL's warm start is per trajectory) and its
own random generator (PCGrad's orders, SDMGrad-OS's draws). docs/toy.md says what the figure shows.

A method enters the toy as a `Direction`: a function of one start's task gradients and task losses
that returns the update, so that methods which weigh losses rather than gradients fit the same loop.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtrl.combiners import COMBINERS, make_combiner
from mtrl.combiners.base import TaskLosses
from mtrl.config import ConfigError

STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
"""The paper's three starting points."""

LEARNING_RATE = 1e-3
STEPS = 100_000

TOY_HYPER_PARAMETERS: dict[str, dict[str, Any]] = {
    "cagrad": {"c": 0.5, "rescale": 1, "solver": "mtrl"},  # the paper's toy uses c = 0.5
    "conicgrad": {"c": 0.5},
    "sdmgrad": {"lam": 0.6, "solver": "mtrl"},
    "sdmgrad_os": {"n": 4, "lam": 0.6, "solver": "mtrl"},
    "imgrad": {"c": 0.9, "variant": "paper", "rescale": 1},
    "fairgrad": {"alpha": 2.0},
    "alignedmtl": {"scale": "min"},
    # FAMO's authors ran their toy with their generic class (the paper's weights) and loss offsets of -21
    "famo": {"variant": "paper", "logit_lr": 0.025, "logit_decay": 0.01, "min_loss": -21.0},
    "gradnorm": {"alpha": 0.12, "weight_lr": 3e-4, "min_loss": -21.0},
}
"""Each combiner's hyper-parameters in the toy: those of its MT10 preset (configs/mt10_<name>.yaml),
except CAGrad's c and what the loss-weighting methods need: the toy's losses reach −20, so FAMO and
GradNorm take the loss offset ℓ* = −21, and FAMO the paper's weights. Combiners not listed take their
defaults, as their presets do."""

_FLOOR = 5e-6
"""The valleys' logarithm is floored here, as in the paper's code, so that its bottom stays finite."""

_RECORDED = 2000
"""Points kept per trajectory for the figure."""

Direction = Callable[[Tensor, Tensor], Tensor]
"""(task gradients [K, 2], task losses [K]) of one start → the update written into Adam's gradient ([2])."""


def task_losses(points: Tensor) -> Tensor:
    """The two losses [..., 2] at points [..., 2] (Liu et al., 2021, toy example; our transcription).

    Each loss blends a logarithmic valley (weight max(tanh(x₂/2), 0), above the x₁ axis) with a
    quadratic bowl (weight max(tanh(−x₂/2), 0), below it); the valleys cross, the bowls are centred
    at x₁ = 7 and x₁ = −7 with their minimum −20 on the line x₂ = −8.
    """
    x1, x2 = points.unbind(-1)
    upper = torch.tanh(x2 / 2).clamp(min=0)
    lower = torch.tanh(-x2 / 2).clamp(min=0)
    valley1 = ((x1 + 7) / 2 - torch.tanh(x2)).abs().clamp(min=_FLOOR).log() + 6
    valley2 = ((3 - x1) / 2 - torch.tanh(x2) + 2).abs().clamp(min=_FLOOR).log() + 6
    bowl1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    bowl2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    return torch.stack([valley1 * upper + bowl1 * lower, valley2 * upper + bowl2 * lower], -1)


def losses_and_gradients(points: Tensor) -> tuple[Tensor, Tensor]:
    """Task losses [..., 2] and task gradients [..., 2 (task), 2 (coordinate)] at points [..., 2]."""
    points = points.detach().requires_grad_(True)
    losses = task_losses(points)
    rows = [torch.autograd.grad(losses[..., task].sum(), points, retain_graph=task == 0)[0] for task in range(2)]
    return losses.detach(), torch.stack(rows, -2)


def pareto_set(count: int = 201) -> Tensor:
    """Points [count, 2] of the Pareto set, from task 2's minimum (x₁ = −7) to task 1's (x₁ = 7).

    Below the axis only the bowls count (for x₂ < 0 the valleys' weight is 0), and there the gradients
    are opposed where λ∇f₁ + (1 − λ)∇f₂ = 0: the x₁ part gives x₁ = 7(2λ − 1), the x₂ part
    t'(x₂)·q_λ(x₁, x₂) + t(x₂)·(x₂ + 8)/50 = 0 with t = tanh(−x₂/2) and q_λ the blend of the bowls'
    quadratics, solved for x₂ by bisection on [−12, −8] (where it changes sign once).
    """
    weight = torch.linspace(0, 1, count, dtype=torch.float64)
    x1 = 7 * (2 * weight - 1)
    low, high = torch.full_like(x1, -12.0), torch.full_like(x1, -8.0)

    def stationarity(x2: Tensor) -> Tensor:
        t = torch.tanh(-x2 / 2)
        slope = -(1 - t**2) / 2
        blended = weight * ((x1 - 7) ** 2) + (1 - weight) * ((x1 + 7) ** 2)
        quadratic = (blended + 0.1 * (x2 + 8) ** 2) / 10 - 20
        return slope * quadratic + t * (x2 + 8) / 50

    for _ in range(60):
        middle = (low + high) / 2
        below = stationarity(middle) < 0
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return torch.stack([x1, (low + high) / 2], -1)


def combiner_direction(name: str, generator: torch.Generator) -> Direction:
    """Combiner `name` with its toy hyper-parameters as a `Direction` (one per start: it may keep state).

    As in the training update, the combiner sees the rows' losses, and each step ends with
    `Combiner.after_step`: here at the next call, whose losses are those after the previous step (the
    landscape is deterministic, so they are what evaluating them again after the step would give).
    """
    combiner = make_combiner(name, **TOY_HYPER_PARAMETERS.get(name, {}))
    ended: list[tuple[TaskLosses, Tensor]] = []  # the last call's losses and rows, until the next call

    def direction(gradients: Tensor, losses: Tensor) -> Tensor:
        if ended:
            seen, rows = ended.pop()
            combiner.after_step(seen, losses[rows] if combiner.needs_losses_after else None, None)
        tasks = combiner.select_tasks(gradients.shape[0], generator)
        seen = TaskLosses("toy", losses[tasks], (("x", 2),))
        ended.append((seen, tasks))
        return combiner(gradients[tasks], generator=generator, losses=seen)

    return direction


@dataclass(frozen=True)
class Trajectories:
    """The methods' paths from each start: `points` [method, start, recorded step, 2]."""

    methods: list[str]
    points: Tensor
    steps: int

    @property
    def final(self) -> Tensor:
        return self.points[:, :, -1]


def simulate(
    methods: Sequence[str],
    directions: Callable[[str, torch.Generator], Direction] = combiner_direction,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
    starts: Sequence[tuple[float, float]] = STARTS,
    seed: int = 0,
) -> Trajectories:
    """Every method from every start for `steps` Adam steps, in float64. The landscape and Adam act on all
    (method, start) points at once; Adam is elementwise, so one optimiser steps each point as its own."""
    points = torch.tensor(starts, dtype=torch.float64).repeat(len(methods), 1, 1).requires_grad_(True)
    walkers = [
        [directions(method, torch.Generator().manual_seed(seed + index)) for index in range(len(starts))]
        for method in methods
    ]
    optimizer = torch.optim.Adam([points], lr=learning_rate)
    every = max(1, steps // _RECORDED)
    recorded = [points.detach().clone()]
    for step in range(1, steps + 1):
        losses, gradients = losses_and_gradients(points)
        updates = [
            [walker(gradients[m, s], losses[m, s]) for s, walker in enumerate(row)] for m, row in enumerate(walkers)
        ]
        points.grad = torch.stack([torch.stack(row) for row in updates]).to(points.dtype)
        optimizer.step()
        if step % every == 0 or step == steps:
            recorded.append(points.detach().clone())
    return Trajectories(list(methods), torch.stack(recorded, 2), steps)


def distance_to_pareto_set(points: Tensor, curve: Tensor) -> Tensor:
    """Euclidean distance from each point [..., 2] to the nearest point of the sampled Pareto curve."""
    return (points[..., None, :] - curve).norm(dim=-1).amin(-1)


def records(trajectories: Trajectories, starts: Sequence[tuple[float, float]] = STARTS) -> list[dict[str, Any]]:
    """One record per method and start (the `--json` output)."""
    final = trajectories.final
    losses = task_losses(final)
    out = []
    for m, method in enumerate(trajectories.methods):
        for s, start in enumerate(starts):
            f1, f2 = (float(v) for v in losses[m, s])
            out.append(
                {
                    "combiner": method,
                    "start": list(start),
                    "steps": trajectories.steps,
                    "final_x": [float(v) for v in final[m, s]],
                    "final_f1": f1,
                    "final_f2": f2,
                    "final_mean": (f1 + f2) / 2,
                }
            )
    return out


def table(trajectories: Trajectories, starts: Sequence[tuple[float, float]] = STARTS) -> str:
    """Final point, final average loss and distance to the Pareto set of each method from each start."""
    curve = pareto_set()
    best = task_losses(curve).mean(-1).min()
    gaps = distance_to_pareto_set(trajectories.final, curve)
    lines = [
        f"{'combiner':<11} {'start':<13} {'final x':<18} {'mean loss':>9} {'to Pareto':>9}",
    ]
    for record, gap in zip(records(trajectories, starts), gaps.flatten().tolist(), strict=True):
        start = "({:g}, {:g})".format(*record["start"])
        point = "({:.3f}, {:.3f})".format(*record["final_x"])
        lines.append(f"{record['combiner']:<11} {start:<13} {point:<18} {record['final_mean']:>9.3f} {gap:>9.3f}")
    lines.append(f"(the lowest average loss, {float(best):.3f}, is at x = (0, {float(curve[len(curve) // 2, 1]):.3f}))")
    return "\n".join(lines)


def plot(trajectories: Trajectories, out: Path, starts: Sequence[tuple[float, float]] = STARTS) -> None:
    """One row per method: its paths on the contours of the average loss, of task 1's and of task 2's,
    with the Pareto set (grey), the average loss's minimiser (star) and the starts (black dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-10, 10, 300, dtype=torch.float64)
    x1, x2 = torch.meshgrid(grid, grid, indexing="xy")
    surface = task_losses(torch.stack([x1, x2], -1))
    panels = [("average loss", surface.mean(-1)), ("task 1", surface[..., 0]), ("task 2", surface[..., 1])]
    curve = pareto_set()
    middle = curve[len(curve) // 2]
    count = len(trajectories.methods)
    figure, axes = plt.subplots(count, 3, figsize=(10, 3.2 * count), squeeze=False)
    colours = ["tab:red", "tab:blue", "tab:green"]
    for m, method in enumerate(trajectories.methods):
        for column, (title, values) in enumerate(panels):
            axis = axes[m, column]
            axis.contour(x1.numpy(), x2.numpy(), values.numpy(), levels=20, cmap="viridis", linewidths=0.8)
            axis.plot(curve[:, 0], curve[:, 1], color="grey", linewidth=4, alpha=0.6, zorder=1)
            axis.plot(*middle.tolist(), marker="*", markersize=12, color="black", zorder=4)
            for s, start in enumerate(starts):
                path = trajectories.points[m, s]
                axis.plot(path[:, 0], path[:, 1], color=colours[s % len(colours)], linewidth=1.5, zorder=3)
                axis.plot(*start, marker="o", markersize=6, color="black", zorder=4)
            axis.set_xlim(-10, 10)
            axis.set_ylim(-10, 10)
            axis.set_aspect("equal")
            axis.set_title(f"{method}: {title}", fontsize=9)
    figure.suptitle(f"{trajectories.steps} Adam steps; grey: Pareto set, star: lowest average loss", fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "toy",
        help="the two-objective toy of the CAGrad paper (Liu et al. 2021, Fig. 1) for each combiner",
        description="Follow each combiner's update with Adam from the paper's three starts on its two-task "
        "landscape; write a figure of the paths on the average loss's and each task's contours, and print "
        "each method's final point, final average loss and distance to the Pareto set. docs/toy.md explains it.",
    )
    parser.add_argument(
        "--combiners", default="all", help="comma-separated names, or 'all' (default: every registered combiner)"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help=f"Adam steps (default {STEPS:,})")
    parser.add_argument(
        "--lr", type=float, default=LEARNING_RATE, help=f"Adam's learning rate (default {LEARNING_RATE:g})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the combiners' generators (default 0)")
    parser.add_argument("--out", type=Path, default=Path("toy.png"), help="the figure's path (default toy.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON record per method and start")


def parse_methods(text: str) -> list[str]:
    if text == "all":
        return list(COMBINERS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMBINERS]
    if unknown or not names:
        raise ConfigError(
            f"--combiners: unknown combiner(s) {', '.join(map(repr, unknown)) or 'none given'}; "
            f"choose from: {', '.join(COMBINERS)}"
        )
    return names


def run(args: argparse.Namespace) -> int:
    methods = parse_methods(args.combiners)
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, found {args.steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ConfigError(f"--lr must be a positive number, found {args.lr}")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; give the figure's file name")
    started = time.perf_counter()
    trajectories = simulate(methods, steps=args.steps, learning_rate=args.lr, seed=args.seed)
    plot(trajectories, args.out)
    if args.json:
        print(json.dumps(records(trajectories), indent=1))
    else:
        print(table(trajectories))
        print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0
