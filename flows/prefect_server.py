"""The Prefect API a `presto stage` process reports to: the configured one, else a temporary server of its own.

Without an API URL, Prefect starts a temporary server when the flow begins: it imports the whole server into
this process (~4 s on 2 cores) and then waits for the server process to import it again and boot (~5 s more).
`presto stage` starts that same server (Prefect's own app and flags, the database in PREFECT_HOME, so the
history is the same) first thing, in its own process, so it boots on the other core while this one imports
Prefect, MLflow and Ray: every stage starts ~10 s sooner.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """Prefect's API app under uvicorn on 127.0.0.1, as Prefect runs its own temporary server."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process = self._launch()
        # At exit, not before: Prefect sends its last logs and events at interpreter exit, ahead of atexit.
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> subprocess.Popen:
        import importlib.util

        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent  # without importing prefect
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "error", "--lifespan", "on"]
        # The flags Prefect gives its temporary server: no UI, none of the long-running services.
        env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        return subprocess.Popen(cmd, env=env)

    def wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_IN_USE:  # taken between choosing the port and binding it
                self.port = _free_port()
                self.process = self._launch()
            elif code is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {code} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server on port {self.port} was not ready within {timeout:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_unless_configured() -> TemporaryServer | None:
    """A temporary server, booting from now on, unless PREFECT_API_URL names a server already."""
    return None if os.environ.get("PREFECT_API_URL") else TemporaryServer()


@contextmanager
def prefect_api(server: TemporaryServer | None) -> Iterator[None]:
    """Run the body against `server` (from `start_unless_configured`) where Prefect would have started its own
    temporary server; Prefect's rules otherwise hold (an API URL in a profile wins; with temporary servers
    disabled and no URL, Prefect says so)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if server is None or settings.api.url or not settings.server.ephemeral.enabled:
        if server is not None:
            server.stop()
        yield
        return
    server.wait_until_ready(settings.server.ephemeral.startup_timeout_seconds)
    # The environment too: threads Prefect starts outside this context read their settings from it.
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        del os.environ["PREFECT_API_URL"]


def drain_and_stop(server: TemporaryServer | None) -> None:
    """Send what Prefect still queues (logs, events) to its API, then stop the temporary server, if any."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
    if server is not None:
        server.stop()
