"""Runs mutmut on the chosen core modules and prints the mutation score of each (see scripts/mutation.sh)."""

from __future__ import annotations

import argparse
import fnmatch
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

# mutmut names a mutant <module>.x_<function>__mutmut_<n>, or <module>.xǁ<Class>ǁ<method>__mutmut_<n>.
# Each module: the mutants it owns, and the fast unit tests that may kill them (a subset of the tests in
# [tool.mutmut] of pyproject.toml; tests/mutation_scope.py drops the others).
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "buffer": (["mtrl.buffer.*"], ["tests/test_buffer.py"]),
    "sac": (
        ["mtrl.sac.*"],
        ["tests/test_sac.py", "tests/test_sac_update.py", "tests/test_jacobian.py", "tests/test_compiled_update.py"],
    ),
    "jacobian": (["mtrl.jacobian.*"], ["tests/test_jacobian.py", "tests/test_sac.py"]),
    "evaluation": (["mtrl.evaluation.*"], ["tests/test_evaluation.py", "tests/test_evaluator_scripted.py"]),
    "checkpoint": (["mtrl.checkpoint.*"], ["tests/test_checkpoint.py"]),
    # What a checkpoint holds and how a resume restores it.
    "runstate": (
        ["mtrl.runstate.*"],
        # test_bad_input holds the refusals of `check`, `load` and `load_latest` (other tasks, corrupt files)
        ["tests/test_runstate.py", "tests/test_trainer.py", "tests/test_checkpoint.py", "tests/test_bad_input.py"],
    ),
    "optim": (
        ["mtrl.optim.*"],
        [
            "tests/test_sac.py",
            "tests/test_sac_update.py",
            "tests/test_adatask.py",
            "tests/test_compiled_update.py",
            "tests/test_task_adam.py",
        ],
    ),
    "adatask": (["mtrl.adatask.*"], ["tests/test_adatask.py", "tests/test_sac.py", "tests/test_compiled_update.py"]),
    "combiners": (
        ["mtrl.combiners.*"],
        [*sorted(str(p) for p in Path("tests").glob("test_combiner_*.py")), "tests/test_skipped_updates.py"],
    ),
}
DETECTED = ("killed", "timeout")


def score_rows(results: list[tuple[str, str]], modules: list[str]) -> list[tuple[str, Counter]]:
    """(row name, count by status) per module; the combiners also get one row per file."""
    rows: dict[str, Counter] = {}
    for module in modules:
        rows[module] = Counter()
        for name, status in results:
            if any(fnmatch.fnmatchcase(name, g) for g in MODULES[module][0]):
                rows[module][status] += 1
                if module == "combiners":
                    rows.setdefault(f"  {name.split('.')[2]}.py", Counter())[status] += 1
    return list(rows.items())


def table(rows: list[tuple[str, Counter]]) -> str:
    lines = [
        "| module | mutants | killed | timeout | survived | other | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for module, c in rows:
        total = sum(c.values())
        detected = sum(c[s] for s in DETECTED)
        other = total - detected - c["survived"]
        score = f"{detected / total:.1%}" if total else "-"
        lines.append(f"| {module} | {total} | {c['killed']} | {c['timeout']} | {c['survived']} | {other} | {score} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutation.sh", description=__doc__)
    parser.add_argument("modules", nargs="*", metavar="module", help=f"any of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--mutmut", default="mutmut", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)} (choose from {', '.join(MODULES)})")
    modules = args.modules or list(MODULES)
    jobs = os.environ.get("JOBS") or str(os.cpu_count() or 1)

    Path("mutants").mkdir(exist_ok=True)
    for module in modules:
        globs, tests = MODULES[module]
        print(f"mutating {module} (tests: {' '.join(tests)}); log in mutants/run-{module}.log", flush=True)
        env = {**os.environ, "MTRL_MUTATION_TESTS": " ".join(tests)}
        log_path = Path(f"mutants/run-{module}.log")
        with open(log_path, "w") as log:
            run = subprocess.run([args.mutmut, "run", "--max-children", jobs, *globs], stdout=log, stderr=log, env=env)
        if run.returncode != 0:
            print("".join(log_path.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
            print(f"mutation.sh: mutmut failed (exit {run.returncode}); full log in {log_path}", file=sys.stderr)
            return 1
    out = subprocess.run([args.mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True)
    results = [tuple(line.strip().rsplit(": ", 1)) for line in out.stdout.splitlines() if ": " in line]
    print(table(score_rows(results, modules)))
    print("score = (killed + timeout) / mutants; list the survivors with `mutmut results`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
