"""`mtrl bench env`: env steps/s of each vector strategy, next to the lockstep ceiling.

For each benchmark, first every task's single-env steps/s: one env per task, stepped alone, one
task after another. Then, for each strategy, the env steps/s of the whole backend (`backend.step`,
what training pays: K env steps per vector step), after a warm-up. Actions are uniform in the
action box, drawn from a seeded generator before the clock starts.

A lockstep collector steps every task once per vector step, so it is bounded twice: by the slowest
task (K × min_k rate_k env steps/s), and by the work the cores can do (C usable cores share
Σ_k 1/rate_k seconds of stepping per vector step: K × C / Σ_k 1/rate_k). The ceiling is the smaller
one; with at least K cores it is always "K × slowest".
"""

from __future__ import annotations

import argparse
import json
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
    bounds = (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--workers", min(workers), 0))
    for flag, value, least in bounds:
        if value < least:
            raise ConfigError(f"{flag} must be >= {least}, found {value}")
    for benchmark in benchmarks:
        for record in bench_benchmark(benchmark, strategies, args.steps, args.warmup, workers, args.seed):
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
    benchmark: str, strategies: list[str], steps: int, warmup: int, workers: list[int], seed: int
) -> list[dict[str, Any]]:
    """One record per strategy (per pool size for the pool); each carries the per-task rates and the
    ceiling measured in the same run."""
    from mtrl.config import EnvConfig
    from mtrl.envs import backend_module, make_backend
    from mtrl.envs.pool import usable_cores

    cfg = EnvConfig(benchmark=benchmark)
    cores = usable_cores()
    start = time.perf_counter()
    sync = make_backend(cfg, seed, evaluation=False, vector_strategy="sync")
    sync_built_s = time.perf_counter() - start
    task_rates = _task_rates(sync, steps, warmup, np.random.default_rng(seed))
    ceiling, formula = lockstep_ceiling(list(task_rates.values()), cores)

    runs = [(s, w) for s in strategies for w in (workers if s == "pool" else [0])]
    records = []
    for strategy, pool_workers in runs:
        if strategy == "sync":
            backend, construction_s = sync, sync_built_s
        else:
            start = time.perf_counter()
            backend = make_backend(replace(cfg, workers=pool_workers), seed, evaluation=False, vector_strategy=strategy)
            construction_s = time.perf_counter() - start
        try:
            rate = _vector_rate(backend, steps, warmup, np.random.default_rng(seed))
        finally:
            if backend is not sync:
                backend.close()
        k = backend.num_tasks
        records.append(
            {
                "benchmark": benchmark,
                "backend": backend_module(benchmark).__name__.rsplit(".", 1)[-1],
                "strategy": strategy,
                "workers": {"sync": 1, "async": k}.get(strategy) or backend.vector_env.workers,
                "num_tasks": k,
                "cores": cores,
                "steps": steps,
                "env_steps_per_s": round(rate, 1),
                "vector_steps_per_s": round(rate / k, 2),
                "ceiling_env_steps_per_s": round(ceiling, 1),
                "ceiling_formula": formula,
                "ratio_to_ceiling": round(rate / ceiling, 4),
                "construction_s": round(construction_s, 2),
                "task_steps_per_s": {t: round(r, 1) for t, r in task_rates.items()},
            }
        )
    sync.close()
    return records


def _actions(backend: EnvBackend, rng: np.random.Generator, n: int) -> np.ndarray:
    size = (n, backend.num_tasks, backend.act_dim)
    return rng.uniform(backend.action_low, backend.action_high, size).astype(np.float32)


def _vector_rate(backend: EnvBackend, steps: int, warmup: int, rng: np.random.Generator) -> float:
    """Env steps/s of `backend.step` over `steps` vector steps, after `warmup` of them."""
    actions = _actions(backend, rng, warmup + steps)
    backend.reset(seed=0)
    for a in actions[:warmup]:
        backend.step(a)
    start = time.perf_counter()
    for a in actions[warmup:]:
        backend.step(a)
    return steps * backend.num_tasks / (time.perf_counter() - start)


def _task_rates(backend: EnvBackend, steps: int, warmup: int, rng: np.random.Generator) -> dict[str, float]:
    """Each task's single-env steps/s: the sub-envs of a sync backend, stepped alone one after another."""
    actions = _actions(backend, rng, warmup + steps)
    rates = {}
    for k, (task, env) in enumerate(zip(backend.task_names, backend.vector_env.envs, strict=True)):
        env.reset(seed=k)
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            _, _, terminated, truncated, _ = env.step(actions[i, k])
            if terminated or truncated:
                env.reset()
        rates[task] = steps / (time.perf_counter() - start)
    return rates


def _row(r: dict[str, Any]) -> str:
    return (
        f"{r['benchmark']:<5} {r['strategy']:<5} workers {r['workers']:>3}  {r['env_steps_per_s']:>9.1f} env steps/s  "
        f"ceiling {r['ceiling_env_steps_per_s']:>9.1f} ({r['ceiling_formula']}, {r['cores']} cores)  "
        f"ratio {r['ratio_to_ceiling']:.2f}  built in {r['construction_s']:.1f} s"
    )
