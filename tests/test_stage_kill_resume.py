"""SIGKILL of a whole `presto stage train_dit` process (what `dvc repro` runs) mid-training, on a tiny project:

1. run A is SIGKILLed once Ray Train has registered a checkpoint;
2. run B, with a changed param (another fingerprint), starts fresh instead of resuming A's stale run; its
   learning rate is absurd, so it also shows what a diverged loss looks like from the command line;
3. run C, with A's params again, resumes A's run from its checkpoint and finishes.

Real CLI, Prefect (ephemeral server), local Ray + Ray Train and MLflow (SQLite); encode's output is written
directly (test_train_dit_stage's synthetic one), so only train_dit runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from test_train_dit_stage import make_encode_output, tiny_params

pytestmark = pytest.mark.integration

STEPS, CKPT_EVERY = 100, 10
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's reported checkpoints
PRESTO = Path(sys.executable).parent / "presto"


def _write_params(root: Path, **train_dit) -> None:
    params = tiny_params(steps=STEPS, ckpt_every=CKPT_EVERY, log_every=CKPT_EVERY, val_every=STEPS, samples=0,
                         **train_dit)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


def _start(root: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_ADDRESS", "PRESTO_"))}
    env["PRESTO_ROOT"] = str(root)
    # Its own session: the Prefect server and Ray processes it starts can be cleaned up by process group.
    return subprocess.Popen([str(PRESTO), "stage", "train_dit"], cwd=root, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        _kill_group(proc)
    return log.read_text()


def _kill_group(proc: subprocess.Popen) -> None:
    """What a killed run leaves behind (its temporary Prefect server, Ray's agents) goes too."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _is_training(process: psutil.Process) -> bool:
    try:
        return any(name in " ".join(process.cmdline()) for name in ("RayTrainWorker", "TrainController"))
    except psutil.Error:
        return False


def _checkpoint_steps(root: Path) -> dict[str, list[int]]:
    """Fingerprint -> steps of the checkpoints Ray Train registered for that run."""
    out = {}
    for path in (root / "checkpoints" / "train_dit").glob(f"*/*/{SNAPSHOT}"):
        try:
            out[path.parent.name] = [r["metrics"]["step"] for r in json.loads(path.read_text())["checkpoint_results"]]
        except json.JSONDecodeError:  # caught mid-write
            continue
    return out


def _resumed_from(root: Path) -> list[list[float]]:
    """For each MLflow stage run, oldest first: the resumed_from_step values it logged."""
    db = sqlite3.connect(root / ".mlflow" / "mlflow.db")
    runs = db.execute("select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
                      "where t.key = 'presto.kind' and t.value = 'stage' order by r.start_time").fetchall()
    return [[v for (v,) in db.execute("select value from metrics where run_uuid=? and key='resumed_from_step' "
                                      "order by step", run)] for run in runs]


def _statuses(root: Path) -> list[str]:
    """The status of each MLflow stage run, oldest first."""
    db = sqlite3.connect(root / ".mlflow" / "mlflow.db")
    return [s for (s,) in db.execute("select r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                                     "where t.key = 'presto.kind' and t.value = 'stage' order by r.start_time")]


def test_killed_stage_resumes_and_a_changed_param_starts_fresh(tmp_path: Path) -> None:
    root = tmp_path
    make_encode_output(root / "artifacts")
    _write_params(root)

    # A: killed (the presto process only, like the OOM killer would) once a checkpoint is registered.
    log_a = root / "a.log"
    proc = _start(root, log_a)
    try:
        deadline = time.monotonic() + 480
        while not any(_checkpoint_steps(root).values()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"run A ended before it could be killed:\n{log_a.read_text()[-3000:]}"
        training = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_training(p)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Ray's training processes notice that their node is gone and stop (after a few more steps, maybe a
        # checkpoint): none may go on writing into the run that C resumes.
        _, alive = psutil.wait_procs(training, timeout=60)
        assert training and not alive, f"Ray Train processes outlived the killed run: {alive}"
    finally:
        _kill_group(proc)
    out_a = log_a.read_text()
    (fp_a, at_kill), = _checkpoint_steps(root).items()
    assert at_kill and max(at_kill) < STEPS
    assert list((root / "artifacts").glob(".train_dit.tmp-*")), "A died without cleaning up"

    # B: another learning rate, so another fingerprint: it must not resume A's run. It diverges at once.
    _write_params(root, lr=1e30)
    out_b = _finish(_start(root, root / "b.log"), root / "b.log")
    assert re.search(r"error: stage train_dit: train_dit: step 1: loss = (nan|inf).*last good checkpoint is kept",
                     out_b), out_b[-3000:]
    assert fp_a in _checkpoint_steps(root), "A's checkpoints survive B"

    # C: A's params again: same fingerprint, so it resumes A's run from its newest checkpoint.
    _write_params(root)
    proc = _start(root, root / "c.log")
    out_c = _finish(proc, root / "c.log")
    assert proc.returncode == 0, out_c[-3000:]
    metrics = json.loads((root / "artifacts" / "train_dit" / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert resumed == max(at_kill) < STEPS
    assert metrics["steps"] == STEPS
    assert f"resumes from step {int(resumed)}" in out_c
    # The log is readable: each progress line once (Ray Train's print patch doubled them), and no warning every
    # second from Train's placement-group cleaner, which cannot reach the state API of a dashboard-less Ray.
    progress = re.findall(r"train_dit: step \d+/\d+ .*", out_c)
    assert progress and len(progress) == len(set(progress)), progress
    assert "Failed to query Ray Train Controller" not in out_a + out_b + out_c

    # What each run told MLflow when its workers started: A and B at step 0, C where A had got to.
    assert _resumed_from(root) == [[0.0], [0.0], [resumed, resumed]]
    # A could not close its MLflow run; B found its process gone and marked it KILLED.
    assert _statuses(root) == ["KILLED", "FAILED", "FINISHED"]
    assert re.search(r"MLflow: run \w+ of stage train_dit was left RUNNING by a process that is gone", out_b)
    assert not (root / "checkpoints" / "train_dit").exists(), "a finished stage drops its checkpoints"
    assert not list((root / "artifacts").glob(".train_dit.*")), "A's temporary out folder is gone"
