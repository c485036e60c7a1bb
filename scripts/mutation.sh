#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (hours on a laptop: not run in CI).
#
# Usage: scripts/mutation.sh [module ...]
#   modules: buffer sac jacobian evaluation checkpoint runstate optim adatask combiners (default: all)
#   e.g.     scripts/mutation.sh buffer checkpoint
# Environment: MTRL_VENV  virtual environment to use (default ./.venv, created by scripts/install.sh)
#              JOBS       mutants tested in parallel (default: number of CPUs)
#
# mutmut copies the package into ./mutants/, mutates it, and runs for each mutant only those tests of
# [tool.mutmut] in pyproject.toml that reach the mutated function. Results are cached in ./mutants/: a rerun
# tests only new or changed mutants (delete ./mutants/ to start over). The run's log is mutants/run.log;
# inspect a survivor with `mutmut show <name>`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${MTRL_VENV:-.venv}
if [ ! -x "$venv/bin/mutmut" ]; then
  if [ -n "${MTRL_VENV:-}" ]; then
    echo "mutation.sh: $venv has no mutmut; install the mutation extra into it" >&2
    exit 2
  fi
  bash scripts/install.sh "test,mutation"
fi
# The tests must import the mutated copy in ./mutants, not a package found through PYTHONPATH.
unset PYTHONPATH
# Parallel mutants each get one torch thread instead of fighting over all cores.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec "$venv/bin/python" scripts/mutation.py --mutmut "$venv/bin/mutmut" "$@"
