"""`mtrl bench train`: end-to-end training speed, collection and update side by side.

For each combiner, the real trainer runs on one set of training envs (built once per benchmark):
a warm-up of random actions fills the replay, `--settle` vector steps with updates let caches,
allocators and compilers settle, then `--steps` vector steps are timed. Serially (`train.overlap`
off), each vector step is "collect" (act, step the envs, store) then "update"; their means are
`collect_ms` and `update_ms`, read from the trainer's phase hooks. With `--overlap`, the same
combiner then runs with `train.overlap=true` on the same envs, and `overlap_efficiency` is
`vector_steps_per_s × max(collect_ms, update_ms)` with the serial run's means: 1 when the slower
of the two hides the other completely, about max/(collect+update) for a serial loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mtrl.callbacks import Callback
from mtrl.config import ConfigError

BIG = 10**9  # never reached: the timer ends the run


class _Timer(Callback):
    """Phase durations and the wall time of the timed steps; ends the run after them."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.durations: dict[str, list[float]] = {"collect": [], "update": []}
        self._entered: dict[str, float] = {}
        self._timing = False
        self.began = self.ended = 0.0

    def on_phase(self, phase, entering):
        if phase not in self.durations:
            return
        now = time.perf_counter()
        if entering:
            self._entered[phase] = now
        elif self._timing:
            self.durations[phase].append(now - self._entered[phase])

    def on_step(self, trainer):
        steps = trainer.counters.env_steps
        if steps == self.start:
            self._timing, self.began = True, time.perf_counter()
        if steps == self.stop:
            self.ended = time.perf_counter()
            return False
        return True


def _config(args: argparse.Namespace, benchmark: str, combiner: str, overlap: bool, run_dir: Path):
    from mtrl.config import load_config

    overrides = [
        f"env.benchmark={benchmark}",
        f"combiner.name={combiner}",
        f"device={args.device}",
        f"train.warmup_steps={args.warmup}",
        f"train.total_steps={BIG}",
        f"train.overlap={str(overlap).lower()}",
        f"train.buffer_capacity={max(args.warmup + args.settle + args.steps, 1000) * 50}",
        "eval.every=0",
        "checkpoint.every=0",
        f"log.every={BIG}",
        "log.tensorboard=false",
        "log.progress=false",
        f"run.dir={run_dir}",
        *args.set,
    ]
    if args.strategy:
        overrides.append(f"env.vector_strategy={args.strategy}")
    return load_config(None, overrides)


def bench_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    from mtrl.build import build
    from mtrl.trainer import Trainer

    records = []
    combiners = [c.strip() for c in args.combiner.split(",")]
    modes = [False, True] if args.overlap else [False]
    with tempfile.TemporaryDirectory(prefix="mtrl-bench-train-") as tmp:
        envs = None
        for combiner in combiners:
            serial: dict[str, float] = {}
            for overlap in modes:
                run_dir = Path(tmp) / f"{combiner}-{'overlap' if overlap else 'serial'}"
                cfg = _config(args, args.benchmark, combiner, overlap, run_dir)
                started = time.perf_counter()
                parts = build(cfg, envs=envs)
                build_s = time.perf_counter() - started
                envs = parts.envs
                start = args.warmup + args.settle
                timer = _Timer(start, start + args.steps)
                Trainer(cfg, run_dir, callbacks=[timer], parts=parts).train()
                rate = args.steps / (timer.ended - timer.began)
                collect_ms = 1000 * statistics.fmean(timer.durations["collect"])
                update_ms = 1000 * statistics.fmean(timer.durations["update"])
                record = {
                    "benchmark": args.benchmark,
                    "combiner": combiner,
                    "device": str(parts.device),
                    "strategy": cfg.env.vector_strategy,
                    "overlap": overlap,
                    "compile": cfg.train.compile,
                    "vector_steps_per_s": round(rate, 3),
                    "update_ms": round(update_ms, 3),
                    "collect_ms": round(collect_ms, 3),
                    "steps": args.steps,
                    "build_s": round(build_s, 2),
                    "hidden": list(cfg.agent.hidden_sizes),
                    "batch_per_task": cfg.train.batch_per_task,
                    "torch_threads": torch.get_num_threads(),  # as build() set them
                }
                if not overlap:
                    serial = {"collect_ms": collect_ms, "update_ms": update_ms}
                    total = collect_ms + update_ms
                    record["env_share"] = round(collect_ms / total, 3)
                    record["update_share"] = round(update_ms / total, 3)
                else:  # collection and update cannot be told apart inside an overlapped step: the serial run's
                    record["collect_ms"] = round(serial["collect_ms"], 3)
                    record["update_ms"] = round(serial["update_ms"], 3)
                record["overlap_efficiency"] = round(rate * max(serial.values()) / 1000, 3)
                records.append(record)
        if envs is not None:
            envs.close()
    return records


def add_parser(bench_sub) -> None:
    parser = bench_sub.add_parser(
        "train",
        help="time end-to-end training: collection plus updates",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--benchmark", default="MT10", help="env.benchmark (default MT10; toy for a quick check)")
    parser.add_argument("--combiner", default="mean", help="combiner name(s), comma-separated (default mean)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--steps", type=int, default=50, help="timed vector steps (default 50)")
    parser.add_argument("--warmup", type=int, default=200, help="vector steps of random actions first (default 200)")
    parser.add_argument("--settle", type=int, default=5, help="vector steps with updates before timing (default 5)")
    parser.add_argument("--strategy", help="env.vector_strategy (default: the config's)")
    parser.add_argument("--overlap", action="store_true", help="also time each combiner with train.overlap=true")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config override, e.g. agent.hidden_sizes=[64,64] (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of records")


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "warmup"):
        if getattr(args, name) < 2:
            raise ConfigError(f"--{name} must be >= 2, found {getattr(args, name)}")
    if args.settle < 0:
        raise ConfigError(f"--settle must be >= 0, found {args.settle}")
    records = bench_train(args)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    print(f"{'combiner':<11} {'overlap':<7} {'steps/s':>8} {'collect_ms':>10} {'update_ms':>9} {'efficiency':>10}")
    for r in records:
        print(
            f"{r['combiner']:<11} {str(r['overlap']):<7} {r['vector_steps_per_s']:>8.2f} {r['collect_ms']:>10.2f} "
            f"{r['update_ms']:>9.2f} {r['overlap_efficiency']:>10.3f}"
        )
    return 0
