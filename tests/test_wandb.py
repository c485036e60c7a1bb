"""Weights & Biases tracking (`log.wandb: true`) in W&B's offline mode, no network: the offline run's
own record file holds the run log's history, the run's settings and config, and a resume continues the
same W&B run. Without the wandb package, `log.wandb: true` is refused at config time."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from mtrl.cli import main
from mtrl.config import ConfigError
from mtrl.rundir import METRICS_FILE
from mtrl.tracking import WANDB_ID_FILE
from tests.conftest import TOY_OVERRIDES

pytest.importorskip("wandb")
from google.protobuf.message import DecodeError  # noqa: E402 - after the skip
from wandb.proto import wandb_internal_pb2  # noqa: E402 - after the skip

BLOCK = 32 * 1024  # the LevelDB log format of .wandb files: 32 KiB blocks of chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_file(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a .wandb file: a 7-byte W&B header, then LevelDB log chunks (CRC32C, length, type)
    that hold serialized `Record` protobufs, a chunk never crossing a block boundary."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeros: the preallocated end
            break
        if pos + 7 + length > len(data):  # a chunk the writer has not finished
            break
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (FULL, FIRST):
            pending = payload
        else:
            pending += payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_finished_run(path: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The records of a run's .wandb file once it holds the run's exit record: W&B's service process writes
    the file on its own, and may still be at it when `finish()` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_wandb_file(path) if path.exists() else []
        except DecodeError:  # a record the service process is still writing
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _history(records: list) -> dict[int, dict[str, float]]:
    """step -> the values logged at it (W&B's own `_...` keys left out)."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            out[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


def _run_record(records: list):
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run


def _config(records: list) -> dict:
    """The run's config: the run record's, then its updates in order."""
    config: dict = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            update = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update})
    return config


def _expected_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """What the tracker should have logged: metrics.jsonl's records, per-task values as `key/<task>`."""
    expected: dict[int, dict[str, float]] = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        values = expected.setdefault(record.pop("step"), {})
        record.pop("kind")
        for key, value in record.items():
            if key.endswith("/per_task"):
                values.update({f"{key.removesuffix('/per_task')}/{t}": v for t, v in value.items() if v is not None})
            elif value is not None:
                values[key] = value
    return expected


def _offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> Path:
    wandb_dir = tmp_path / "wandb-files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return wandb_dir


def test_an_offline_run_holds_the_run_log_and_a_resume_continues_it(tmp_path, offline_wandb):
    run = tmp_path / "run"
    tracking = [
        "log.wandb=true",
        "log.wandb_project=mtrl-test",
        "log.wandb_group=sweep-a",
        "log.wandb_tags=[toy,mean]",
    ]
    overrides = [*TOY_OVERRIDES, *tracking, f"run.dir={run}", "seed=3", "eval.every=60", "log.every=30"]
    videos = ["eval.video_every=1", "eval.video_width=16", "eval.video_height=16"]
    assert main(["train", *_preset(tmp_path), *overrides, *videos, "train.total_steps=60"]) == 0
    (first,) = _offline_runs(offline_wandb)
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    records = read_finished_run(first)
    info = _run_record(records)
    assert (info.run_id, info.project, info.run_group) == (run_id, "mtrl-test", "sweep-a")
    assert list(info.tags) == ["toy", "mean"]
    config = _config(records)
    assert config["seed"] == 3 and config["log"]["wandb_group"] == "sweep-a"
    assert config["train"]["total_steps"] == 60
    history = _history(records)
    assert sorted(history) == [30, 60]
    # the evaluation's videos, one per task, next to its values
    filmed: dict[str, dict] = {}  # W&B stores a video as the nested keys video/<task>/<field>
    for key in [k for k in history[60] if k.startswith("video/")]:
        task, field = key.removeprefix("video/").split("/")
        filmed.setdefault(task, {})[field] = history[60].pop(key)
    assert sorted(filmed) == ["toy-0", "toy-1", "toy-2"]
    assert all(v["_type"] == "video-file" and v["path"].endswith(".mp4") and v["size"] > 0 for v in filmed.values())
    assert history == _expected_history(run)
    # the eval record's per-task values reach W&B under eval/success/<task>
    assert {"eval/success/toy-0", "eval/return/toy-2", "train/episode_return/toy-1"} <= set(history[60])

    assert main(["train", "--resume", str(run), "train.total_steps=120", "log.progress=false"]) == 0
    second = next(p for p in _offline_runs(offline_wandb) if p != first)
    resumed = read_finished_run(second)
    assert _run_record(resumed).run_id == run_id  # the same W&B run, continued
    assert _config(resumed)["train"]["total_steps"] == 120  # the resume's override
    history_after = _history(resumed)
    assert sorted(history_after) == [90, 120]
    for key in [k for k in history_after[120] if k.startswith("video/")]:
        del history_after[120][key]  # the last evaluation's videos
    assert {**history, **history_after} == _expected_history(run)


def test_without_the_wandb_package_log_wandb_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's way of making an import fail
    from mtrl.config import load_config

    with pytest.raises(ConfigError, match=r"^log.wandb=true needs the wandb package: pip install 'mtrl\[wandb\]'"):
        load_config(None, ["log.wandb=true"])
    load_config(None, ["log.wandb=false"])  # the default needs nothing
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", *_preset(tmp_path), *TOY_OVERRIDES, f"run.dir={run}", "log.wandb=true"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("mtrl: error: log.wandb=true needs the wandb package")
    assert not run.exists()


def _preset(tmp_path: Path) -> list[str]:
    preset = tmp_path / "preset.yaml"
    preset.write_text("seed: 0\n")
    return ["--config", str(preset)]
