"""Command line: `mtrl train | eval | bench | report | toy`. Thin: parsing, then one call into the package."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mtrl.config import Config, ConfigError, describe_options, to_yaml

if TYPE_CHECKING:
    from mtrl.callbacks import Callback

TRAIN_EPILOG = """\
Overrides are dotted keys, e.g. `train.total_steps=100000 combiner.name=cagrad combiner.c=0.9`;
lists are YAML, e.g. `env.tasks=[reach-v3,push-v3]`. Precedence: defaults < --config (a preset, on
top of the presets its `defaults:` list names) < overrides; `--print-config` shows the result.
The combiner's own keys depend on combiner.name: each is listed with the combiner it belongs to.

Config keys:
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtrl", description="Multi-task SAC on Meta-World with gradient combiners.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser(
        "train",
        help="train an agent (or resume a run)",
        description="Train multi-task SAC. Writes metrics.jsonl, TensorBoard files (tb/), config.yaml and "
        "checkpoints/ into run.dir.",
        epilog=TRAIN_EPILOG + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", type=Path, help="YAML preset, e.g. configs/mt10_mtsac.yaml")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its latest checkpoint",
    )
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit, building and writing nothing",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint with the Meta-World protocol",
        description="Evaluate a checkpoint (a .pt file, or a run directory for its latest checkpoint) on fresh "
        "evaluation envs: deterministic actions, pseudorandom goal sweep, success at any step.",
    )
    ev.add_argument("checkpoint", type=Path, help="checkpoint file or run directory")
    ev.add_argument("--episodes", type=int, default=None, help="episodes per task (default: the run's eval.episodes)")
    ev.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the evaluation envs' goal sets (default: the run's, i.e. the goals it trained on)",
    )
    ev.add_argument("--device", default="cpu", help="torch device for the policy (default: cpu)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ev.add_argument(
        "--video", type=Path, metavar="DIR", help="instead of evaluating, film evaluation episodes to DIR/<task>.mp4"
    )
    ev.add_argument("--video-episodes", type=int, default=1, metavar="N", help="episodes per video (default 1)")
    ev.add_argument(
        "--fps",
        type=float,
        default=20,
        help="video frame rate (default 20); only the frames kept are rendered, and the video plays in real "
        "time: Meta-World steps at 80 per second, so 20 renders one step in 4 (80: every step)",
    )
    ev.add_argument("--width", type=int, default=256, help="video width in pixels, even (default 256)")
    ev.add_argument("--height", type=int, default=256, help="video height in pixels, even (default 256)")
    ev.add_argument(
        "--camera",
        help="camera: Meta-World's corner (default), corner2, corner3, corner4, topview, behindGripper, gripperPOV; "
        "the toy benchmark's topview",
    )

    bench = sub.add_parser("bench", help="benchmarks (see `mtrl bench update --help`)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    upd = bench_sub.add_parser(
        "update",
        help="time one full SAC update per combiner",
        description="Time one full SAC update (critic + actor + temperature) per combiner at each K, on each "
        "available device, next to a plain mean-loss backward.",
    )
    upd.add_argument("--combiners", default="all", help="comma-separated names, or 'all'")
    upd.add_argument("--tasks", default="10,50", help="comma-separated K values (default 10,50)")
    upd.add_argument("--devices", default="auto", help="comma-separated devices, or 'auto' (cpu and cuda if present)")
    upd.add_argument("--batch-per-task", type=int, default=128, help="samples per task (default 128)")
    upd.add_argument("--hidden", default="400,400,400", help="hidden widths (default 400,400,400)")
    upd.add_argument("--repeats", type=int, default=10, help="timed repetitions (median reported)")
    upd.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: half the cores)")
    upd.add_argument(
        "--compile",
        default="none",
        help="comma-separated torch.compile modes of the whole update: none, default, reduce-overhead (default none)",
    )
    upd.add_argument(
        "--architectures",
        default="conditioned",
        help="comma-separated agent.architecture names, or 'all'; with any but conditioned, multihead is measured "
        "first and every update is also compared with multihead's mean update (default conditioned)",
    )
    upd.add_argument("--json", action="store_true", help="print a JSON list of records")
    from mtrl import bench_env, bench_train

    for module in (bench_train, bench_env):  # `mtrl bench train`, `mtrl bench env`
        module.add_parser(bench_sub)

    from mtrl import baseline, report, sweep, toy

    for module in (baseline, report, sweep, toy):  # each owns its subcommand's parser and body
        module.add_parser(sub)
    return parser


