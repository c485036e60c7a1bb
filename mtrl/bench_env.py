"""`mtrl bench env`: env steps/s of each vector strategy, next to the lockstep ceiling.

For each benchmark: every task's single-env steps/s (one env per task, stepped alone, one task
after another), and for each strategy the env steps/s of the whole backend (`backend.step`, what
training pays: K env steps per vector step). Every backend is built and warmed up first; each of
`--repeats` passes then times the single-task pass and every strategy in turn, and the records
give medians. Actions are uniform in the action box, drawn from a seeded generator beforehand.

A lockstep collector steps every task once per vector step, so it is bounded twice: by the slowest
task (K × min_k rate_k env steps/s), and by the work the cores can do (C usable cores share
Σ_k 1/rate_k seconds of stepping per vector step: K × C / Σ_k 1/rate_k). The ceiling is the smaller
one; with at least K cores it is always "K × slowest".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mtrl.envs import EnvBackend

STRATEGIES = ("sync", "async", "pool")
BENCHMARKS = ("MT10", "MT25", "MT50", "toy")  # the benchmarks whose tasks need no env.tasks list


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "env",
        help="env steps/s of each vector strategy next to the lockstep ceiling",
        description="Measure env steps/s of each vector strategy (sync, async, pool) on each benchmark, each "
        "task's single-env steps/s, and the ceiling of a lockstep collector: K x min(slowest task, cores / "
        "sum over tasks of 1/rate).",
    )
    p.add_argument("--benchmarks", default="MT10,MT50", help=f"comma-separated, of {', '.join(BENCHMARKS)}")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated, of sync, async, pool")
    p.add_argument("--steps", type=int, default=500, help="timed vector steps per strategy, and steps per task")
    p.add_argument("--warmup", type=int, default=50, help="untimed steps before each measurement (default 50)")
    p.add_argument(
        "--workers",
        default="0",
        help="pool workers, comma-separated for one pool record each (default 0: min(tasks, usable cores))",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed passes over every strategy; medians (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the envs and of the random actions")
    p.add_argument("--json", action="store_true", help="print one JSON record per line")


def run(args: argparse.Namespace) -> int:
    from mtrl.config import ConfigError

    benchmarks = _names(args.benchmarks, BENCHMARKS, "benchmark")
    strategies = _names(args.strategies, STRATEGIES, "strategy")
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        raise ConfigError(f"--workers must be comma-separated integers, found {args.workers!r}") from None
    bounds = (
        ("--steps", args.steps, 1),
        ("--warmup", args.warmup, 0),
        ("--repeats", args.repeats, 1),
        ("--workers", min(workers), 0),
    )
    for flag, value, least in bounds:
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, found {value}")
    for benchmark in benchmarks:
        records = bench_benchmark(benchmark, strategies, args.steps, args.warmup, workers, args.seed, args.repeats)
        for record in records:
            print(json.dumps(record) if args.json else _row(record), flush=True)
    return 0


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    from mtrl.config import ConfigError

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"unknown {what}(s) {unknown or text!r}; choose from: {', '.join(known)}")
    return names


def lockstep_ceiling(task_rates: list[float], cores: int) -> tuple[float, str]:
    """A lockstep collector's env steps/s bound from single-env rates, and which bound it is."""
    k = len(task_rates)
    slowest = min(task_rates)
    shared = cores / sum(1.0 / r for r in task_rates)  # vector steps/s when the cores share all the stepping
    if slowest <= shared:
        return k * slowest, "K x slowest task"
    return k * shared, "K x cores / sum(1/task rate)"


