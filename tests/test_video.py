"""Evaluation videos on the toy benchmark (numpy frames, no OpenGL): files, sizes, frame counts,
agreement with the evaluation, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import numpy as np
import pytest

from mtrl.cli import main
from mtrl.config import ConfigError, EnvConfig
from mtrl.envs import make_backend
from mtrl.evaluation import evaluate
from mtrl.trainer import Trainer
from mtrl.video import RenderError, camera_names, default_camera, record_videos
from tests.conftest import TOY_OVERRIDES, toy_config

TOY = EnvConfig(benchmark="toy", toy_tasks=3, max_episode_steps=20, num_goals=5)


class ScriptedToyAgent:
    """Heads for the goal (success within a few steps), except on task 1, where it flees (never succeeds)."""

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        pos, goal, task = observations[:, :2], observations[:, 2:4], observations[:, 4:].argmax(1)
        sign = np.where(task == 1, -1.0, 1.0)[:, None]
        return np.clip(sign * (goal - pos) / 0.1, -1, 1)

    def reset(self, env_mask: np.ndarray) -> None:
        return None


def _frames(path: Path) -> np.ndarray:
    return np.stack(imageio.mimread(path, memtest=False))


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else 1


def test_one_video_per_task_with_the_evaluation_episodes(tmp_path):
    episodes, seed = 3, 5
    backend = make_backend(TOY, seed, evaluation=True, vector_strategy="sync", render={"width": 40, "height": 24})
    videos = record_videos(ScriptedToyAgent(), backend, tmp_path / "videos", episodes)
    backend.close()
    reference_backend = make_backend(TOY, seed, evaluation=True)
    reference = evaluate(ScriptedToyAgent(), reference_backend, episodes)
    reference_backend.close()

    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["toy-0.mp4", "toy-1.mp4", "toy-2.mp4"]
    for task, video in videos.items():
        assert video.path == tmp_path / "videos" / f"{task}.mp4"
        # same episodes as the evaluation: same goals, same successes, same returns
        assert np.mean(video.successes) == reference.per_task[task]["success"]
        assert np.mean(video.returns) == pytest.approx(reference.per_task[task]["return"], rel=1e-6)
        # terminate_on_success: a successful episode stops early, a failed one runs to the time limit
        for length, success in zip(video.lengths, video.successes, strict=True):
            assert (length < TOY.max_episode_steps) if success else (length == TOY.max_episode_steps)
        frames = _frames(video.path)
        assert frames.shape == (sum(video.lengths) + episodes, 24, 40, 3)  # reset frame + one per step
        assert video.frames == len(frames)
        assert np.abs(np.diff(frames.astype(int), axis=0)).max() > 100  # the point moves
    assert videos["toy-1"].successes == [False] * episodes
    assert all(videos["toy-0"].successes) and all(videos["toy-2"].successes)
    assert videos["toy-0"].frames < episodes * (TOY.max_episode_steps + 1)


def test_toy_frames_draw_the_point_and_the_goal():
    backend = make_backend(TOY, 0, evaluation=True, vector_strategy="sync", render={"width": 64, "height": 64})
    backend.reset()
    env = backend.vector_env.envs[0].unwrapped
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    red = np.argwhere((frame == (210, 30, 40)).all(-1))
    green = np.argwhere((frame == (40, 160, 60)).all(-1))
    to_pixel = (np.array([1 - env.pos[1], env.pos[0] + 1])) * 32  # (row, column) of the point's position
    np.testing.assert_allclose(red.mean(0) + 0.5, to_pixel, atol=1.0)
    goal_pixel = (np.array([1 - env.goal[1], env.goal[0] + 1])) * 32
    np.testing.assert_allclose(green.mean(0) + 0.5, goal_pixel, atol=1.0)
    backend.close()


def test_a_failure_leaves_the_output_directory_untouched(tmp_path):
    backend = make_backend(TOY, 0, evaluation=True, vector_strategy="sync")  # built without `render`
    with pytest.raises(RenderError, match="toy-0 rendered no frame"):
        record_videos(ScriptedToyAgent(), backend, tmp_path / "videos", 1)
    backend.close()
    assert not (tmp_path / "videos").exists()


class RenderCounter(gym.Wrapper):
    """Counts the frames a sub-env renders."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.renders = 0

    def render(self):
        self.renders += 1
        return self.env.render()


def _counted_backend(seed: int):
    backend = make_backend(TOY, seed, evaluation=True, vector_strategy="sync", render={"width": 40, "height": 24})
    envs = backend.vector_env.envs
    envs[:] = [RenderCounter(env) for env in envs]
    return backend, envs


