"""infra/loopback.py on a tiny project: the production topology on loopback (a two-node Ray cluster, an MLflow
server, a Prefect server), two stages run against it through `dvc repro`, then torn down. No mocks."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

# The smallest corpus that still renders and prepares real audio (demo_corpus renders at least one batch).
TINY = {"demo_corpus": {"minutes": 0.3, "max_piece_seconds": 12}}
RUNS = {"demo_corpus": "gcs", "prepare": "jobs"}  # the driver joins the cluster; the Ray Jobs API


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_ADDRESS", "PRESTO_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _project(root: Path) -> Path:
    """The repository's pipeline files and code, git + DVC initialised, tiny params (as the pipeline
    integration test builds its project)."""
    root.mkdir()
    for name in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("presto", "stages", "flows", "profiles"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    data = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        data[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    return root


def _ours(state: Path, sessions: list[dict]) -> list[str]:
    """Processes of the topology still alive: in one of its sessions, or running in its state folder."""
    sids = {s["sid"] for s in sessions}
    found = []
    for proc in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            in_state = (proc.info["cwd"] or "").startswith(str(state))
            if os.getsid(proc.pid) in sids or in_state:
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:150]}")
        except (psutil.Error, OSError):
            continue
    return found


class _Held:
    """infra/loopback.py running with --hold: its output collected as it comes, until it says it holds."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_holding(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while not any("loopback: holding" in line for line in self.err):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.err)[-4000:]
            time.sleep(1)
        return dict(line.removeprefix("export ").strip().split("=", 1) for line in self.out
                    if line.startswith("export "))

    def stop(self, timeout: float) -> int:
        """Ctrl-C, as a person at the terminal ends --hold."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(timeout=timeout)
        for t in self.readers:
            t.join(timeout=10)
        return code


def _request(url: str, body: dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} | (headers or {}))
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_loopback_topology_runs_stages_on_the_cluster_and_leaves_nothing(tmp_path: Path) -> None:
    project = _project(tmp_path / "project")
    # Short on purpose: Ray's unix socket paths live under it (pytest's tmp_path is too long).
    state = Path(tempfile.mkdtemp(prefix="presto-lb-", dir="/tmp"))
    report_file = tmp_path / "report.json"
    cmd = [sys.executable, str(REPO / "infra" / "loopback.py"), "--project", str(project), "--state", str(state),
           "--report", str(report_file), "--hold"]
    for stage, mode in RUNS.items():
        cmd += ["--run", f"{stage}@{mode}"]
    held = _Held(cmd)
    try:
        exported = held.wait_holding(timeout=480)
        ports = json.loads((state / "topology.json").read_text())["ports"]
        assert exported["RAY_ADDRESS"] == f"127.0.0.2:{ports['ray_gcs']}"
        assert exported["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
        assert exported["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"

        # Ray, from its dashboard's state API: a head without CPUs and a worker node; each stage's task ran on
        # the worker node (a local ray.init would have left no trace here).
        dashboard = f"http://127.0.0.1:{ports['ray_dashboard']}"
        token = {"Authorization": f"Bearer {Path(exported['RAY_AUTH_TOKEN_PATH']).read_text()}"}
        nodes = _request(f"{dashboard}/api/v0/nodes?detail=1", headers=token)["data"]["result"]["result"]
        assert sorted((n["is_head_node"], n["node_ip"], n["state"]) for n in nodes) == [
            (False, "127.0.0.3", "ALIVE"), (True, "127.0.0.2", "ALIVE")]
        assert [n["resources_total"].get("CPU", 0) for n in nodes if n["is_head_node"]] == [0]
        worker = next(n["node_id"] for n in nodes if not n["is_head_node"])
        tasks = _request(f"{dashboard}/api/v0/tasks?limit=10000&detail=1", headers=token)["data"]["result"]["result"]
        ran = sorted((t["name"], t["state"], t["node_id"] == worker) for t in tasks if t["name"].startswith("stage:"))
        assert ran == [(f"stage:{s}", "FINISHED", True) for s in sorted(RUNS)]
        jobs = _request(f"{dashboard}/api/jobs/", headers=token)
        submitted = [j for j in jobs if j["type"] == "SUBMISSION"]
        assert [(j["metadata"]["presto.stage"], j["status"]) for j in submitted] == [("prepare", "SUCCEEDED")]
        prepare_task = next(t for t in tasks if t["name"] == "stage:prepare")
        assert prepare_task["job_id"] == submitted[0]["job_id"], "the prepare task ran inside that Ray job"

        # MLflow, from its REST API: one finished run per stage, artifacts uploaded through the server.
        mlflow = exported["MLFLOW_TRACKING_URI"]
        exp = _request(f"{mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=presto")["experiment"]
        runs = _request(f"{mlflow}/api/2.0/mlflow/runs/search",
                        {"experiment_ids": [exp["experiment_id"]], "filter": "tags.`presto.kind` = 'stage'"})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
        assert sorted((t["presto.stage"], r["info"]["status"]) for t, r in zip(tags, runs)) == \
            [(s, "FINISHED") for s in sorted(RUNS)]
        for r in runs:
            listing = _request(f"{mlflow}/api/2.0/mlflow/artifacts/list?run_id={r['info']['run_id']}")
            assert "metrics.json" in {f["path"] for f in listing["files"]}
            assert list((state / "mlflow" / "artifacts").glob(f"*/{r['info']['run_id']}/artifacts/metrics.json"))
        assert not (project / ".mlflow").exists(), "nothing went to the project's default store"

        # Prefect, from its REST API (behind basic auth): a completed flow run per stage, the ones the MLflow
        # runs name; the work pool; no ephemeral server in the project.
        prefect = exported["PREFECT_API_URL"]
        basic = {"Authorization": "Basic " + base64.b64encode(exported["PREFECT_API_AUTH_STRING"].encode()).decode()}
        flow_runs = {r["id"]: r for r in _request(f"{prefect}/flow_runs/filter", {}, basic)}
        assert sorted((r["name"], r["state_type"]) for r in flow_runs.values()) == \
            [(s, "COMPLETED") for s in sorted(RUNS)]
        assert {flow_runs[t["prefect.flow_run_id"]]["name"] for t in tags} == set(RUNS)
        assert _request(f"{prefect}/work_pools/presto", headers=basic)["type"] == "process"
        assert not (project / ".prefect" / "prefect.db").exists()

        code = held.stop(timeout=120)
        report = json.loads(report_file.read_text())
        assert code == 0 and report["ok"], f"{report.get('error')}\n{''.join(held.err)[-4000:]}"
        # The script's own checks agree, and it saw the UIs answer.
        checks = report["checks"]
        assert checks["failures"] == []
        assert {s["stage"]: s["mode"] for s in checks["stages"]} == RUNS
        assert checks["uis"] == {"ray_dashboard": 200, "mlflow": 200, "prefect": 200}
        assert checks["anonymous_api_calls"] == {"ray": 401, "prefect": 401}

        # Teardown: no process of the topology alive, none of its ports held.
        record = json.loads((state / "topology.json").read_text())
        assert {s["name"] for s in record["sessions"]} >= {"ray-head", "ray-worker", "mlflow", "prefect"}
        assert _ours(state, record["sessions"]) == []
        teardown = report["teardown"]
        assert teardown["clean"] and teardown["left_processes"] == [] and teardown["ports_still_listening"] == []
        assert set(record["ports"].values()) <= set(teardown["ports_checked"])
        for port in record["ports"].values():
            for c in psutil.net_connections("inet"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                    assert c.pid and not psutil.Process(c.pid).cwd().startswith(str(state)), port
    finally:
        held.stop(timeout=120)
        if (state / "topology.json").is_file():  # safety net for a failed run: the machine is shared
            subprocess.run([sys.executable, str(REPO / "infra" / "loopback.py"), "down", "--state", str(state)],
                           env=_env(), capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
