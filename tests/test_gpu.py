"""Training, evaluation and loading on a CUDA device; skipped without one (tests/conftest.py).

A CUDA run draws its replay indices and policy noise from a generator on the GPU, whose stream
differs from the CPU generator's, so a CUDA run and a CPU run part ways at the first update. They
must agree up to it: warm-up transitions, and an evaluation of the initial policy. After it, a CUDA
run must not depend on where its replay buffer lives (indices are drawn on the GPU either way), and
combiners and AdaTask must compute on the GPU what they compute on the CPU. An update driven by CPU
generators draws the same noise on either device.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtrl import load_policy
from mtrl.adatask import AdaTask
from mtrl.buffer import Batch
from mtrl.combiners import COMBINERS, make_combiner
from mtrl.combiners.base import TaskLosses
from mtrl.config import AgentConfig
from mtrl.envs import make_backend
from mtrl.evaluation import evaluate
from mtrl.optim import Optimization
from mtrl.rundir import METRICS_FILE
from mtrl.sac import MTSAC, SACUpdate
from mtrl.trainer import Trainer
from tests.conftest import toy_config

pytestmark = pytest.mark.gpu

CUDA = "cuda"
WARMUP, TOTAL = 41, 60  # the evaluation at step 40 sees the initial policy; 20 updates follow


def _run(run: Path, *overrides: str) -> tuple[Trainer, list[dict]]:
    cfg = toy_config(
        run,
        f"train.warmup_steps={WARMUP}",
        f"train.total_steps={TOTAL}",
        "eval.every=40",
        "eval.episodes=3",
        "checkpoint.every=0",
        *overrides,
    )
    trainer = Trainer(cfg, run)
    assert trainer.train() == 0
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    return trainer, [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def _record(records: list[dict], kind: str, step: int) -> dict:
    return next(r for r in records if r["kind"] == kind and r["step"] == step)


def _assert_close_records(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_close_records(value, b[key], rel)
        elif isinstance(value, float):
            assert b[key] == pytest.approx(value, rel=rel, abs=1e-6), key
        else:
            assert b[key] == value, key


VARIANTS = {
    "mean": ["combiner.name=mean"],
    "cagrad": ["combiner.name=cagrad"],
    "sdmgrad_os": ["combiner.name=sdmgrad_os", "combiner.n=1"],  # a random subset of the 3 tasks
    "adatask": ["optimizer.name=adatask"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_training_agrees_with_cpu_and_does_not_depend_on_where_the_buffer_lives(variant, tmp_path):
    overrides = VARIANTS[variant]
    cpu, cpu_records = _run(tmp_path / "cpu", "device=cpu", *overrides)
    gpu, gpu_records = _run(tmp_path / "gpu", f"device={CUDA}", f"train.buffer_device={CUDA}", *overrides)
    host, host_records = _run(tmp_path / "host", f"device={CUDA}", "train.buffer_device=cpu", *overrides)
    assert gpu.buffer.device.type == "cuda" and host.buffer.device.type == "cpu"
    assert next(gpu.agent.parameters()).device.type == "cuda"

    # Up to the first update, the device changes nothing but rounding.
    cpu_buffer, gpu_buffer = cpu.buffer.state_dict(), gpu.buffer.state_dict()
    for field in ("obs", "action", "reward", "next_obs", "terminated", "truncated"):
        assert torch.equal(gpu_buffer[field][:, : WARMUP - 1], cpu_buffer[field][:, : WARMUP - 1]), field
    first_eval = _record(cpu_records, "eval", 40)
    assert _record(gpu_records, "eval", 40)["eval/success/per_task"] == first_eval["eval/success/per_task"]
    assert _record(gpu_records, "eval", 40)["eval/mean_return"] == pytest.approx(first_eval["eval/mean_return"], 1e-4)

    # The CUDA runs learnt: every update was finite, and the weights moved and stayed finite.
    for trainer in (gpu, host):
        assert trainer.counters.updates == TOTAL - WARMUP + 1 and trainer.counters.bad_updates == 0
        assert all(torch.isfinite(p).all() for p in trainer.agent.state_dict().values())
    # Where the buffer lives changes nothing: same indices (drawn on the GPU), same batches, same run.
    for name, p in gpu.agent.state_dict().items():
        torch.testing.assert_close(host.agent.state_dict()[name], p, rtol=1e-3, atol=1e-4, msg=name)
    for kind, step in (("train", TOTAL), ("eval", TOTAL)):
        _assert_close_records(_record(gpu_records, kind, step), _record(host_records, kind, step), rel=1e-3)


@pytest.mark.parametrize("variant", ["mean", "cagrad"])
def test_with_cpu_draws_a_cuda_run_ends_with_the_cpu_runs_weights(variant, tmp_path):
    """`train.rng_device=cpu`: the replay indices and the noise are the CPU run's, so after N updates the
    CUDA weights equal the CPU weights up to float rounding (an independent check of the whole update)."""
    overrides = [*VARIANTS[variant], "train.rng_device=cpu"]
    cpu, cpu_records = _run(tmp_path / "cpu", "device=cpu", *overrides)
    gpu, gpu_records = _run(tmp_path / "gpu", f"device={CUDA}", *overrides)
    assert gpu.counters.updates == cpu.counters.updates == TOTAL - WARMUP + 1
    for name, p in cpu.agent.state_dict().items():
        torch.testing.assert_close(gpu.agent.state_dict()[name].cpu(), p, rtol=1e-3, atol=1e-4, msg=name)
    _assert_close_records(_record(gpu_records, "train", TOTAL), _record(cpu_records, "train", TOTAL), rel=1e-3)


@pytest.mark.parametrize("variant", ["mean", "adatask"])  # graphs that compile in seconds; cagrad: bench update
def test_the_update_captured_as_cuda_graphs_ends_with_the_eager_updates_weights(variant, tmp_path):
    """`train.compile=reduce-overhead`: the whole update, steps and skip decision included, replayed as
    CUDA graphs, against the eager update on the same GPU with the same draws, after 20 updates."""
    eager, eager_records = _run(tmp_path / "eager", f"device={CUDA}", *VARIANTS[variant])
    graphs, graph_records = _run(
        tmp_path / "graphs", f"device={CUDA}", *VARIANTS[variant], "train.compile=reduce-overhead"
    )
    assert graphs.counters.updates == eager.counters.updates == TOTAL - WARMUP + 1
    for name, p in eager.agent.state_dict().items():
        torch.testing.assert_close(graphs.agent.state_dict()[name], p, rtol=1e-3, atol=1e-4, msg=name)
    _assert_close_records(_record(graph_records, "train", TOTAL), _record(eager_records, "train", TOTAL), rel=1e-3)


@pytest.mark.parametrize("name", sorted(COMBINERS))
def test_combiners_compute_on_cuda_what_they_compute_on_the_cpu(name):
    g = torch.Generator().manual_seed(0)
    k, n = 6, 500
    shared = torch.randn(n, generator=g)
    # some agreement and some conflict, and unequal scales
    matrix = (0.5 * shared + torch.randn(k, n, generator=g)) * torch.logspace(-1, 1, k)[:, None]
    results = []
    for device in ("cpu", CUDA):
        combiner = make_combiner(name)
        generator = torch.Generator().manual_seed(1)  # the trainer hands combiners a CPU generator
        rows = combiner.select_tasks(k, generator).cpu()
        # losses for the loss-weighting combiners (the others ignore them); the last 100 columns are the last layer
        layout = (("trunk.weight", 400), ("head.weight", 100))
        losses = TaskLosses("critic", torch.linspace(0.5, 2.0, k)[rows].to(device), layout)
        updates = [combiner(matrix[rows].to(device), generator=generator, losses=losses).cpu() for _ in range(3)]
        results.append((rows, updates))
    (cpu_rows, cpu_updates), (gpu_rows, gpu_updates) = results
    assert torch.equal(cpu_rows, gpu_rows)
    for step, (a, b) in enumerate(zip(cpu_updates, gpu_updates, strict=True)):  # stateful ones: warm starts too
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"{name}, call {step}")


def test_adatask_steps_on_cuda_as_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    grads = [torch.randn(5, 15, generator=g) * torch.logspace(-2, 1, 5)[:, None] for _ in range(4)]
    final = []
    for device in ("cpu", CUDA):
        params = [torch.nn.Parameter(weight.clone().to(device)), torch.nn.Parameter(bias.clone().to(device))]
        optimizer = AdaTask(params, num_tasks=5, lr=1e-2)
        for task_grads in grads:
            optimizer.step_tasks(task_grads.to(device))
        assert optimizer.state[params[0]]["exp_avg"].device.type == torch.device(device).type
        final.append([p.detach().cpu() for p in params])
    for a, b in zip(*final, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.equal(final[0][0], weight)


def test_a_policy_loaded_on_cuda_acts_and_evaluates_as_on_the_cpu(tmp_path):
    trainer, _ = _run(tmp_path / "run", "device=cpu", "checkpoint.every=20")
    on_cpu, on_gpu = load_policy(tmp_path / "run", device="cpu"), load_policy(tmp_path / "run", device=CUDA)
    assert next(on_gpu.actor.parameters()).device.type == "cuda"
    obs = np.random.default_rng(0).normal(size=(3, trainer.obs_dim)).astype(np.float32)
    np.testing.assert_allclose(on_gpu.eval_action(obs), on_cpu.eval_action(obs), rtol=1e-5, atol=1e-6)
    results = [
        evaluate(policy, make_backend(trainer.cfg.env, trainer.cfg.seed, evaluation=True), 5)
        for policy in (on_cpu, on_gpu)
    ]
    assert results[1].per_task.keys() == results[0].per_task.keys()
    for task, expected in results[0].per_task.items():
        assert results[1].per_task[task]["success"] == expected["success"], task
        assert results[1].per_task[task]["return"] == pytest.approx(expected["return"], rel=1e-4), task


def test_a_cpu_generator_drives_a_cuda_update_as_it_drives_a_cpu_one():
    """The update draws its noise where its generator lives: with CPU generators, a CUDA update sees the
    same noise as a CPU update, and only rounding separates them."""
    k, b, obs_dim, act_dim = 3, 16, 8, 2
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        torch.randn(k, b, obs_dim, generator=g),
        torch.rand(k, b, act_dim, generator=g) * 2 - 1,
        torch.randn(k, b, generator=g),
        torch.randn(k, b, obs_dim, generator=g),
        torch.zeros(k, b),
        torch.zeros(k, b),
    )
    weights = []
    for device in ("cpu", CUDA):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            agent = MTSAC(obs_dim, act_dim, k, AgentConfig(hidden_sizes=[32, 32])).to(device)
        optimization = Optimization(agent.params, "adam", agent.learning_rates, k)
        update = SACUpdate(agent, optimization, make_combiner("cagrad"))
        on_device = Batch(*(x.to(device) for x in batch))
        for step in range(3):
            result = update(on_device, torch.Generator().manual_seed(step), torch.Generator().manual_seed(0))
            assert result.finite
        assert next(agent.parameters()).device.type == torch.device(device).type
        weights.append({name: p.detach().cpu() for name, p in agent.state_dict().items()})
    for name, p in weights[0].items():
        torch.testing.assert_close(weights[1][name], p, rtol=1e-4, atol=1e-5, msg=name)
