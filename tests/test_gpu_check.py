"""scripts/gpu_check.sh rehearsed on the CPU: every step runs and writes the JSON it promises.

The script is meant for a GPU server that CI never has; `GPU_CHECK_DEVICE=cpu` runs the same steps
(but the `gpu` tests) with tiny sizes, so a broken flag or a renamed field fails here, not there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_step_limits_add_up_to_under_8_minutes():  # the default suite: it only reads the script
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    limits = {name: int(limit) for name, limit in re.findall(r"^\s*step (\w+) (\d+) ", script, re.MULTILINE)}
    assert {"gpu_tests", "gpu_compile_tests", "bench_update_compiled", "train_mt10"} <= set(limits)
    assert sum(limits.values()) <= 8 * 60, limits


@pytest.mark.slow
@pytest.mark.metaworld
def test_the_gpu_check_rehearses_on_the_cpu_and_writes_its_records(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DEVICE": "cpu", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, (summary, proc.stderr[-3000:])
    assert [s["step"] for s in summary] == [
        "bench_update",
        "bench_update_compiled",
        "bench_train_mt10",
        "bench_train_mt10_compiled",
        "bench_train_mt50",
        "bench_env",
        "train_mt10",
    ]
    assert all(s["rc"] == 0 for s in summary)

    update = json.loads((out / "bench_update.json").read_text())
    assert {(r["combiner"], r["device"]) for r in update} == {("mean", "cpu"), ("cagrad", "cpu")}
    compiled = json.loads((out / "bench_update_compiled.json").read_text())
    assert [(r["combiner"], r["K"], r["compile"], r["hidden"]) for r in compiled] == [
        ("mean", 2, "none", [16, 16]),
        ("cagrad", 2, "none", [16, 16]),
    ]
    for benchmark in ("mt10", "mt50"):
        records = json.loads((out / f"bench_train_{benchmark}.json").read_text())
        assert [(r["combiner"], r["overlap"]) for r in records] == [
            ("mean", False),
            ("mean", True),
            ("cagrad", False),
            ("cagrad", True),
        ]
        for r in records:
            assert r["benchmark"] == benchmark.upper() and r["strategy"] == "pool"
            assert r["vector_steps_per_s"] > 0 and r["update_ms"] > 0 and r["collect_ms"] > 0
            assert r["overlap_efficiency"] == pytest.approx(
                r["vector_steps_per_s"] * max(r["update_ms"], r["collect_ms"]) / 1000, rel=1e-2, abs=2e-3
            )
    compiled_train = json.loads((out / "bench_train_mt10_compiled.json").read_text())
    assert [(r["combiner"], r["overlap"], r["compile"]) for r in compiled_train] == [
        ("cagrad", False, "none"),
        ("cagrad", True, "none"),
    ]
    env_records = [json.loads(line) for line in (out / "bench_env.json").read_text().splitlines() if line.strip()]
    assert {r["strategy"] for r in env_records} == {"sync", "async", "pool"}
    metrics = [json.loads(line) for line in (out / "train_mt10_metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["kind"] == "eval" and metrics[-1]["step"] == 60
    assert (out / "versions.json").is_file()
