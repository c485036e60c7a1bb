"""Bad input at the command line: one clear line naming the problem, a non-zero exit, nothing written.

Every case runs `mtrl.cli.main` in a fresh directory holding a valid preset (`good.yaml`) and a
finished toy run (`run/`); the directory tree, contents and modification times included, must be
the same afterwards. A few cases also go through a real `python -m mtrl` process, where warnings
and log records reach the actual stderr.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mtrl import checkpoint as ckpt
from mtrl.cli import main
from mtrl.trainer import Trainer
from tests.conftest import TOY_OVERRIDES, nested_config, toy_config

REPO = Path(__file__).resolve().parents[1]
RUN = "run"
LATEST = f"{RUN}/checkpoints/step_0000000080.pt"


class Exploit:
    """A pickle that creates `pwned` when unpickled by anything that runs code."""

    def __reduce__(self):
        return (Path.touch, (Path("pwned").absolute(),))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / RUN
    cfg = toy_config(run, "train.total_steps=80", "checkpoint.every=40", "eval.every=40", "checkpoint.save_buffer=true")
    assert Trainer(cfg, run).train() == 0
    assert ckpt.latest_checkpoint(run).name == Path(LATEST).name
    return run


# ----- set-ups: each mutates the case directory before the snapshot -----------------------------
def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (d / name).write_bytes(content)
        else:
            (d / name).write_text(content)

    return setup


def truncate(name: str, keep: float) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])

    return setup


def torch_file(name: str, obj_factory: Callable[[Path], object]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        torch.save(obj_factory(d), d / name)

    return setup


def edit_checkpoint_config(name: str, key: str, value) -> Callable[[Path], None]:
    """Rewrite one config entry inside a (safe) checkpoint, leaving its weights alone."""

    def setup(d: Path) -> None:
        state = torch.load(d / name, weights_only=True)
        section, leaf = key.split(".")
        state["config"][section][leaf] = value
        torch.save(state, d / name)

    return setup


def rename_checkpoint_tasks(name: str) -> Callable[[Path], None]:
    """The same number of tasks with the same dimensions, under other names."""

    def setup(d: Path) -> None:
        state = torch.load(d / name, weights_only=True)
        state["task_names"] = [f"other-{i}" for i in range(len(state["task_names"]))]
        torch.save(state, d / name)

    return setup


def remove_checkpoints(d: Path) -> None:
    for p in (d / RUN / "checkpoints").iterdir():
        p.unlink()
    (d / RUN / "checkpoints" / ".step_0000000040.pt.abc.tmp").write_bytes(b"half a checkpoint")


def partial_write_left_over(d: Path) -> None:
    (d / RUN / "checkpoints" / ".step_0000000120.pt.xyz.tmp").write_bytes(b"half a checkpoint")


def empty_dir(d: Path) -> None:
    (d / "empty").mkdir()


def nested_dir(d: Path) -> None:
    (d / "confdir").mkdir()


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    message: str  # must appear in the one line written to stderr
    setup: tuple[Callable[[Path], None], ...] = ()
    needs_no_cuda: bool = False


GOOD = ("train", "--config", "good.yaml", "run.dir=new_run")

CASES = [
    # --- the config file itself ---
    Case("missing config file", ("train", "--config", "absent.yaml"), "config file not found: absent.yaml"),
    Case("config is a directory", ("train", "--config", "confdir"), "confdir is a directory", (nested_dir,)),
    Case(
        "malformed YAML",
        ("train", "--config", "bad.yaml"),
        "malformed YAML in bad.yaml (line 2): mapping values are not allowed here",
        (write("bad.yaml", "seed: 0\ndevice: cpu: x\n"),),
    ),
    Case(
        "tab-indented YAML",
        ("train", "--config", "bad.yaml"),
        "malformed YAML in bad.yaml",
        (write("bad.yaml", "train:\n\ttotal_steps: 5\n"),),
    ),
    Case(
        "YAML list instead of mapping",
        ("train", "--config", "bad.yaml"),
        "expected a mapping of config keys, found list",
        (write("bad.yaml", "- seed\n- device\n"),),
    ),
    Case(
        "YAML scalar instead of mapping",
        ("train", "--config", "bad.yaml"),
        "expected a mapping of config keys, found str",
        (write("bad.yaml", "just some words\n"),),
    ),
    Case(
        "binary file as config",
        ("train", "--config", "bad.yaml"),
        "cannot read bad.yaml: not UTF-8 text",
        (write("bad.yaml", b"\xff\xfe\x00\x81binary"),),
    ),
    Case(
        "unknown top-level key in YAML",
        ("train", "--config", "bad.yaml"),
        "sed",
        (write("bad.yaml", "sed: 1\n"),),
    ),
    Case(
        "unknown nested key in YAML",
        ("train", "--config", "bad.yaml"),
        "bach_per_task",
        (write("bad.yaml", "train:\n  bach_per_task: 3\n"),),
    ),
    Case(
        "ill-typed value in YAML",
        ("train", "--config", "bad.yaml"),
        "train.total_steps",
        (write("bad.yaml", "train:\n  total_steps: lots\n"),),
    ),
    Case(
        "section given as a scalar",
        ("train", "--config", "bad.yaml"),
        "train must be a mapping of train.* keys, found 5",
        (write("bad.yaml", "train: 5\n"),),
    ),
    Case(
        "date for an integer",
        ("train", "--config", "bad.yaml"),
        "seed",
        (write("bad.yaml", "seed: 2024-01-01\n"),),
    ),
    Case(
        "null for a required integer",
        ("train", "--config", "bad.yaml"),
        "train.total_steps",
        (write("bad.yaml", "train:\n  total_steps: null\n"),),
    ),
    # --- presets built on others (`defaults:`) ---
    Case(
        "base preset missing",
        ("train", "--config", "bad.yaml"),
        "bad.yaml: defaults: base preset not found: base/absent.yaml",
        (write("bad.yaml", "defaults: [base/absent.yaml]\n"),),
    ),
    Case(
        "base presets in a cycle",
        ("train", "--config", "a.yaml"),
        "b.yaml: defaults: cycle a.yaml -> b.yaml -> a.yaml",
        (write("a.yaml", "defaults: [b.yaml]\n"), write("b.yaml", "defaults: [a.yaml]\nseed: 1\n")),
    ),
    Case(
        "defaults not a list",
        ("train", "--config", "bad.yaml"),
        "bad.yaml: defaults must be a list of preset files (relative to the preset's directory), found 'good.yaml'",
        (write("bad.yaml", "defaults: good.yaml\n"),),
    ),
    Case(
        "bad key in a base preset",
        ("train", "--config", "bad.yaml"),
        "bach_per_task",
        (write("bad.yaml", "defaults: [base.yaml]\n"), write("base.yaml", "train:\n  bach_per_task: 3\n")),
    ),
    # --- dotted overrides ---
    Case("unknown override key", (*GOOD, "train.total_stepz=5"), "total_stepz"),
    Case("unknown override section", (*GOOD, "nosuch.key=1"), "nosuch"),
    Case("override without '='", (*GOOD, "train.total_steps"), "'train.total_steps' is not of the form key=value"),
    Case("override with empty key", (*GOOD, "=5"), "'=5' is not of the form key=value"),
    Case("word for an integer", (*GOOD, "train.total_steps=many"), "train.total_steps"),
    Case("float for an integer", (*GOOD, "seed=1.5"), "seed"),
    Case("list for an integer", (*GOOD, "train.total_steps=[1,2]"), "train.total_steps"),
    Case("word for a boolean", (*GOOD, "log.tensorboard=maybe"), "log.tensorboard"),
    # --- impossible values ---
    Case("negative total steps", (*GOOD, "train.total_steps=-5"), "train.total_steps must be > 0, found -5"),
    Case("zero total steps", (*GOOD, "train.total_steps=0"), "train.total_steps must be > 0, found 0"),
    Case("negative warm-up", (*GOOD, "train.warmup_steps=-1"), "train.warmup_steps must be >= 0, found -1"),
    Case("negative seed", (*GOOD, "seed=-3"), "seed must be >= 0, found -3"),
    Case("cagrad c below 0", (*GOOD, "combiner.name=cagrad", "combiner.c=-0.5"), "`c` must be >= 0, found -0.5"),
    Case(
        "another combiner's hyper-parameter",
        (*GOOD, "combiner.name=cagrad", "combiner.lam=0.3"),
        "combiner: unknown hyper-parameter 'lam' for combiner 'cagrad'; accepted: c, rescale, solver",
    ),
    Case(
        "ill-typed hyper-parameter",
        (*GOOD, "combiner.name=sdmgrad_os", "combiner.n=four"),
        "combiner.n",
    ),
    Case(
        "--print-config with an impossible value",
        ("train", "--config", "good.yaml", "--print-config", "train.total_steps=0"),
        "train.total_steps must be > 0, found 0",
    ),
    Case(
        "conicgrad c above 1",
        (*GOOD, "combiner.name=conicgrad", "combiner.c=1.5"),
        "`c` must be in (0, 1], found 1.5",
    ),
    Case("gamma above 1", (*GOOD, "agent.gamma=1.5"), "agent.gamma must be in [0, 1], found 1.5"),
    Case("tau zero", (*GOOD, "agent.tau=0"), "agent.tau must be in (0, 1], found 0"),
    Case("negative learning rate", (*GOOD, "agent.actor_lr=-0.001"), "agent.actor_lr must be > 0, found -0.001"),
    Case("zero-width layer", (*GOOD, "agent.hidden_sizes=[32,0]"), "agent.hidden_sizes must be a non-empty list"),
    Case("goals out of range", (*GOOD, "env.num_goals=51"), "env.num_goals must be in [1, 50], found 51"),
    Case("keep no checkpoint", (*GOOD, "checkpoint.keep_last=0"), "checkpoint.keep_last must be >= 1, found 0"),
    Case("log every 0 steps", (*GOOD, "log.every=0"), "log.every must be >= 1, found 0"),
    Case("negative gradient clip", (*GOOD, "train.grad_clip_norm=-1"), "train.grad_clip_norm must be > 0 or null"),
    Case("zero Q-target clip", (*GOOD, "train.q_target_clip=0"), "train.q_target_clip must be > 0 or null"),
    Case("no bad update allowed", (*GOOD, "train.max_bad_updates=0"), "train.max_bad_updates must be >= 1, found 0"),
    # --- unknown names ---
    Case("unknown benchmark", (*GOOD, "env.benchmark=MT7"), "env.benchmark must be one of"),
    Case(
        "unknown task",
        (*GOOD, "env.benchmark=MT1", "env.tasks=[reach-v9]"),
        "unknown Meta-World task 'reach-v9'",
    ),
    Case("custom without tasks", (*GOOD, "env.benchmark=custom"), "env.tasks must name at least one task"),
    Case("unknown combiner", (*GOOD, "combiner.name=fancy"), "unknown combiner 'fancy'"),
    Case("unknown device", (*GOOD, "device=tpu"), "device must be auto, cpu, cuda or cuda:N; found 'tpu'"),
    Case("CUDA without a GPU", (*GOOD, "device=cuda"), "CUDA is not available", needs_no_cuda=True),
    Case(
        "adatask with another combiner",
        (*GOOD, "optimizer.name=adatask", "combiner.name=pcgrad"),
        "combiner.name must be mean",
    ),
    # --- command line ---
    Case("neither --config nor --resume", ("train",), "give --config PATH"),
    Case("unknown flag", ("train", "--config", "good.yaml", "--bogus"), "unrecognized arguments: --bogus"),
    Case("unknown command", ("fly",), "invalid choice: 'fly'"),
    Case("run.dir already holds a run", ("train", "--config", "good.yaml", f"run.dir={RUN}"), "already holds a run"),
    # --- resume ---
    Case("resume a missing directory", ("train", "--resume", "nowhere"), "no checkpoint to resume from in nowhere"),
    Case(
        "resume a run without a complete checkpoint",
        ("train", "--resume", RUN),
        f"no checkpoint to resume from in {RUN}",
        (remove_checkpoints,),
    ),
    Case("resume with --config", ("train", "--resume", RUN, "--config", "good.yaml"), "drop --config"),
    Case("resume a truncated checkpoint", ("train", "--resume", RUN), "corrupt or truncated", (truncate(LATEST, 0.6),)),
    Case("resume an empty checkpoint", ("train", "--resume", RUN), "is not an mtrl checkpoint", (write(LATEST, b""),)),
    Case(
        "resume a tampered checkpoint",
        ("train", "--resume", RUN),
        "not a safe checkpoint",
        (torch_file(LATEST, lambda d: {"format": ckpt.FORMAT_VERSION, "payload": Exploit()}),),
    ),
    Case(
        "resume a foreign torch file",
        ("train", "--resume", RUN),
        "is not an mtrl checkpoint",
        (torch_file(LATEST, lambda d: {"weights": torch.zeros(3)}),),
    ),
    Case(
        "resume with other tasks",
        ("train", "--resume", RUN, "env.toy_tasks=5"),
        "was saved for other tasks or dimensions",
    ),
    Case(
        "resume a checkpoint of other tasks with the same dimensions",
        ("train", "--resume", RUN),
        "was saved for other tasks or dimensions",
        (rename_checkpoint_tasks(LATEST),),
    ),
    Case(
        "resume with other network sizes",
        ("train", "--resume", RUN, "agent.hidden_sizes=[8]"),
        "was saved with another agent or combiner config",
        (partial_write_left_over,),
    ),
    Case(
        "resume with another combiner",
        ("train", "--resume", RUN, "combiner.name=pcgrad"),
        "was saved with another agent or combiner config",
    ),
    Case(
        "resume with another buffer capacity",
        ("train", "--resume", RUN, "train.buffer_capacity=600"),
        "buffer capacity mismatch",
    ),
    Case(
        "resume with fewer total steps than done",
        ("train", "--resume", RUN, "train.total_steps=60"),
        "train.total_steps must be >= the step of the checkpoint (80), found 60",
    ),
    Case(
        "resume with an impossible override",
        ("train", "--resume", RUN, "train.total_steps=-1"),
        "train.total_steps must be > 0, found -1",
        (partial_write_left_over,),
    ),
    Case(
        "checkpoint whose weights contradict its config",
        ("train", "--resume", RUN),
        "does not match this config",
        (edit_checkpoint_config(LATEST, "agent.hidden_sizes", [16, 16]),),
    ),
    # --- eval ---
    Case("eval a missing checkpoint", ("eval", "absent.pt"), "checkpoint not found: absent.pt"),
    Case("eval an empty directory", ("eval", "empty"), "no checkpoint found in empty", (empty_dir,)),
    Case("eval a truncated checkpoint", ("eval", LATEST), "corrupt or truncated", (truncate(LATEST, 0.3),)),
    Case(
        "eval a YAML file",
        ("eval", "good.yaml"),
        "good.yaml is not an mtrl checkpoint (not a file written by torch.save)",
    ),
    Case(
        "eval a text file",
        ("eval", "README.md"),
        "README.md is not an mtrl checkpoint (not a file written by torch.save)",
        (write("README.md", "# mtrl\n\nMulti-task SAC.\n"),),
    ),
    Case(
        "eval a baseline run",
        ("eval", "base"),
        "base is a run of `mtrl baseline`, which has no mtrl checkpoint: it is evaluated as it trains",
        (write("base/baseline/state.json", '{"method": "sac_single_task", "step": 20, "total_steps": 20}'),),
    ),
    Case(
        "eval with an unknown camera",
        ("eval", RUN, "--video", "videos", "--camera", "nosuch"),
        "unknown camera 'nosuch'; this benchmark's cameras: topview",
    ),
    Case(
        "eval a tampered pickle",
        ("eval", "evil.pt"),
        "not a safe checkpoint (it holds the Python object getattr; an mtrl checkpoint holds only tensors",
        (torch_file("evil.pt", lambda d: {"format": ckpt.FORMAT_VERSION, "payload": Exploit()}),),
    ),
    Case(
        "eval a raw pickle that runs code",
        ("eval", "evil.pt"),
        "not a safe checkpoint",
        (lambda d: (d / "evil.pt").write_bytes(pickle.dumps(Exploit(), protocol=5)),),
    ),
    Case("eval zero episodes", ("eval", RUN, "--episodes", "0"), "--episodes must be >= 1, found 0"),
    Case("eval on an unknown device", ("eval", RUN, "--device", "tpu"), "unknown device 'tpu'"),
    Case("eval on CUDA without a GPU", ("eval", RUN, "--device", "cuda"), "CUDA is not available", needs_no_cuda=True),
    Case(
        "eval weights that contradict their config",
        ("eval", LATEST),
        "actor weights do not match",
        (edit_checkpoint_config(LATEST, "agent.hidden_sizes", [16, 16]),),
    ),
]


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, size, modification time and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = ("dir", p.stat().st_mtime_ns)
        for name in filenames:
            p = Path(dirpath, name)
            st = p.stat()
            out[str(p.relative_to(root))] = (
                "file",
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha1(p.read_bytes()).hexdigest(),
            )
    return out


def _prepare(d: Path, finished_run: Path, case: Case) -> None:
    (d / "good.yaml").write_text(yaml.safe_dump(nested_config(TOY_OVERRIDES)))
    shutil.copytree(finished_run, d / RUN)
    for setup in case.setup:
        setup(d)


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else 1


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_an_error_code_and_writes_nothing(case, tmp_path, finished_run, monkeypatch, capsys):
    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    _prepare(tmp_path, finished_run, case)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = _main(list(case.argv))
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mtrl"), lines[0]
    assert case.message in lines[0]
    assert "weights_only" not in lines[0]  # torch's advice to load the file anyway (and run its code)
    assert captured.out == ""
    assert [str(w.message) for w in caught] == []  # a warning would be a second line on a terminal
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


SUBPROCESS_CASES = ["malformed YAML", "resume a truncated checkpoint", "eval a raw pickle that runs code"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(case_id, tmp_path, finished_run):
    case = next(c for c in CASES if c.id == case_id)
    _prepare(tmp_path, finished_run, case)
    before = _snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "mtrl", *case.argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert case.message in proc.stderr and proc.stderr.startswith("mtrl: error: ")
    assert proc.stdout == ""
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


def test_print_config_on_resume_shows_the_saved_config_with_the_overrides_and_writes_nothing(
    tmp_path, finished_run, monkeypatch, capsys
):
    _prepare(tmp_path, finished_run, Case("print", (), ""))
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert _main(["train", "--resume", RUN, "--print-config", "train.total_steps=120"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    saved = ckpt.load(LATEST)["config"]
    assert printed == {**saved, "train": {**saved["train"], "total_steps": 120}, "run": {"dir": RUN}}
    assert _snapshot(tmp_path) == before


def test_an_unknown_camera_is_refused_before_any_env_is_built(tmp_path, finished_run, monkeypatch, capsys):
    import mtrl.envs

    def build_nothing(*args, **kwargs):
        raise AssertionError("the envs were built before the camera was checked")

    monkeypatch.setattr(mtrl.envs, "make_backend", build_nothing)
    code = _main(["eval", str(finished_run), "--video", str(tmp_path / "videos"), "--camera", "nosuch"])
    assert code == 2
    assert "unknown camera 'nosuch'; this benchmark's cameras: topview" in capsys.readouterr().err
    assert not (tmp_path / "videos").exists()


@pytest.mark.metaworld
def test_the_cameras_known_before_building_are_the_meta_world_models():
    from mtrl.config import EnvConfig
    from mtrl.envs import make_backend, metaworld
    from mtrl.video import camera_names

    backend = make_backend(EnvConfig(benchmark="MT1", tasks=["reach-v3"]), 0, evaluation=True, vector_strategy="sync")
    try:
        assert sorted(camera_names(backend.vector_env.envs[0])) == sorted(metaworld.CAMERAS)
    finally:
        backend.close()