def test_a_lower_frame_rate_keeps_every_kth_frame_and_renders_only_those(tmp_path, capsys):
    episodes, seed = 2, 5
    backend, counted = _counted_backend(seed)
    every = record_videos(ScriptedToyAgent(), backend, tmp_path / "every", episodes)  # the toy env's 20 per second
    backend.close()
    backend, counted = _counted_backend(seed)
    capsys.readouterr()
    half = record_videos(ScriptedToyAgent(), backend, tmp_path / "half", episodes, fps=10, progress=True)
    bars = capsys.readouterr().err
    backend.close()
    for (task, full), env in zip(every.items(), counted, strict=True):
        kept = half[task]
        assert (kept.lengths, kept.successes) == (full.lengths, full.successes)  # the same episodes
        # per episode: the frame after the reset, every 2nd step's, and the last step's
        indices, start = [], 0
        for length in full.lengths:
            indices += [start + t for t in range(length + 1) if t % 2 == 0 or t == length]
            start += length + 1
        frames = _frames(kept.path)
        assert kept.frames == len(frames) == len(indices) == env.renders
        assert kept.frames < full.frames
        reference = _frames(full.path)[indices].astype(int)
        assert np.abs(frames.astype(int) - reference).mean() < 2  # the same pictures, up to H.264's losses
        assert kept.fps == 10 and imageio.get_reader(kept.path).get_meta_data()["fps"] == 10
        assert task in bars
    assert "frame/s" in bars


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("video") / "run"
    assert Trainer(toy_config(run, "train.total_steps=100", "eval.every=100"), run).train() == 0
    return run