def bench_benchmark(
    benchmark: str, strategies: list[str], steps: int, warmup: int, workers: list[int], seed: int, repeats: int
) -> list[dict[str, Any]]:
    """One record per strategy (per pool size for the pool), each with the per-task rates and the ceiling.

    Every backend is built first; then each repeat times the single-task pass and every strategy
    one after another, so that a change of load on the machine touches all of them alike. Rates are
    medians over the repeats.
    """
    from mtrl.config import EnvConfig
    from mtrl.envs import backend_module, make_backend
    from mtrl.envs.pool import usable_cores

    cfg = EnvConfig(benchmark=benchmark)
    cores = usable_cores()
    wanted = [(s, w) for s in strategies for w in (workers if s == "pool" else [0])]
    built: dict[tuple[str, int], tuple[EnvBackend, float]] = {}
    task_runs: dict[str, list[float]] = {}
    vector_runs: dict[tuple[str, int], list[float]] = {run: [] for run in wanted}
    try:
        for strategy, pool_workers in [("sync", 0), *[run for run in wanted if run != ("sync", 0)]]:
            start = time.perf_counter()
            backend = make_backend(replace(cfg, workers=pool_workers), seed, False, vector_strategy=strategy)
            built[strategy, pool_workers] = (backend, time.perf_counter() - start)
        sync = built["sync", 0][0]
        actions = _actions(sync, np.random.default_rng(seed), warmup + steps)
        for backend, _ in built.values():
            backend.reset(seed=seed)
            for a in actions[:warmup]:
                backend.step(a)
        task_runs = {task: [] for task in sync.task_names}
        for _ in range(repeats):
            for task, rate in _task_rates(sync, actions[warmup:]).items():
                task_runs[task].append(rate)
            for run in wanted:
                vector_runs[run].append(_vector_rate(built[run][0], actions[warmup:]))
    finally:
        for backend, _ in built.values():
            backend.close()

    task_rates = {task: statistics.median(runs) for task, runs in task_runs.items()}
    ceiling, formula = lockstep_ceiling(list(task_rates.values()), cores)
    k = len(task_rates)
    records = []
    for (strategy, pool_workers), runs in vector_runs.items():
        backend, construction_s = built[strategy, pool_workers]
        rate = statistics.median(runs)
        records.append(
            {
                "benchmark": benchmark,
                "backend": backend_module(benchmark).__name__.rsplit(".", 1)[-1],
                "strategy": strategy,
                "workers": {"sync": 1, "async": k}.get(strategy) or backend.vector_env.workers,
                "num_tasks": k,
                "cores": cores,
                "steps": steps,
                "repeats": repeats,
                "env_steps_per_s": round(rate, 1),
                "env_steps_per_s_repeats": [round(r, 1) for r in runs],
                "vector_steps_per_s": round(rate / k, 2),
                "ceiling_env_steps_per_s": round(ceiling, 1),
                "ceiling_formula": formula,
                "ratio_to_ceiling": round(rate / ceiling, 4),
                "construction_s": round(construction_s, 2),
                "task_steps_per_s": {t: round(r, 1) for t, r in task_rates.items()},
            }
        )
    return records


def _actions(backend: EnvBackend, rng: np.random.Generator, n: int) -> np.ndarray:
    size = (n, backend.num_tasks, backend.act_dim)
    return rng.uniform(backend.action_low, backend.action_high, size).astype(np.float32)


def _vector_rate(backend: EnvBackend, actions: np.ndarray) -> float:
    """Env steps/s of `backend.step` over the vector steps of `actions`."""
    start = time.perf_counter()
    for a in actions:
        backend.step(a)
    return actions.size // backend.act_dim / (time.perf_counter() - start)


def _task_rates(backend: EnvBackend, actions: np.ndarray) -> dict[str, float]:
    """Each task's single-env steps/s: the sub-envs of a sync backend, stepped alone one after another."""
    rates = {}
    for k, (task, env) in enumerate(zip(backend.task_names, backend.vector_env.envs, strict=True)):
        start = time.perf_counter()
        for a in actions[:, k]:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()
        rates[task] = len(actions) / (time.perf_counter() - start)
    return rates


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['benchmark']:<5} {r['strategy']:<5} workers {r['workers']:>3}  {r['env_steps_per_s']:>9.1f} env steps/s  "
        f"ceiling {r['ceiling_env_steps_per_s']:>9.1f} ({r['ceiling_formula']}, {r['cores']} cores)  "
        f"ratio {r['ratio_to_ceiling']:.2f}  built in {r['construction_s']:.1f} s"
    )
