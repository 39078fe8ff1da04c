"""Shared test setup: offline, telemetry off, and the repository root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.env import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]

for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


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