def test_cli_writes_the_videos_of_the_evaluation(toy_run, tmp_path, capsys):
    out = tmp_path / "new" / "videos"
    argv = ["eval", str(toy_run), "--video", str(out), "--video-episodes", "2", "--width", "40", "--height", "24"]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    recorded = json.loads(capsys.readouterr().out)
    assert main(["eval", str(toy_run), "--episodes", "2", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert recorded["mean_success"] == evaluated["mean_success"]
    assert recorded["mean_return"] == pytest.approx(evaluated["mean_return"], rel=1e-6)
    assert list(recorded["per_task"]) == ["toy-0", "toy-1", "toy-2"]
    for task, r in recorded["per_task"].items():
        assert r["return"] == pytest.approx(evaluated["per_task"][task]["return"], rel=1e-6)
        assert r["video"] == str(out / f"{task}.mp4")
        frames = _frames(Path(r["video"]))
        assert frames.shape[1:] == (24, 40, 3)
        assert len(frames) == r["frames"]
        # this barely trained policy never succeeds: both episodes run to the 20-step time limit
        assert r["success"] == 0.0
        assert r["frames"] == 2 * (20 + 1)
    assert main(argv) == 0  # the table form; the files are rewritten in place
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["toy-0", "toy-1", "toy-2", "mean"]
    assert lines[0].endswith(f"{out / 'toy-0.mp4'} ({recorded['per_task']['toy-0']['frames']} frames)")


BAD = {
    "video path is a file": (["--video", "afile"], "--video afile: exists and is not a directory"),
    "zero width": (
        ["--video", "v", "--width", "0"],
        "--width must be a positive even number of pixels (H.264 video), found 0",
    ),
    "negative width": (
        ["--video", "v", "--width", "-4"],
        "--width must be a positive even number of pixels (H.264 video), found -4",
    ),
    "odd height": (
        ["--video", "v", "--height", "25"],
        "--height must be a positive even number of pixels (H.264 video), found 25",
    ),
    "zero episodes": (["--video", "v", "--video-episodes", "0"], "--video-episodes must be >= 1, found 0"),
    "unknown camera": (
        ["--video", "v", "--camera", "corner"],
        "unknown camera 'corner'; this benchmark's cameras: topview",
    ),
    "zero fps": (["--video", "v", "--fps", "0"], "--fps must be > 0, found 0"),
    "fps above the env's": (
        ["--video", "v", "--fps", "40"],
        "--fps must be in (0, 20], the env's own frame rate; found 40",
    ),
    "--episodes with --video": (
        ["--video", "v", "--episodes", "3"],
        "--episodes sets the evaluation's episodes; with --video, use --video-episodes",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_video_options_give_one_line_and_write_nothing(case, toy_run, tmp_path, monkeypatch, capsys):
    flags, message = BAD[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep")
    capsys.readouterr()
    assert _main(["eval", str(toy_run), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"mtrl: error: {message}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "keep"


# --- real Meta-World rendering (needs an OpenGL backend; skipped where none works) ---

GL_PROBE = """
import mujoco
model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='0.1'/></worldbody></mujoco>")
data = mujoco.MjData(model)
mujoco.mj_forward(model, data)
renderer = mujoco.Renderer(model, 8, 8)
renderer.update_scene(data)
assert renderer.render().shape == (8, 8, 3)
"""


def _working_gl_backend() -> tuple[str | None, str]:
    """The first of $MUJOCO_GL (when set), or else egl and osmesa, that renders in a fresh process."""
    candidates = [os.environ["MUJOCO_GL"]] if "MUJOCO_GL" in os.environ else ["egl", "osmesa"]
    failures = []
    for backend in candidates:
        env = {k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"}
        proc = subprocess.run(
            [sys.executable, "-c", GL_PROBE], env={**env, "MUJOCO_GL": backend}, capture_output=True, text=True
        )
        if proc.returncode == 0:
            return backend, ""
        failures.append(f"MUJOCO_GL={backend}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return None, "; ".join(failures)


class MetaWorldExpert:
    """Meta-World's scripted policy for each task, in sub-env order."""

    def __init__(self, tasks: list[str]):
        from metaworld.policies import ENV_POLICY_MAP

        self.experts = [ENV_POLICY_MAP[t]() for t in tasks]

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        return np.stack([e.get_action(o[:39]) for e, o in zip(self.experts, observations, strict=True)])

    def reset(self, env_mask: np.ndarray) -> None:
        return None


@pytest.mark.metaworld
def test_metaworld_video_of_reach(tmp_path, monkeypatch):
    backend, why = _working_gl_backend()
    if backend is None:
        pytest.skip(f"no OpenGL backend renders here ({why})")
    bound = os.environ.get("PYOPENGL_PLATFORM")
    if "OpenGL" in sys.modules and bound not in (None, backend):
        pytest.skip(f"PyOpenGL is already bound to {bound} in this process; {backend} is the one that works")
    monkeypatch.setenv("MUJOCO_GL", backend)
    # ten-step episodes keep the software renderers of CI machines quick
    cfg = EnvConfig(benchmark="MT1", tasks=["reach-v3"], max_episode_steps=10)
    render = {"camera_name": default_camera("MT1"), "width": 32, "height": 32}
    backend = make_backend(cfg, 3, evaluation=True, vector_strategy="sync", render=render)
    assert {"corner", "corner2", "topview"} <= set(camera_names(backend.vector_env.envs[0]))
    try:
        videos = record_videos(MetaWorldExpert(cfg.tasks), backend, tmp_path / "videos", 1)
    except RenderError as err:
        pytest.skip(str(err))
    finally:
        backend.close()
    reference_backend = make_backend(cfg, 3, evaluation=True)
    reference = evaluate(MetaWorldExpert(cfg.tasks), reference_backend, 1)
    reference_backend.close()

    video = videos["reach-v3"]
    assert video.lengths == [10]
    assert float(video.successes[0]) == reference.per_task["reach-v3"]["success"]
    assert video.returns[0] == pytest.approx(reference.per_task["reach-v3"]["return"], rel=1e-6)
    frames = _frames(tmp_path / "videos" / "reach-v3.mp4")
    assert frames.shape == (10 + 1, 32, 32, 3)
    assert frames.std() > 10  # a picture, not a blank frame
    assert np.abs(np.diff(frames.astype(int), axis=0)).max() > 30  # the arm moves


# --- videos during training (eval.video_every) ---


def test_training_films_every_nth_evaluation_and_the_last(tmp_path, capsys):
    run = tmp_path / "run"
    videos = ["eval.every=20", "eval.video_every=2", "eval.video_width=40", "eval.video_height=24"]
    assert Trainer(toy_config(run, "train.total_steps=60", *videos), run).train() == 0
    # evaluations at steps 20, 40 and 60: the 2nd (step 40) and the last (step 60) are filmed
    steps = sorted(p.name for p in (run / "videos").iterdir())
    assert steps == ["step_0000000040", "step_0000000060"]
    assert "step 60: videos of the evaluation episodes in" in capsys.readouterr().out
    # the last ones are `mtrl eval --video` of the final policy: the same evaluation episodes
    out = tmp_path / "eval-videos"
    argv = ["eval", str(run), "--video", str(out), "--width", "40", "--height", "24", "--json"]
    assert main(argv) == 0
    recorded = json.loads(capsys.readouterr().out)
    for task in ("toy-0", "toy-1", "toy-2"):
        during = _frames(run / "videos" / "step_0000000060" / f"{task}.mp4")
        after = _frames(out / f"{task}.mp4")
        assert len(during) == recorded["per_task"][task]["frames"]
        assert np.abs(during.astype(int) - after.astype(int)).mean() < 1


BAD_TRAINING_VIDEOS = {
    "eval.video_every=-1": "eval.video_every must be >= 0, found -1",
    "eval.video_episodes=0": "eval.video_episodes must be >= 1, found 0",
    "eval.video_fps=0": "eval.video_fps must be > 0, found 0.0",
    "eval.video_width=25": "eval.video_width must be a positive even number (H.264), found 25",
}


@pytest.mark.parametrize("override", BAD_TRAINING_VIDEOS)
def test_bad_training_video_settings_are_refused_at_config_time(override, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(BAD_TRAINING_VIDEOS[override])):
        toy_config(tmp_path / "run", "eval.video_every=1", override)


def test_an_unknown_camera_or_too_high_a_frame_rate_stops_the_run_before_it_starts(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    preset = tmp_path / "preset.yaml"
    preset.write_text("seed: 0\n")
    argv = ["train", "--config", str(preset), *TOY_OVERRIDES, f"run.dir={run}", "eval.video_every=1"]
    capsys.readouterr()
    assert _main([*argv, "eval.video_camera=corner"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mtrl: error: eval.video_camera: unknown camera 'corner'; this benchmark's cameras: topview"
    ]
    assert _main([*argv, "eval.video_fps=40"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mtrl: error: eval.video_fps must be in (0, 20], the env's own frame rate; found 40"
    ]
    assert not run.exists()
