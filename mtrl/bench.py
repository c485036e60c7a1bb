"""`mtrl bench update`: the cost of one full SAC update per combiner and architecture, side by side.

For each device, K and architecture (`--architectures`, each with its default hyper-parameters),
every combiner runs the same full update (critic + actor + temperature) on the same synthetic
stratified batch. Alongside, the critic's per-task Jacobian and a plain mean-loss backward of the
same critic loss are timed, which is the ratio the one-pass Jacobian is judged by; with
architectures other than `conditioned`, every update is also compared with multihead's mean update.
Medians over `--repeats` after warm-up (the Jacobian and the mean backward called in turn, so
that a busy machine weighs on both alike); CUDA timings are synchronised. `--compile`
times the update compiled with each listed `torch.compile` mode (`train.compile`) as well; the
first calls, which compile (and record CUDA graphs), are warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from mtrl.buffer import Batch
from mtrl.build import set_cpu_threads
from mtrl.combiners import COMBINERS, Combiner, make_combiner
from mtrl.compiled import COMPILE_MODES, CompiledUpdate, make_learner
from mtrl.config import ConfigError, agent_section
from mtrl.jacobian import JacobianBuffer, mean_backward, task_jacobian
from mtrl.networks import ARCHITECTURES
from mtrl.optim import Optimization
from mtrl.sac import MTSAC, SACUpdate

OBS_DIM, ACT_DIM = 39, 4  # Meta-World's observation (without the one-hot) and action sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    return paired_median_ms([fn], device, repeats, warmup)[0]


def paired_median_ms(
    fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> list[float]:
    """Each function's median time in ms, the functions called in turn (one call of each per repeat), so
    that a machine's slower and faster moments fall on all of them alike and their ratio holds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times, strict=True):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            fn_times.append(time.perf_counter() - start)
    return [1000 * statistics.median(fn_times) for fn_times in times]


def synthetic_batch(k: int, b: int, obs_dim: int, device: torch.device, generator: torch.Generator) -> Batch:
    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    one_hot = torch.eye(k, device=device)[:, None, :].expand(k, b, k)
    obs = torch.cat([randn(k, b, obs_dim), one_hot], dim=-1)
    next_obs = torch.cat([randn(k, b, obs_dim), one_hot], dim=-1)
    action = torch.rand(k, b, ACT_DIM, generator=generator, device=device) * 2 - 1
    zeros = torch.zeros(k, b, device=device)
    return Batch(obs, action, randn(k, b), next_obs, zeros, zeros)


