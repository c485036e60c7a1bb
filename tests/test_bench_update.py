"""`mtrl bench update`: one record per combiner, K, device and compile mode, with the ratios it reports."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mtrl.bench import paired_median_ms
from mtrl.cli import main

FIELDS = {
    "combiner",
    "architecture",
    "ratio_to_multihead_mean",
    "K",
    "device",
    "compile",
    "networks",
    "update_ms",
    "ratio_to_mean",
    "jacobian_ms",
    "mean_backward_ms",
    "jacobian_ratio",
    "batch_per_task",
    "hidden",
}
SMALL = ["--tasks", "2,3", "--devices", "cpu", "--hidden", "8", "--batch-per-task", "4", "--repeats", "3"]


def test_bench_update_records_each_combiner_against_mean_at_each_k(capsys):
    assert main(["bench", "update", "--json", "--combiners", "pcgrad,famo,adatask", *SMALL]) == 0
    records = json.loads(capsys.readouterr().out)
    # mean first at each K: the other combiners' ratios refer to it
    names = ("mean", "pcgrad", "famo", "adatask")
    assert [(r["combiner"], r["K"]) for r in records] == [(n, k) for k in (2, 3) for n in names]
    for r in records:
        # FAMO weighs the critic's losses only (the config refuses the actor for it)
        assert r["networks"] == (["critic"] if r["combiner"] == "famo" else ["critic", "actor"])
        assert set(r) == FIELDS
        assert (r["device"], r["compile"], r["batch_per_task"], r["hidden"]) == ("cpu", "none", 4, [8])
        assert r["architecture"] == "conditioned" and r["ratio_to_multihead_mean"] is None
        mean = next(m for m in records if m["combiner"] == "mean" and m["K"] == r["K"])
        # the ratios are of the unrounded times
        assert r["update_ms"] > 0 and r["ratio_to_mean"] == pytest.approx(r["update_ms"] / mean["update_ms"], rel=1e-2)
        assert r["jacobian_ratio"] == pytest.approx(r["jacobian_ms"] / r["mean_backward_ms"], rel=1e-2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--combiners", "meen"], "unknown combiner(s) ['meen']; choose from:"),
        (["--compile", "none,fast"], "unknown compile mode(s) ['fast']; choose from: none, default, reduce-overhead"),
        (["--architectures", "moore,mlp"], "unknown architecture(s) ['mlp']; choose from: conditioned, multihead,"),
    ],
)
def test_bench_update_refuses_bad_flags_in_one_line(flags, message, capsys):
    assert main(["bench", "update", *SMALL, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mtrl: error: {message}") and "\n" not in err


def test_bench_update_measures_each_architecture_next_to_multiheads_mean_update(capsys):
    small = ["--tasks", "2", "--devices", "cpu", "--hidden", "6", "--batch-per-task", "3", "--repeats", "1"]
    assert main(["bench", "update", "--json", "--combiners", "mean,cagrad", "--architectures", "paco", *small]) == 0
    records = json.loads(capsys.readouterr().out)
    # multihead first: the other architectures' ratios refer to its mean update
    expected = [(a, c) for a in ("multihead", "paco") for c in ("mean", "cagrad")]
    assert [(r["architecture"], r["combiner"]) for r in records] == expected
    reference = records[0]["update_ms"]
    for r in records:
        assert set(r) == FIELDS
        assert r["ratio_to_multihead_mean"] == pytest.approx(r["update_ms"] / reference, rel=1e-2)
        mean = next(m for m in records if m["combiner"] == "mean" and m["architecture"] == r["architecture"])
        assert r["ratio_to_mean"] == pytest.approx(r["update_ms"] / mean["update_ms"], rel=1e-2)
    paco = [r for r in records if r["architecture"] == "paco"]
    assert paco[0]["jacobian_ms"] == paco[1]["jacobian_ms"] != records[0]["jacobian_ms"]  # measured per architecture


def test_paired_timings_call_the_functions_in_turn_and_time_each_call():
    calls = []

    def short():
        calls.append("short")

    def long():
        calls.append("long")
        time.sleep(0.02)

    short_ms, long_ms = paired_median_ms([short, long], torch.device("cpu"), repeats=3, warmup=1)
    assert calls == ["short", "long"] * 4
    assert long_ms >= 20 and short_ms < 5
