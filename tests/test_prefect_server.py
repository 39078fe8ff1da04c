"""flows/prefect_server.py: the temporary Prefect server a stage process starts before importing Prefect."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from flows import prefect_server


def test_a_configured_api_url_starts_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert prefect_server.start_unless_configured() is None


def test_the_temporary_server_serves_prefect_from_prefect_home_and_stops(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    server = prefect_server.start_unless_configured()
    assert server is not None
    try:
        server.wait_until_ready(timeout=120)
        assert server.api_url.startswith("http://127.0.0.1:")
        req = urllib.request.Request(f"{server.api_url}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read()) == []  # a fresh database ...
        assert (tmp_path / ".prefect" / "prefect.db").is_file()  # ... where Prefect's own would keep it
    finally:
        server.stop()
    assert server.process.poll() is not None
    server.stop()  # twice is harmless (it is also registered to run at exit)


def test_a_server_that_dies_while_booting_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    server = prefect_server.TemporaryServer()
    server.process.kill()
    server.process.wait()
    with pytest.raises(RuntimeError, match="exited with status"):
        server.wait_until_ready(timeout=60)