def _update(
    k: int, hidden: list[int], name: str, device: torch.device, compile: str = "none", architecture: str = "conditioned"
) -> SACUpdate | CompiledUpdate:
    """The full update the trainer runs with combiner (or optimizer) `name`, on freshly initialised networks."""
    optimizer = "adatask" if name == "adatask" else "adam"
    combiner = make_combiner("mean" if name == "adatask" else name)
    cfg = agent_section(architecture)(architecture=architecture, hidden_sizes=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        agent = MTSAC(OBS_DIM + k, ACT_DIM, k, cfg).to(device)
    optimization = Optimization(agent.params, optimizer, agent.learning_rates, k)
    return make_learner(SACUpdate(agent, optimization, combiner, bench_networks(combiner)), compile)


def bench_networks(combiner: Combiner) -> list[str]:
    """The networks a combiner is timed on: critic and actor, or the critic alone for a combiner that
    weighs only the critic's losses (FAMO, GradNorm)."""
    try:
        combiner.check_networks(["critic", "actor"])
    except ValueError:
        return ["critic"]
    return ["critic", "actor"]


def bench_update(
    combiners: list[str],
    tasks: list[int],
    devices: list[torch.device],
    b: int,
    hidden: list[int],
    repeats: int,
    compile_modes: tuple[str, ...] = ("none",),
    architectures: tuple[str, ...] = ("conditioned",),
) -> list[dict]:
    """One record per device, K, architecture, compile mode and combiner; `combiners` and `architectures`
    start with the ones the ratios refer to (mean; multihead, when more than conditioned is measured)."""
    records = []
    for device in devices:
        for k in tasks:
            gen = torch.Generator(device=device).manual_seed(0)
            cpu_gen = torch.Generator().manual_seed(0)
            batch = synthetic_batch(k, b, OBS_DIM, device, gen)
            multihead_mean_ms: dict[str, float] = {}  # per compile mode
            for architecture in architectures:
                # the critic loss alone: Jacobian vs mean-loss backward, on identical inputs
                agent = _update(k, hidden, "mean", device, architecture=architecture).agent
                objective = agent.critic_objective(batch, batch.reward.clone())
                jacobian = partial(task_jacobian, objective, out=JacobianBuffer())  # kept, as the update keeps it
                jacobian_ms, mean_backward_ms = paired_median_ms(
                    [jacobian, partial(mean_backward, objective)], device, repeats
                )

                for mode, name in ((mode, name) for mode in compile_modes for name in combiners):
                    if mode != "none" and name in COMBINERS and not COMBINERS[name].supports_compile:
                        continue  # refused by the config too (train.compile)
                    update = _update(k, hidden, name, device, mode, architecture)
                    warmup = 2 if mode == "none" else 4  # compiling, then recording the graphs
                    update_ms = median_ms(partial(update, batch, gen, cpu_gen), device, repeats, warmup)
                    if name == "mean":
                        mean_update_ms = update_ms
                        if architecture == "multihead":
                            multihead_mean_ms[mode] = update_ms
                    reference = multihead_mean_ms.get(mode)
                    records.append(
                        {
                            "combiner": name,
                            "architecture": architecture,
                            "K": k,
                            "device": str(device),
                            "compile": mode,
                            "networks": bench_networks(update.combiner),
                            "update_ms": round(update_ms, 3),
                            "ratio_to_mean": round(update_ms / mean_update_ms, 3),
                            "ratio_to_multihead_mean": None if reference is None else round(update_ms / reference, 3),
                            "jacobian_ms": round(jacobian_ms, 3),
                            "mean_backward_ms": round(mean_backward_ms, 3),
                            "jacobian_ratio": round(jacobian_ms / mean_backward_ms, 3),
                            "batch_per_task": b,
                            "hidden": hidden,
                        }
                    )
    return records


def run_update_bench(args: argparse.Namespace) -> int:
    names = ["mean", *[n for n in COMBINERS if n != "mean"], "adatask"]
    if args.combiners != "all":
        names = [n.strip() for n in args.combiners.split(",")]
        unknown = [n for n in names if n not in COMBINERS and n != "adatask"]
        if unknown:
            raise ConfigError(f"unknown combiner(s) {unknown}; choose from: {', '.join([*COMBINERS, 'adatask'])}")
        names = ["mean", *[n for n in names if n != "mean"]]  # mean first: the other ratios refer to it
    if args.devices == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(d.strip()) for d in args.devices.split(",")]
    set_cpu_threads(args.threads)
    tasks = [int(k) for k in args.tasks.split(",")]
    hidden = [int(h) for h in args.hidden.split(",")]
    modes = tuple(m.strip() for m in args.compile.split(","))
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown:
        raise ConfigError(f"unknown compile mode(s) {unknown}; choose from: {', '.join(COMPILE_MODES)}")
    architectures = list(ARCHITECTURES) if args.architectures == "all" else args.architectures.split(",")
    architectures = [a.strip() for a in architectures]
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        raise ConfigError(f"unknown architecture(s) {unknown}; choose from: {', '.join(ARCHITECTURES)}")
    if architectures != ["conditioned"]:  # multihead first: the other architectures' ratios refer to it
        architectures = ["multihead", *[a for a in architectures if a != "multihead"]]
    records = bench_update(
        names, tasks, devices, args.batch_per_task, hidden, args.repeats, modes, tuple(architectures)
    )
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        header = (
            f"{'architecture':<13} {'combiner':<11} {'K':>3} {'device':<6} {'compile':<15} {'update_ms':>10} "
            f"{'x mean':>7} {'x mh mean':>9} {'jac_ms':>8} {'mean_bw_ms':>10} {'jac/bw':>7}"
        )
        print(header)
        for r in records:
            versus_multihead = "-" if r["ratio_to_multihead_mean"] is None else f"{r['ratio_to_multihead_mean']:.2f}"
            print(
                f"{r['architecture']:<13} {r['combiner']:<11} {r['K']:>3} {r['device']:<6} {r['compile']:<15} "
                f"{r['update_ms']:>10.2f} {r['ratio_to_mean']:>7.2f} {versus_multihead:>9} {r['jacobian_ms']:>8.2f} "
                f"{r['mean_backward_ms']:>10.2f} {r['jacobian_ratio']:>7.2f}"
            )
    return 0
