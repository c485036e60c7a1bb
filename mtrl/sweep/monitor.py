"""The driver's view of the trials: progress read from their files, the log lines, and the summary.

The driver never talks to a training process. It reads what the attempts write into each trial's
directory (`sweep_events.jsonl`, `metrics.jsonl`) and what Ray returns when an attempt ends, and
writes `ROOT/summary.md` and `ROOT/summary.json`. The summary's attempt history comes from the
trials' event files, which keep every attempt of every run of the sweep: a re-run rewrites the
summary without losing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtrl import rundir
from mtrl.sweep.attempt import AttemptResult, describe_exit, read_events
from mtrl.sweep.spec import SweepSpec
from mtrl.sweep.trials import Trial, saved_step

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
STATUSES = ("finished", "skipped", "failed", "interrupted")  # how a trial ends in the summary


class MetricsTail:
    """Reads a run's metrics.jsonl incrementally: latest step, last and best eval success.

    A resume rewrites the file without the records after its checkpoint (a new file): then it is
    read again from the start.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / rundir.METRICS_FILE
        self._reset(None)

    def _reset(self, inode: int | None) -> None:
        self.inode, self.offset = inode, 0
        self.step = 0
        self.final_success: float | None = None
        self.best_success: float | None = None

    def update(self) -> MetricsTail:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return self
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self._reset(stat.st_ino)
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for record in rundir.parse_records(complete.splitlines()):
            self.step = max(self.step, int(record.get("step", 0)))
            success = record.get("eval/mean_success")
            if record.get("kind") == "eval" and success is not None:
                self.final_success = success
                self.best_success = success if self.best_success is None else max(self.best_success, success)
        return self


