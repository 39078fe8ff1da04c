"""Process environment for every command: project root, telemetry off, state folders inside the project."""

from __future__ import annotations

import os
from pathlib import Path

# Offline hygiene: no analytics, no update checks, no hub downloads. Set before any of these libraries
# is imported (some read their settings at import time).
OFFLINE_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def project_root(start: Path | None = None) -> Path:
    """PRESTO_ROOT, else the nearest folder upwards holding params.yaml and dvc.yaml."""
    if os.environ.get("PRESTO_ROOT"):
        return Path(os.environ["PRESTO_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return here


# A local Ray (no RAY_ADDRESS) keeps all of its traffic on loopback. Ray 2.60 turns the node address 127.0.0.1
# into the machine's routable one, and its gRPC servers then listen on every interface, unless this switch is
# off: it is named for Windows and macOS but read on every platform, once, when ray is imported. The same
# rewrite sends a driver of RAY_ADDRESS=127.0.0.1:6379 (a Ray head of this machine's own, on loopback) to the
# routable address, where nothing listens. A driver of any other cluster must not have the switch (its node
# address has to be one the cluster can reach).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOCALHOST = ("127.0.0.1", "localhost", "::1", "[::1]")  # what Ray rewrites


def on_loopback(ray_address: str) -> bool:
    """Whether RAY_ADDRESS is unset or names a Ray on this machine's loopback (host:port or ray://host:port)."""
    if not ray_address:
        return True
    host = ray_address.removeprefix("ray://").rsplit(":", 1)[0]
    return host in LOCALHOST


def set_defaults() -> None:
    """OFFLINE_ENV, and LOCAL_RAY_ENV for a Ray on loopback (RAY_ADDRESS unset or 127.0.0.1); anything already
    exported wins."""
    defaults = OFFLINE_ENV | (LOCAL_RAY_ENV if on_loopback(os.environ.get("RAY_ADDRESS", "")) else {})
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def configure(root: Path) -> None:
    """Defaults only: anything the user exported (a Prefect server, an MLflow server, a Ray cluster) wins."""
    set_defaults()
    os.environ.setdefault("PRESTO_ROOT", str(root))
    # Prefect without a server runs an ephemeral one whose database lives in PREFECT_HOME.
    os.environ.setdefault("PREFECT_HOME", str(record_root(root) / ".prefect"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(root))
    # numba (under librosa) caches compiled code beside its sources in the virtualenv; processes compiling
    # at once corrupted that cache here (then librosa segfaults). Keep the cache in the project instead.
    os.environ.setdefault("NUMBA_CACHE_DIR", str(root / ".cache" / "numba"))


def record_root(root: Path) -> Path:
    """Where the project's runs are recorded (MLflow's store, Prefect's database): the project itself, except in
    a DVC experiment run in a temporary copy of it (`dvc exp run --queue` or `--temp`), where it is the project
    the experiment came from, whose path DVC passes as DVC_ROOT: the copy, with any store inside it, is deleted
    when the experiment ends."""
    parent = os.environ.get("DVC_ROOT")
    if os.environ.get("DVC_EXP_NAME") and parent and (Path(parent) / "dvc.yaml").is_file():
        return Path(parent).resolve()
    return root


def mlflow_dir(root: Path) -> Path:
    return record_root(root) / ".mlflow"


def default_tracking_uri(root: Path) -> str:
    # Absolute: MLflow's defaults are relative to the current folder.
    return f"sqlite:///{mlflow_dir(root) / 'mlflow.db'}"
