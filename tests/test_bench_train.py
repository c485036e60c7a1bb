"""`mtrl bench train`: the real trainer timed on one set of envs, serially and overlapped, per combiner."""

from __future__ import annotations

import json

import pytest

from mtrl.cli import main

TOY = ["--benchmark", "toy", "--device", "cpu", "--steps", "6", "--warmup", "10", "--settle", "2"]
SMALL = ["--set", "agent.hidden_sizes=[16]", "--set", "train.batch_per_task=4"]


def test_records_per_combiner_and_mode_with_consistent_shares_and_efficiency(capsys):
    assert main(["bench", "train", *TOY, *SMALL, "--combiner", "mean,cagrad", "--overlap", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["combiner"], r["overlap"]) for r in records] == [
        ("mean", False),
        ("mean", True),
        ("cagrad", False),
        ("cagrad", True),
    ]
    for serial, overlapped in (records[0:2], records[2:4]):
        assert serial["env_share"] + serial["update_share"] == pytest.approx(1.0, abs=2e-3)
        # the overlapped run is judged against the serial run's phase times
        assert (overlapped["collect_ms"], overlapped["update_ms"]) == (serial["collect_ms"], serial["update_ms"])
    for r in records:
        assert r["benchmark"] == "toy" and r["device"] == "cpu" and r["steps"] == 6 and r["hidden"] == [16]
        assert r["vector_steps_per_s"] > 0 and r["collect_ms"] > 0 and r["update_ms"] > 0
        slower = max(r["collect_ms"], r["update_ms"])
        assert r["overlap_efficiency"] == pytest.approx(r["vector_steps_per_s"] * slower / 1000, rel=1e-2, abs=2e-3)
    for serial in (records[0], records[2]):  # a serial step takes both phases: at best max / (collect + update)
        assert serial["overlap_efficiency"] <= max(serial["env_share"], serial["update_share"]) + 2e-3


@pytest.mark.parametrize("flag", ["--steps", "--warmup"])
def test_too_few_steps_are_one_line(flag, capsys):
    assert main(["bench", "train", *TOY, flag, "1"]) == 2
    assert capsys.readouterr().err.strip() == f"mtrl: error: {flag} must be >= 2, found 1"
