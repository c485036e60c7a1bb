"""The run directory's one writer and readers: atomic writes, metrics records, config.yaml and its tag."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mtrl import rundir
from mtrl.config import ConfigError, config_from_dict
from tests.conftest import toy_config


def test_an_atomic_write_replaces_the_file_whole_or_leaves_it_as_it_was(tmp_path):
    path = tmp_path / "new" / "state.json"
    rundir.atomic_write(path, "first")
    rundir.atomic_write(path, b"second")
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["state.json"]

    def dies_mid_write(f):
        f.write(b"half of the th")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="^killed mid-write$"):
        rundir.atomic_write(path, dies_mid_write)
    assert path.read_text() == "second" and [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_temporaries_left_by_a_kill_are_what_remove_temporaries_deletes(tmp_path):
    (tmp_path / ".config.yaml.a1b2.tmp").write_text("half")
    (tmp_path / "config.yaml").write_text("whole")
    (tmp_path / "notes.tmp").write_text("not hidden: not ours")
    assert rundir.remove_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.tmp"]
    assert rundir.remove_temporaries(tmp_path / "absent") == 0


def test_records_are_read_back_without_a_last_line_cut_short(tmp_path):
    path = tmp_path / rundir.METRICS_FILE
    assert rundir.read_records(path) == []
    for step in (10, 20, 30):
        rundir.append_record(path, {"step": step, "kind": "train", "loss": step / 10})
    with path.open("a") as f:
        f.write('{"step": 40, "ki')  # a kill during the write
    assert rundir.read_records(path) == [{"step": s, "kind": "train", "loss": s / 10} for s in (10, 20, 30)]
    assert list(rundir.parse_records([b'{"step": 1}', b"[1, 2]", b'{"st'])) == [{"step": 1}]  # records are objects


def test_dropping_the_records_after_a_step_keeps_the_earlier_lines_as_written(tmp_path):
    path = tmp_path / rundir.METRICS_FILE
    lines = ['{"step": 10, "x": 0.1}', '{"step": 20, "x": 0.30000000000000004}', '{"step": 30}', '{"step": 3']
    path.write_text("\n".join(lines))
    rundir.drop_records_after(path, 20)
    assert path.read_text() == "".join(f"{line}\n" for line in lines[:2])
    rundir.drop_records_after(tmp_path / "absent.jsonl", 0)
    assert not (tmp_path / "absent.jsonl").exists()


@pytest.mark.parametrize("command", ["train", "baseline"])
def test_a_config_reads_back_as_written_and_only_for_its_own_command(command, tmp_path):
    cfg = toy_config(tmp_path, "combiner.name=cagrad", "combiner.c=0.7")
    rundir.write_config(tmp_path, cfg, command)
    saved = yaml.safe_load((tmp_path / rundir.CONFIG_FILE).read_text())
    assert saved.get("method") == rundir.METHOD_TAGS[command]
    assert config_from_dict(rundir.read_config(tmp_path, command)) == cfg
    other = "baseline" if command == "train" else "train"
    with pytest.raises(ConfigError) as err:
        rundir.read_config(tmp_path, other)
    assert str(err.value) == f"{tmp_path / rundir.CONFIG_FILE} is not the config of an `mtrl {other}` run"


def test_an_unreadable_config_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^cannot read the run's config .*config\.yaml: FileNotFoundError$"):
        rundir.read_config(tmp_path)
    (tmp_path / rundir.CONFIG_FILE).write_text("seed: [unclosed")
    with pytest.raises(ConfigError, match=r"^cannot read the run's config .*config\.yaml: \w*Error$"):
        rundir.read_config(tmp_path)
    (tmp_path / rundir.CONFIG_FILE).write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match=r"is not the config of an `mtrl train` run$"):
        rundir.read_config(tmp_path)


def test_a_run_is_held_by_a_periodic_checkpoint_or_a_baseline_commit(tmp_path):
    checkpoints = tmp_path / "a" / rundir.CHECKPOINT_DIR
    checkpoints.mkdir(parents=True)
    for name in (rundir.BEST_CHECKPOINT, ".step_0000000010.pt.x.tmp", "step_10.pt"):
        (checkpoints / name).write_bytes(b"")
    assert not rundir.holds_run(tmp_path / "a") and not rundir.holds_run(tmp_path / "absent")
    (checkpoints / rundir.step_checkpoint_name(10)).write_bytes(b"")
    assert rundir.holds_run(tmp_path / "a")
    for parts in ((rundir.BASELINE_DIR,), (rundir.BASELINE_DIR, rundir.PENDING_DIR)):
        run = tmp_path / "-".join(parts)
        (run / Path(*parts)).mkdir(parents=True)
        assert not rundir.holds_run(run)
        (run / Path(*parts) / rundir.BASELINE_STATE).write_text("{}")
        assert rundir.holds_run(run)


def test_new_run_directories_are_named_by_preset_method_and_time_and_never_reuse_a_run(tmp_path):
    assert re.fullmatch(r"runs/quickstart-\d{8}-\d{6}", str(rundir.default_run_dir(Path("configs/quickstart.yaml"))))
    named = rundir.default_run_dir(Path("mt10_mtsac.yaml"), "baseline")
    assert re.fullmatch(r"runs/mt10_mtsac-sac_single_task-\d{8}-\d{6}", str(named))
    assert rundir.new_run_dir(str(tmp_path), None) == tmp_path
    (tmp_path / rundir.CHECKPOINT_DIR).mkdir()
    (tmp_path / rundir.CHECKPOINT_DIR / rundir.step_checkpoint_name(5)).write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        rundir.new_run_dir(str(tmp_path), None)
    expected = f"{tmp_path} already holds a run; continue it with --resume {tmp_path} or pick another run.dir"
    assert str(err.value) == expected


def test_a_run_starts_from_a_preset_or_resumes_a_directory_never_both_or_neither():
    rundir.check_start_or_resume(Path("p.yaml"), None)
    rundir.check_start_or_resume(None, Path("run"))
    with pytest.raises(ConfigError, match=r"^--resume takes the config saved in the run; drop --config"):
        rundir.check_start_or_resume(Path("p.yaml"), Path("run"))
    with pytest.raises(ConfigError, match=r"^give --config PATH \(e\.g\. configs/quickstart\.yaml\) or --resume"):
        rundir.check_start_or_resume(None, None)
