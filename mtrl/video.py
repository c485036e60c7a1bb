"""Evaluation videos: `mtrl eval CHECKPOINT --video DIR` writes `DIR/<task>.mp4`, one file per task.

The episodes are the evaluation's own: the same evaluation envs (seed, `terminate_on_success`,
pseudorandom goal sweep) and the policy's mean action, so episode k of a task's video is episode k
of that task in `mtrl eval`, with the same success and return. Each sub-env is stepped on its own,
so that every episode's last frame (the one where it succeeded) is kept: a vector env would reset a
finished sub-env in the same step. A video shows, per episode, the frame after the reset and one
frame per step; an episode ends at its time limit, or at its first success.

Meta-World renders offscreen through MuJoCo and needs an OpenGL backend: `MUJOCO_GL=egl` (GPU
driver, also the default here on a machine without a display) or `MUJOCO_GL=osmesa` (software).
The toy benchmark draws its frames with numpy and needs none. Each env backend declares its
default camera and whether it renders through MuJoCo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from mtrl.config import Config, ConfigError
from mtrl.evaluation import Agent
from mtrl.logger import log

if TYPE_CHECKING:
    from mtrl.envs import EnvBackend


class RenderError(ConfigError):
    """No frame could be rendered (usually: no working OpenGL backend)."""


@dataclass
class TaskVideo:
    path: Path
    frames: int
    lengths: list[int]  # steps per episode
    returns: list[float]
    successes: list[bool]
    fps: float = 0.0  # frames per second of the file: real time
    seconds: float = 0.0  # wall-clock time it took to record


def frame_stride(native_fps: float, fps: float | None, key: str = "--fps") -> int:
    """Every how many steps a frame is kept so that a video of `fps` frames per second still plays in real
    time (the env steps at `native_fps`: Meta-World at 80, the toy benchmark at 20); None keeps every frame.
    `key` names the setting in the error."""
    if fps is None:
        return 1
    if not 0 < fps <= native_fps:
        raise ConfigError(f"{key} must be in (0, {native_fps:g}], the env's own frame rate; found {fps:g}")
    return max(1, round(native_fps / fps))


def default_camera(benchmark: str) -> str:
    from mtrl.envs import backend_module

    return backend_module(benchmark).DEFAULT_CAMERA


def check_camera(benchmark: str, camera: str, key: str | None = None) -> None:
    """A ConfigError (naming the config `key`, if any) unless `camera` is one of `benchmark`'s cameras,
    which are known without building an env."""
    from mtrl.envs import backend_module

    cameras = backend_module(benchmark).CAMERAS
    if camera not in cameras:
        where = f"{key}: " if key else ""
        raise ConfigError(f"{where}unknown camera {camera!r}; this benchmark's cameras: {', '.join(cameras)}")


def camera_names(env: gym.Env) -> list[str]:
    """The named cameras of one (sub-)env: its MuJoCo model's, or the toy env's."""
    base = env.unwrapped
    model = getattr(base, "model", None)
    if model is None:
        return list(getattr(base, "camera_names", ()))
    import mujoco

    return [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]


def _upside_down(env: gym.Env) -> bool:
    """Whether the env's fixed camera has its image-up axis pointing at the floor.

    Meta-World's corner cameras are mounted that way; their frames are turned by 180 degrees so
    that the floor is at the bottom (a rotation, not a mirror: left and right stay as seen).
    """
    base = env.unwrapped
    name, model = getattr(base, "camera_name", None), getattr(base, "model", None)
    if model is None or name is None:
        return False
    import mujoco

    cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
    if cam < 0 or model.cam_mode[cam] != mujoco.mjtCamLight.mjCAMLIGHT_FIXED:
        return False
    return bool(base.data.cam_xmat[cam].reshape(3, 3)[2, 1] < 0)


def _gl_error(what: str, err: Exception) -> RenderError:
    detail = (str(err).strip().splitlines() or [""])[0]
    return RenderError(
        f"{what} with MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')} ({type(err).__name__}: {detail}); "
        "use MUJOCO_GL=egl with a GPU driver, or MUJOCO_GL=osmesa"
    )


def _load_mujoco() -> None:
    """Import MuJoCo, which loads the OpenGL backend named by MUJOCO_GL, failing in one line."""
    try:
        import mujoco  # noqa: F401
    except Exception as err:  # an unusable backend fails inside PyOpenGL with assorted exception types
        raise _gl_error("cannot load MuJoCo", err) from None


def _render(env: gym.Env, task: str) -> np.ndarray:
    try:
        frame = env.render()
    except Exception as err:  # MuJoCo and PyOpenGL fail with many exception types when no backend works
        raise _gl_error(f"cannot render {task}", err) from None
    if frame is None:
        raise RenderError(f"{task} rendered no frame: its env was not built with render_mode='rgb_array'")
    return np.asarray(frame)


def _record_task(
    agent: Agent, env: gym.Env, task: str, episodes: int, path: Path, fps: float | None, bar: tqdm
) -> TaskVideo:
    """`episodes` episodes of one sub-env into `path`. Only the frames kept are rendered: the one after
    each reset, every `stride`-th step's, and each episode's last (the success, or the time limit)."""
    import imageio.v2 as imageio

    start = time.perf_counter()
    stride = frame_stride(env.metadata.get("render_fps", 30), fps)
    video = TaskVideo(path, 0, [], [], [], fps=env.metadata.get("render_fps", 30) / stride)
    turn = None

    def keep(writer) -> None:
        nonlocal turn
        frame = _render(env, task)
        turn = _upside_down(env) if turn is None else turn
        writer.append_data(np.rot90(frame, 2) if turn else frame)
        video.frames += 1
        bar.update()

    # macro_block_size=1: keep the requested size (imageio would otherwise pad to multiples of 16)
    options = {"fps": video.fps, "codec": "libx264", "macro_block_size": 1, "ffmpeg_log_level": "error"}
    with imageio.get_writer(path, **options) as writer:
        for _ in range(episodes):
            obs, _ = env.reset()
            agent.reset(np.ones(1, dtype=bool))
            keep(writer)
            length, ret, success, done = 0, 0.0, False, False
            while not done:
                action = agent.eval_action(np.asarray(obs)[None])[0]
                obs, reward, terminated, truncated, info = env.step(action)
                length, ret = length + 1, ret + float(reward)
                success = success or bool(info.get("success", 0.0))
                done = bool(terminated or truncated)
                if done or length % stride == 0:
                    keep(writer)
            video.lengths.append(length)
            video.returns.append(ret)
            video.successes.append(success)
    video.seconds = time.perf_counter() - start
    return video


def record_videos(
    agent: Agent,
    backend: EnvBackend,
    out_dir: Path,
    episodes: int,
    fps: float | None = None,
    progress: bool | None = False,
    max_episode_steps: int | None = None,
) -> dict[str, TaskVideo]:
    """Render `episodes` evaluation episodes per task into `out_dir/<task>.mp4`, at `fps` frames per second
    (None: every step's frame, the env's own rate).

    `backend` is built with `render` and `vector_strategy="sync"`: each of its sub-envs is stepped
    on its own, and the agent gets one observation at a time. The files appear in `out_dir` only
    once every video is complete: a failure leaves `out_dir` as it was. `progress`: a progress bar per
    task on stderr with the frames rendered per second (None: only on a terminal), whose length
    assumes episodes of `max_episode_steps`; each finished task is also logged in one line.
    """
    envs = backend.vector_env
    if not isinstance(envs, gym.vector.SyncVectorEnv):
        raise ValueError("videos need a synchronous vector env (vector_strategy='sync')")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, found {episodes}")
    staging = Path(tempfile.mkdtemp(prefix="mtrl-video-"))
    try:
        videos = {}
        for env, task in zip(envs.envs, backend.task_names, strict=True):
            stride = frame_stride(env.metadata.get("render_fps", 30), fps)
            # frames of episodes that run to the time limit: the reset's, every stride-th step's, the last
            most = None if max_episode_steps is None else episodes * (max_episode_steps // stride + 2)
            disable = None if progress is None else not progress  # tqdm's None: only on a terminal
            with tqdm(total=most, desc=task, unit="frame", disable=disable, leave=False, dynamic_ncols=True) as bar:
                video = _record_task(agent, env, task, episodes, staging / f"{task}.mp4", fps, bar)
            if progress is not False:
                rate = video.frames / max(video.seconds, 1e-9)
                log.info("%s: %d frames in %.1f s (%.1f frames/s)", task, video.frames, video.seconds, rate)
            videos[task] = video
        out_dir.mkdir(parents=True, exist_ok=True)
        for video in videos.values():
            video.path = Path(shutil.move(video.path, out_dir / video.path.name))
        return videos
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_rendering(benchmark: str) -> None:
    """Make MuJoCo's OpenGL backend ready for `benchmark`'s frames (none needed by the toy benchmark)."""
    from mtrl.envs import backend_module

    if not backend_module(benchmark).RENDERS_WITH_MUJOCO:
        return
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        # Without a display, gymnasium's automatic choice (GLFW) fails; EGL is the headless backend.
        os.environ["MUJOCO_GL"] = "egl"
    _load_mujoco()


class EvalVideos:
    """Videos of the evaluation episodes during training (`eval.video_every`): CleanRL's `--capture-video`.

    Its own sync render envs hold the evaluation's goal sets (same seed) and start each time from their
    state when built, as the evaluator's do, so a video's episode k of a task is that task's episode k
    of the evaluation it goes with. Built when the run starts: a missing OpenGL backend or an unknown
    camera stops the run before training rather than at its first video.
    """

    def __init__(self, cfg: Config):
        from mtrl.envs import make_backend

        ev = cfg.eval
        camera = ev.video_camera or default_camera(cfg.env.benchmark)
        check_camera(cfg.env.benchmark, camera, "eval.video_camera")
        prepare_rendering(cfg.env.benchmark)
        render = {"camera_name": camera, "width": ev.video_width, "height": ev.video_height}
        self.backend = make_backend(cfg.env, cfg.seed, evaluation=True, vector_strategy="sync", render=render)
        first = self.backend.vector_env.envs[0]
        try:
            frame_stride(first.metadata.get("render_fps", 30), ev.video_fps, "eval.video_fps")
        except ConfigError:
            self.backend.close()
            raise
        self.initial_state = self.backend.get_state()
        self.episodes, self.fps, self.max_episode_steps = ev.video_episodes, ev.video_fps, cfg.env.max_episode_steps

    def __call__(self, agent: Agent, out_dir: Path, progress: bool) -> dict[str, TaskVideo]:
        self.backend.set_state(self.initial_state)
        return record_videos(agent, self.backend, out_dir, self.episodes, self.fps, progress, self.max_episode_steps)

    def close(self) -> None:
        self.backend.close()


def check_options(out_dir: Path, episodes: int, width: int, height: int, fps: float | None = None) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--video {out_dir}: exists and is not a directory")
    if episodes < 1:
        raise ConfigError(f"--video-episodes must be >= 1, found {episodes}")
    if fps is not None and not fps > 0:
        raise ConfigError(f"--fps must be > 0, found {fps:g}")
    for flag, value in (("--width", width), ("--height", height)):
        if value < 2 or value % 2:
            raise ConfigError(f"{flag} must be a positive even number of pixels (H.264 video), found {value}")


def run(args: argparse.Namespace, agent: Agent, cfg: Config, seed: int) -> int:
    """The `mtrl eval --video` branch: `seed` is the evaluation envs' seed."""
    from mtrl.envs import make_backend

    if args.episodes is not None:
        raise ConfigError("--episodes sets the evaluation's episodes; with --video, use --video-episodes")
    check_options(args.video, args.video_episodes, args.width, args.height, args.fps)
    camera = args.camera or default_camera(cfg.env.benchmark)
    check_camera(cfg.env.benchmark, camera)  # before the envs are built (tens of seconds for Meta-World)
    prepare_rendering(cfg.env.benchmark)
    render = {"camera_name": camera, "width": args.width, "height": args.height}
    backend = make_backend(cfg.env, seed, evaluation=True, vector_strategy="sync", render=render)
    try:
        videos = record_videos(
            agent, backend, args.video, args.video_episodes, args.fps, None, cfg.env.max_episode_steps
        )
    finally:
        backend.close()
    per_task = {
        task: {
            "success": float(np.mean(v.successes)),
            "return": float(np.mean(v.returns)),
            "video": str(v.path),
            "frames": v.frames,
        }
        for task, v in videos.items()
    }
    mean_success = float(np.mean([t["success"] for t in per_task.values()]))
    mean_return = float(np.mean([t["return"] for t in per_task.values()]))
    if args.json:
        print(json.dumps({"mean_success": mean_success, "mean_return": mean_return, "per_task": per_task}))
    else:
        width = max(len(t) for t in per_task)
        for task, r in per_task.items():
            print(
                f"{task:<{width}}  success {r['success']:.3f}  return {r['return']:9.2f}  "
                f"{r['video']} ({r['frames']} frames)"
            )
        print(f"{'mean':<{width}}  success {mean_success:.3f}  return {mean_return:9.2f}")
    return 0
