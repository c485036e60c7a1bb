"""`mtrl bench update`: one record per combiner, K, device and compile mode, with the ratios it reports."""

from __future__ import annotations

import json

import pytest

from mtrl.cli import main

FIELDS = {
    "combiner",
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
        mean = next(m for m in records if m["combiner"] == "mean" and m["K"] == r["K"])
        # the ratios are of the unrounded times
        assert r["update_ms"] > 0 and r["ratio_to_mean"] == pytest.approx(r["update_ms"] / mean["update_ms"], rel=1e-2)
        assert r["jacobian_ratio"] == pytest.approx(r["jacobian_ms"] / r["mean_backward_ms"], rel=1e-2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--combiners", "meen"], "unknown combiner(s) ['meen']; choose from:"),
        (["--compile", "none,fast"], "unknown compile mode(s) ['fast']; choose from: none, default, reduce-overhead"),
    ],
)
def test_bench_update_refuses_bad_flags_in_one_line(flags, message, capsys):
    assert main(["bench", "update", *SMALL, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mtrl: error: {message}") and "\n" not in err
