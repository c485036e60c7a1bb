"""Unit tests of mtrl.checkpoint on small tensors (the trainer's tests cover it end to end)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from mtrl import checkpoint as ckpt


def _state(x: float) -> dict:
    return {"weights": torch.full((2, 3), x), "step": int(x)}


def test_save_keeps_the_newest_n_step_files_and_best_and_load_reads_the_latest(tmp_path):
    for step in (10, 20, 30, 40):
        path = ckpt.save(_state(step), tmp_path, step=step, keep_last=2, is_best=step == 20)
        assert path == tmp_path / "checkpoints" / f"step_{step:010d}.pt"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "step_0000000030.pt", "step_0000000040.pt"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_0000000040.pt"
    latest = ckpt.load(tmp_path)
    assert latest["step"] == 40 and latest["format"] == ckpt.FORMAT_VERSION
    assert torch.equal(latest["weights"], torch.full((2, 3), 40.0))
    assert ckpt.load(tmp_path / "checkpoints" / "best.pt")["step"] == 20


def test_step_files_are_listed_oldest_first_and_other_files_are_ignored(tmp_path):
    d = tmp_path / "checkpoints"
    assert ckpt.step_checkpoints(tmp_path) == [] and ckpt.latest_checkpoint(tmp_path) is None
    d.mkdir()
    for name in ("step_0000000200.pt", "step_0000000100.pt", "best.pt", "step_100.pt", ".step_0000000300.pt.x.tmp"):
        (d / name).write_bytes(b"")
    (d / "step_0000000150.pt").write_bytes(b"")
    assert ckpt.step_checkpoints(tmp_path) == [d / f"step_0000000{s}.pt" for s in (100, 150, 200)]
    assert ckpt.latest_checkpoint(tmp_path) == d / "step_0000000200.pt"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "deep" / "er" / "state.pt"
    ckpt.atomic_save({"x": torch.ones(2)}, path)
    with pytest.raises(Exception, match="lambda"):
        ckpt.atomic_save({"x": lambda: 0}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


def test_remove_partial_writes_deletes_only_temporaries_and_counts_them(tmp_path):
    assert ckpt.remove_partial_writes(tmp_path) == 0
    ckpt.save(_state(1), tmp_path, step=1, keep_last=3, is_best=False)
    d = tmp_path / "checkpoints"
    for name in (".step_0000000002.pt.ab.tmp", ".best.pt.cd.tmp"):
        (d / name).write_bytes(b"half")
    assert ckpt.remove_partial_writes(tmp_path) == 2
    assert [p.name for p in d.iterdir()] == ["step_0000000001.pt"]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class _Unsafe:
    pass


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d, "no checkpoint found in {d}"),
        (lambda d: d / "absent.pt", "checkpoint not found: {d}/absent.pt"),
        (lambda d: _write(d / "empty.pt", b""), "{d}/empty.pt is not an mtrl checkpoint (not a file written by torch"),
        (lambda d: _write(d / "notes.txt", b"# notes"), "{d}/notes.txt is not an mtrl checkpoint (not a file written"),
        (lambda d: _save(d / "list.pt", [1, 2]), "{d}/list.pt is not an mtrl checkpoint (format 1)"),
        (lambda d: _save(d / "old.pt", {"format": 0}), "{d}/old.pt is not an mtrl checkpoint (format 1)"),
        (lambda d: _save(d / "code.pt", {"format": 1, "x": _Unsafe()}), "refused to load {d}/code.pt: not a safe"),
    ],
    ids=["empty directory", "missing file", "empty file", "text file", "not a dict", "other format", "pickled object"],
)
def test_unusable_checkpoints_raise_one_clear_error(tmp_path, make, message):
    target = make(tmp_path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(target)
    assert str(err.value).startswith(message.format(d=tmp_path))
    assert "\n" not in str(err.value)


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_truncated_checkpoint_names_the_parser_error(tmp_path):
    path = ckpt.save(_state(3), tmp_path, step=3, keep_last=1, is_best=False)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt or truncated file \(\w+Error\)$"):
        ckpt.load(path)


class _SeesTheDirectory:
    """Pickled mid-write: records what the checkpoint directory holds at that moment, then fails."""

    def __init__(self, directory: Path):
        self.directory, self.seen = directory, None

    def __reduce__(self):
        self.seen = sorted(p.name for p in self.directory.iterdir())
        raise RuntimeError("killed mid-write")


def test_a_write_in_progress_is_a_hidden_temporary_next_to_its_target_that_cleanup_recognises(tmp_path):
    d = tmp_path / "checkpoints"
    probe = _SeesTheDirectory(d)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        ckpt.atomic_save({"x": probe}, d / "step_0000000007.pt")
    [temporary] = probe.seen
    assert temporary.startswith(".step_0000000007.pt.") and temporary.endswith(".tmp")
    assert list(d.iterdir()) == []
    # the same name, left behind by a killed process, is what remove_partial_writes deletes
    (d / temporary).write_bytes(b"half")
    assert ckpt.remove_partial_writes(tmp_path) == 1 and list(d.iterdir()) == []


def test_load_puts_tensors_where_asked(tmp_path):
    ckpt.save(_state(2), tmp_path, step=2, keep_last=1, is_best=False)
    assert ckpt.load(tmp_path, map_location="meta")["weights"].is_meta
    assert ckpt.load(tmp_path)["weights"].device == torch.device("cpu")


def test_an_unsafe_pickle_is_refused_naming_what_it_holds_without_torchs_advice_to_load_it_anyway(tmp_path):
    path = _save(tmp_path / "code.pt", {"format": 1, "x": _Unsafe()})
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(path)
    assert str(err.value) == (
        f"refused to load {path}: not a safe checkpoint (it holds the Python object {_Unsafe.__module__}._Unsafe; "
        "an mtrl checkpoint holds only tensors and plain values)"
    )


def test_a_bare_pickle_is_refused_as_unsafe(tmp_path):
    path = _write(tmp_path / "code.pt", pickle.dumps(_Unsafe(), protocol=5))  # an opcode torch refuses
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(path)
    assert str(err.value) == (
        f"refused to load {path}: not a safe checkpoint (it holds Python objects; an mtrl checkpoint holds only "
        "tensors and plain values)"
    )


def test_an_unsafe_pickle_is_refused_even_where_the_environment_lets_torch_load_any_pickle(tmp_path, monkeypatch):
    # torch honours this variable only where a caller leaves weights_only unset
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = _save(tmp_path / "code.pt", {"format": 1, "x": _Unsafe()})
    with pytest.raises(ckpt.CheckpointError, match="^refused to load .*: not a safe checkpoint"):
        ckpt.load(path)


class _RemovesTheTemporary:
    """Pickled mid-write: another process's cleanup deletes the write in progress, then the write fails."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __reduce__(self):
        for p in self.directory.glob(".*.tmp"):
            p.unlink()
        raise RuntimeError("killed mid-write")


def test_a_failed_write_whose_temporary_is_already_gone_raises_the_write_error(tmp_path):
    d = tmp_path / "checkpoints"
    with pytest.raises(RuntimeError, match="^killed mid-write$"):
        ckpt.atomic_save({"x": _RemovesTheTemporary(d)}, d / "step_0000000001.pt")
    assert list(d.iterdir()) == []


def test_the_step_of_a_periodic_checkpoint_is_read_from_its_name_alone(tmp_path):
    assert ckpt.checkpoint_step(tmp_path / "checkpoints" / "step_0000012345.pt") == 12345  # no such file
    assert ckpt.checkpoint_step("step_0000000000.pt") == 0
    for name in ("best.pt", "step_12345.pt"):
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.checkpoint_step(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name} is not a periodic checkpoint (step_<step>.pt)"
