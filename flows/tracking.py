"""MLflow: one run per executed stage, grouped under a parent run per pipeline invocation.

The runs of one `dvc repro` share its invocation id (the dvc process that started them), so they
nest under one parent run; each stage run records the runs that produced its inputs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.env import default_tracking_uri, mlflow_dir

EXPERIMENT = "presto"
TAG_STAGE = "presto.stage"
TAG_INVOCATION = "presto.invocation"
TAG_FINGERPRINT = "presto.fingerprint"
TAG_DVC_EXPERIMENT = "presto.dvc_experiment"
TAG_PARENT = "mlflow.parentRunId"
TAG_PROCESS = "presto.process"  # host:pid:start of the process running the stage, to tell when it is gone


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def experiment_id(root: Path) -> str:
    client = _client()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    if os.environ["MLFLOW_TRACKING_URI"] == default_tracking_uri(root):
        artifacts = mlflow_dir(root) / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.as_uri()
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except Exception:  # created concurrently by another stage process
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _process_start(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def this_process() -> str | None:
    """host:pid:start time of this process (None without /proc): a pid alone may be recycled."""
    try:
        return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"
    except OSError:
        return None


def is_gone(process: str) -> bool:
    """Whether the process that `this_process()` named has ended; False for one on another host (unknowable)."""
    host, pid, start = process.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    try:
        return _process_start(int(pid)) != start
    except (OSError, ValueError):
        return True


def end_dead_runs(exp_id: str, stage: str, keep: str | None) -> list[str]:
    """Mark KILLED the runs of `stage` still RUNNING whose process is gone (a SIGKILL or the OOM killer leaves a
    stage no chance to close its run), and their pipeline parent runs unless that is `keep` (the current
    invocation's); returns the stage runs so ended."""
    client = _client()
    running = client.search_runs(
        [exp_id], filter_string=f"tags.`{TAG_STAGE}` = '{stage}' and attributes.status = 'RUNNING'")
    ended = []
    for run in running:
        process = run.data.tags.get(TAG_PROCESS)
        if process is None or not is_gone(process):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
        parent = run.data.tags.get(TAG_PARENT)
        if parent and parent != keep and client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, "KILLED")
    return ended


def invocation_id() -> str | None:
    """Id shared by the stage runs of one pipeline invocation.

    PRESTO_INVOCATION_ID wins; otherwise the nearest `dvc repro`/`dvc exp` process above us (pid and
    start time, so a recycled pid is a new invocation). None when run by hand outside DVC.
    """
    if os.environ.get("PRESTO_INVOCATION_ID"):
        return os.environ["PRESTO_INVOCATION_ID"]
    pid = os.getppid()
    try:
        while pid > 1:
            words = _cmdline(pid).split()
            if any(Path(w).name == "dvc" for w in words[:3]) and ("repro" in words or "exp" in words):
                return f"dvc-{pid}-{_process_start(pid)}"
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:  # no /proc (not Linux) or the process is gone
        return None
    return None


def experiment_tags() -> dict[str, str]:
    """The DVC experiment a run belongs to (`dvc exp run -n NAME`, which DVC passes as DVC_EXP_NAME), so that the
    MLflow UI finds an experiment's runs beside `dvc exp show`'s row."""
    name = os.environ.get("DVC_EXP_NAME")
    return {TAG_DVC_EXPERIMENT: name} if name else {}


