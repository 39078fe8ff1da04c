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
