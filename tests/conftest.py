"""Shared test setup: offline, telemetry off, and the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.env import set_defaults

REPO = Path(__file__).resolve().parents[1]

set_defaults()  # before any test module imports ray


# The files that take most of the suite's time (measured with --durations): collected first, so that under
# `make test` (2 workers, whole files to a worker, in this order) the longest starts at once on one worker while
# the other works through the rest, instead of trailing it at the end.
SLOW_FIRST = ("test_pipeline_integration.py", "test_stage_kill_resume.py", "test_infra_loopback.py",
              "test_train_faults.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest keep their order


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test: tiny models run ~3x faster on one thread than on two contended ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# After the whole suite had passed and pytest had written its report, the interpreter once died in teardown with
# SIGSEGV (exit 139; 1 run of 3, not reproduced by any file alone): C extensions' destructors (Ray's core
# worker, torch's thread pools, numba) racing at shutdown. Nothing of the tests runs there, so once the report is
# out the process leaves with pytest's own exit status instead of tearing those down.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT_STATUS:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