def parent_run(exp_id: str, invocation: str) -> str:
    client = _client()
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{TAG_INVOCATION}` = '{invocation}' and tags.`presto.kind` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id,
        run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={TAG_INVOCATION: invocation, "presto.kind": "pipeline", **experiment_tags()},
    )
    return run.info.run_id


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


@dataclass
class MlflowTracker:
    """The Tracker a stage body gets. Picklable: it carries ids, not connections, so it travels to Ray."""

    tracking_uri: str
    run_id: str
    parent_run_id: str | None = None

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if math.isfinite(float(v))]
        if batch:
            self._client().log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client().log_artifacts(self.run_id, str(path), subdir)
        else:
            self._client().log_artifact(self.run_id, str(path), subdir)

    def log_text(self, text: str, name: str) -> None:
        self._client().log_text(self.run_id, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        client = self._client()
        for k, v in tags.items():
            client.set_tag(self.run_id, k, v)

    def log_model(self, name: str, files: dict[str, Path], config: dict[str, Any], alias: str | None) -> None:
        """Log a bundle in this run as a pyfunc model (flows/serving.py) and register it as presto-<name>;
        `config` becomes its settings file (and, where scalar, tags of the version); `alias` moves to it."""
        import mlflow
        from mlflow.models import Model

        from flows import serving

        registered = f"presto-{name}"
        client = self._client()
        # Model.log takes neither a tracking URI nor an experiment: set the process-wide ones for the call, then
        # put them back. Without the experiment, MLflow 3 files the model under experiment 0, whose artifact
        # folder is ./mlruns relative to the working directory, not the project's store.
        saved_uri, saved_experiment = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_EXPERIMENT_ID")
        mlflow.set_tracking_uri(self.tracking_uri)
        os.environ["MLFLOW_EXPERIMENT_ID"] = client.get_run(self.run_id).info.experiment_id
        # The settings travel as a file: Model.log would copy a model_config into the run's params.
        with tempfile.TemporaryDirectory() as tmp:
            settings = Path(tmp) / serving.CONFIG_FILE
            settings.write_text(json.dumps(config, indent=2) + "\n")
            try:
                info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, python_model=serving.__file__,
                                 artifacts={"config": str(settings)} | {k: str(files[k]) for k in serving.ARTIFACTS},
                                 signature=serving.SIGNATURE, pip_requirements=serving.requirements(),
                                 run_id=self.run_id, registered_model_name=registered)
            finally:
                mlflow.set_tracking_uri(saved_uri)  # None unsets it again
                if saved_experiment is None:
                    del os.environ["MLFLOW_EXPERIMENT_ID"]
                else:
                    os.environ["MLFLOW_EXPERIMENT_ID"] = saved_experiment
        version = str(info.registered_model_version)
        for key, value in config.items():
            if isinstance(value, (str, int, float)):
                client.set_model_version_tag(registered, version, f"presto.{key}", str(value))
        if alias is not None:
            client.set_registered_model_alias(registered, alias, version)


def start_stage_run(root: Path, stage: str, params: dict[str, Any], fingerprint: str,
                    upstream_runs: dict[str, str], extra_tags: dict[str, str]) -> MlflowTracker:
    from mlflow.entities import Param

    client = _client()
    exp_id = experiment_id(root)
    tags = {TAG_STAGE: stage, TAG_FINGERPRINT: fingerprint, "presto.kind": "stage",
            "mlflow.source.git.commit": git_commit(root), **experiment_tags(), **extra_tags}
    tags.update({f"presto.upstream.{name}": run_id for name, run_id in upstream_runs.items()})
    invocation = invocation_id()
    parent = None
    if invocation:
        parent = parent_run(exp_id, invocation)
        tags.update({TAG_INVOCATION: invocation, TAG_PARENT: parent})
    if process := this_process():
        tags[TAG_PROCESS] = process
    for run_id in end_dead_runs(exp_id, stage, keep=parent):
        print(f"MLflow: run {run_id} of stage {stage} was left RUNNING by a process that is gone: marked KILLED",
              flush=True)
    run = client.create_run(exp_id, run_name=stage, tags=tags)
    values = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    for i in range(0, len(values), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run.info.run_id, params=values[i:i + 100])
    return MlflowTracker(os.environ["MLFLOW_TRACKING_URI"], run.info.run_id, parent)


def end_stage_run(tracker: MlflowTracker, ok: bool) -> None:
    """Close the stage run; the parent's status and end time follow its latest stage."""
    client = _client()
    status = "FINISHED" if ok else "FAILED"
    client.set_terminated(tracker.run_id, status)
    if tracker.parent_run_id:
        client.set_terminated(tracker.parent_run_id, status)
