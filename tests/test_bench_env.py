"""`mtrl bench env`: one record per strategy with its rate, the lockstep ceiling and their ratio."""

from __future__ import annotations

import json

import pytest

from mtrl.bench_env import lockstep_ceiling
from mtrl.cli import main
from mtrl.envs.pool import usable_cores

FIELDS = {
    "benchmark",
    "backend",
    "strategy",
    "workers",
    "num_tasks",
    "cores",
    "steps",
    "repeats",
    "env_steps_per_s",
    "env_steps_per_s_repeats",
    "vector_steps_per_s",
    "ceiling_env_steps_per_s",
    "ceiling_formula",
    "ratio_to_ceiling",
    "construction_s",
    "task_steps_per_s",
}


def test_the_lockstep_ceiling_is_k_times_the_slowest_task_or_what_the_cores_share():
    rates = [1000.0, 2000.0, 4000.0]
    assert lockstep_ceiling(rates, cores=3) == (3000.0, "K x slowest task")  # as many cores as tasks
    # one core steps every task in turn: 1 / (1/1000 + 1/2000 + 1/4000) vector steps/s
    ceiling, formula = lockstep_ceiling(rates, cores=1)
    assert ceiling == pytest.approx(3 * 4000 / 7) and formula == "K x cores / sum(1/task rate)"
    # two cores could share the work at 1142.9 vector steps/s, but the slowest task allows 1000
    assert lockstep_ceiling(rates, cores=2) == (3000.0, "K x slowest task")


def test_bench_env_on_the_toy_benchmark_writes_one_record_per_strategy(capsys):
    argv = ["bench", "env", "--json", "--benchmarks", "toy", "--steps", "60", "--warmup", "5", "--workers", "1,2"]
    argv += ["--repeats", "3"]
    assert main(argv) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["strategy"], r["workers"]) for r in records] == [("sync", 1), ("async", 4), ("pool", 1), ("pool", 2)]
    rates = records[0]["task_steps_per_s"]
    assert list(rates) == ["toy-0", "toy-1", "toy-2", "toy-3"] and all(v > 0 for v in rates.values())
    ceiling, formula = lockstep_ceiling(list(rates.values()), usable_cores())
    for r in records:
        assert set(r) == FIELDS
        assert (r["benchmark"], r["backend"], r["num_tasks"], r["steps"], r["cores"]) == (
            "toy",
            "toy",
            4,
            60,
            usable_cores(),
        )
        assert r["task_steps_per_s"] == rates  # measured once, shared by every record of the run
        assert r["ceiling_env_steps_per_s"] == pytest.approx(ceiling, abs=0.1) and r["ceiling_formula"] == formula
        assert r["ratio_to_ceiling"] == pytest.approx(r["env_steps_per_s"] / r["ceiling_env_steps_per_s"], abs=1e-4)
        assert r["vector_steps_per_s"] == pytest.approx(r["env_steps_per_s"] / 4, abs=0.05)
        assert r["env_steps_per_s"] == pytest.approx(sorted(r["env_steps_per_s_repeats"])[1], abs=0.1)  # median of 3
        assert r["env_steps_per_s"] > 0 and r["construction_s"] >= 0 and r["repeats"] == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--benchmarks", "MT7"], "unknown benchmark(s) ['MT7']; choose from: MT10, MT25, MT50, toy"),
        (["--strategies", "sync,fork"], "unknown strategy(s) ['fork']; choose from: sync, async, pool"),
        (["--steps", "0"], "--steps must be >= 1, found 0"),
        (["--repeats", "0"], "--repeats must be >= 1, found 0"),
        (["--workers", "2,-1"], "--workers must be >= 0, found -1"),
        (["--workers", "two"], "--workers must be comma-separated integers, found 'two'"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, flags, message):
    assert main(["bench", "env", "--benchmarks", "toy", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"mtrl: error: {message}\n" and captured.out == ""
