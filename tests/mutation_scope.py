"""pytest plugin for scripts/mutation.sh: keeps only the tests of the module under mutation.

mutmut runs, for each mutant, every selected test that reaches the mutated function; the trainer's tests
reach nearly everything and take seconds each. MTRL_MUTATION_TESTS (space-separated test files) limits a
mutation run to the fast unit tests of one module. Without the variable, the plugin does nothing.
"""

from __future__ import annotations

import os


def pytest_collection_modifyitems(config, items) -> None:
    scope = os.environ.get("MTRL_MUTATION_TESTS")
    if not scope:
        return
    files = set(scope.split())
    keep = [item for item in items if item.nodeid.split("::")[0] in files]
    dropped = [item for item in items if item.nodeid.split("::")[0] not in files]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