def attempt_history(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every attempt in a trial's events, oldest first: its start joined with its exit (None while running,
    or when its worker died before writing one)."""
    attempts: dict[tuple[Any, int], dict[str, Any]] = {}
    for e in events:
        key = (e.get("sweep"), e["attempt"])
        if e["event"] in ("start", "resume"):
            attempts[key] = {
                "sweep": e.get("sweep"),
                "attempt": e["attempt"],
                "how": e["event"],
                "from_step": e.get("step", 0),
                "host": e.get("host"),
                "code": None,
                "step": None,
                "seconds": None,
                "cancelled": False,
                "_started": e["time"],
            }
        elif e["event"] == "exit" and key in attempts:
            a = attempts[key]
            a.update(code=e["code"], step=e.get("step"), cancelled=e.get("cancelled", False))
            a["seconds"] = round(e["time"] - a["_started"], 3)
    return [{k: v for k, v in a.items() if k != "_started"} for a in attempts.values()]


def _describe_attempt(a: dict[str, Any]) -> str:
    begun = "start" if a["how"] == "start" else f"resume from step {a['from_step']}"
    if a["code"] is None:
        return f"{a['sweep']} attempt {a['attempt']}: {begun} on {a['host']}; no exit recorded"
    if a["cancelled"]:
        ended = "stopped by the sweep"
    elif a["code"] == 0:
        ended = "exited"
    else:
        ended = describe_exit(a["code"])
    at = "" if a["step"] is None else f" at step {a['step']}"
    return (
        f"{a['sweep']} attempt {a['attempt']}: {begun} on {a['host']}; {ended}{at} after {_fmt_duration(a['seconds'])}"
    )


def _fmt_success(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _fmt_duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class _Tracked:
    trial: Trial
    status: str = "queued"  # queued | running | waiting (for a retry) | one of STATUSES
    attempts: int = 0  # started in this run of the sweep
    retries: int = 0
    error: str = ""
    events_seen: int = 0
    metrics: MetricsTail = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = MetricsTail(self.trial.run_dir)


class Monitor:
    """Logs the trials' starts and resumes (from their event files), their ends, retries and progress."""

    def __init__(self, trials: list[Trial], sweep_id: str, max_retries: int):
        from mtrl.logger import log

        self.log = log
        self.sweep_id, self.max_retries = sweep_id, max_retries
        self.tracked = {t.name: _Tracked(t) for t in trials}

    def poll(self) -> None:
        for tr in self.tracked.values():
            if tr.status not in ("queued", "running", "waiting"):
                continue
            events = read_events(tr.trial.run_dir)
            for e in events[tr.events_seen :]:
                if e.get("sweep") == self.sweep_id and e["event"] in ("start", "resume"):
                    where = f"attempt {e['attempt']}, pid {e['pid']} on {e['host']}"
                    tr.status, tr.attempts = "running", e["attempt"]
                    if e["event"] == "start":
                        self.log.info("[%s] started (%s)", tr.trial.name, where)
                    else:
                        self.log.info("[%s] resumed from step %d (%s)", tr.trial.name, e["step"], where)
            tr.events_seen = len(events)

    def ended(self, name: str, result: AttemptResult) -> bool:
        """Record how an attempt ended; True when the trial is to be tried again."""
        tr = self.tracked[name]
        if result.status in ("finished", "skipped"):
            self.finish(name, result.status)
            return False
        retry = result.status == "crashed" and tr.retries < self.max_retries
        if result.status == "rejected":
            then = "not retried"
        else:
            then = "Ray retries it from its last checkpoint" if retry else "no retries left"
        self.log.warning("[%s] attempt %d %s; %s", name, result.attempt, result.ended, then)
        if retry:
            tr.status, tr.retries = "waiting", tr.retries + 1
        else:
            self.finish(name, "failed", result.message)
        return retry

    def status(self) -> None:
        for tr in self.tracked.values():
            if tr.status == "waiting":
                step = saved_step(tr.trial.command, tr.trial.run_dir)
                then = "start again" if step is None else f"resume from step {step}"
                self.log.info("[%s] waiting (retry %d), will %s", tr.trial.name, tr.retries, then)
            elif tr.status == "running":
                m = tr.metrics.update()
                success = "no evaluation yet"
                if m.final_success is not None:
                    success = f"eval success {m.final_success:.3f} (best {m.best_success:.3f})"
                self.log.info("[%s] step %d/%d, %s", tr.trial.name, m.step, tr.trial.total_steps, success)

    def finish(self, name: str, status: str, error: str = "") -> None:
        tr = self.tracked[name]
        tr.status, tr.error = status, error
        m = tr.metrics.update()
        if status == "finished":
            self.log.info(
                "[%s] finished: %d steps, eval success %s (best %s)",
                name,
                tr.trial.total_steps,
                _fmt_success(m.final_success),
                _fmt_success(m.best_success),
            )
        elif status == "failed":
            self.log.error("[%s] failed: %s", name, error)

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for tr in self.tracked.values():
            t = tr.trial
            m = tr.metrics.update()
            history = attempt_history(read_events(t.run_dir))
            rows.append(
                {
                    "trial": t.name,
                    "status": tr.status,
                    "attempts": tr.attempts,
                    "steps": saved_step(t.command, t.run_dir) or 0,
                    "total_steps": t.total_steps,
                    "final_success": m.final_success,
                    "best_success": m.best_success,
                    "wall_seconds": round(sum(a["seconds"] or 0 for a in history), 3),
                    "preset": str(t.preset),
                    "grid": t.point,
                    "seed": t.seed,
                    "run_dir": str(t.run_dir),
                    "error": tr.error,
                    "history": history,
                }
            )
        return rows


# ----- the summary ----------------------------------------------------------------------------
def summary_markdown(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [
        f"# Sweep {spec.name}",
        "",
        f"`mtrl {spec.command}`, {len(rows)} trials in `{spec.root}`: {tally}. "
        "Skipped trials had finished before this run; attempts are this run's; wall time adds up all attempts.",
        "",
        "| trial | status | attempts | steps | final success | best success | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trial']} | {r['status']} | {r['attempts']} | {r['steps']}/{r['total_steps']} | "
            f"{_fmt_success(r['final_success'])} | {_fmt_success(r['best_success'])} | "
            f"{_fmt_duration(r['wall_seconds'])} |"
        )
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r['trial']}`: {r['error']}" for r in failed]
    lines += [
        "",
        "## Attempts",
        "",
        "Every attempt of every run of the sweep (run id, attempt number in that run):",
        "",
    ]
    for r in rows:
        lines.append(f"- `{r['trial']}`" + ("" if r["history"] else ": none"))
        lines += [f"  - {_describe_attempt(a)}" for a in r["history"]]
    return "\n".join(lines) + "\n"


def write_summary(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    text = summary_markdown(spec, rows)
    payload = {"name": spec.name, "command": str(spec.command), "root": str(spec.root), "trials": rows}
    rundir.atomic_write(spec.root / SUMMARY_MD, text)
    rundir.atomic_write(spec.root / SUMMARY_JSON, json.dumps(payload, indent=2) + "\n")
    return text