def _print_config(cfg: Config) -> int:
    print(to_yaml(cfg), end="")
    return 0


def cmd_train(args: argparse.Namespace, callbacks: Sequence[Callback] = ()) -> int:
    from mtrl import rundir
    from mtrl.config import load_config
    from mtrl.runstate import load_latest
    from mtrl.trainer import Trainer

    rundir.check_start_or_resume(args.config, args.resume)
    if args.resume is not None:
        if args.print_config:
            return _print_config(load_latest(args.resume).resumed_config(args.resume, args.overrides))
        trainer = Trainer.resume(args.resume, args.overrides, callbacks)
    else:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            return _print_config(cfg)
        run_dir = rundir.new_run_dir(cfg.run.dir, args.config)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))
        trainer = Trainer(cfg, run_dir, callbacks=callbacks)
    print(f"run directory: {trainer.run_dir}", file=sys.stderr)
    return trainer.train()


def cmd_eval(args: argparse.Namespace) -> int:
    from mtrl.build import resolve_device
    from mtrl.envs import make_backend
    from mtrl.evaluation import Evaluator
    from mtrl.policy import Policy
    from mtrl.runstate import load

    if args.episodes is not None and args.episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, found {args.episodes}")
    _refuse_baseline_run(args.checkpoint)
    device = resolve_device(args.device)
    saved = load(args.checkpoint, map_location=device)
    policy = Policy(saved.actor(device), device)
    cfg = saved.config
    seed = cfg.seed if args.seed is None else args.seed
    if args.video is not None:
        from mtrl import video

        return video.run(args, policy, cfg, seed)
    backend = make_backend(cfg.env, seed, evaluation=True, vector_strategy=cfg.eval.vector_strategy)
    evaluator = Evaluator(backend, args.episodes or cfg.eval.episodes)
    result = evaluator(policy)
    evaluator.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        width = max(len(t) for t in result.per_task)
        for task, r in result.per_task.items():
            print(f"{task:<{width}}  success {r['success']:.3f}  return {r['return']:9.2f}")
        print(f"{'mean':<{width}}  success {result.mean_success:.3f}  return {result.mean_return:9.2f}")
    return 0


def _refuse_baseline_run(path: Path) -> None:
    """A ConfigError for a run of `mtrl baseline`: it holds SB3 agents, no mtrl checkpoint, and was
    evaluated as it trained."""
    from mtrl import baseline

    if path.is_dir() and baseline.read_state(path) is not None:
        raise ConfigError(
            f"{path} is a run of `mtrl baseline`, which has no mtrl checkpoint: it is evaluated as it trains, "
            f"with the same protocol (eval records in {path / 'metrics.jsonl'}, the last also in "
            f"{path / baseline.BASELINE_DIR / baseline.STATE_FILE}); `mtrl report {path} --out DIR` tabulates them"
        )


def cmd_bench(args: argparse.Namespace) -> int:
    from mtrl import bench, bench_env, bench_train

    return {"update": bench.run_update_bench, "train": bench_train.run, "env": bench_env.run}[args.bench](args)


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """Run the command line `argv`; `callbacks` hook into training (the train command only)."""
    from mtrl.checkpoint import CheckpointError
    from mtrl.logger import setup_console
    from mtrl.trainer import TrainingError

    args = build_parser().parse_args(argv)
    setup_console()
    from mtrl import baseline, report, sweep, toy

    commands = {
        "train": functools.partial(cmd_train, callbacks=callbacks),
        "eval": cmd_eval,
        "bench": cmd_bench,
        "baseline": baseline.run,
        "report": report.run,
        "sweep": sweep.run,
        "toy": toy.run,
    }
    try:
        return commands[args.command](args)
    except (ConfigError, CheckpointError, TrainingError) as err:
        print(f"mtrl: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError | CheckpointError) else 1
    except KeyboardInterrupt:  # before training installs its own handler (start-up, loading a checkpoint)
        print("mtrl: interrupted before training started; nothing was saved", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
