#!/usr/bin/env python3
"""presto's production topology on this machine, on loopback: run pipeline stages against it, check where
they landed, tear it all down.

    .venv/bin/python infra/loopback.py --project . --run demo_corpus@gcs --run prepare@jobs

Brings up what infra/ describes for a team, at loopback scale:
- a Ray cluster of two nodes, each its own `ray start --block`: a head that runs no tasks (as in
  infra/kuberay/raycluster.yaml) and a worker node with the CPUs; token authentication on;
- `mlflow server` with a SQLite database and an artifacts folder it serves (clients upload through it,
  as they do through the production server to MinIO);
- `prefect server start` behind basic auth, with the `presto` work pool.

Each `--run TARGET@MODE` is `dvc repro TARGET` in the project (`all`: the whole pipeline) with
MLFLOW_TRACKING_URI and PREFECT_API_URL set to these servers and RAY_ADDRESS in the form MODE names:
`gcs` (host:port: the stage process joins the cluster as a driver), `client` (ray://) or `jobs` (http://:
each stage is a Ray job). Then it checks, through the servers' REST APIs, that every stage that ran is a
task on the worker node, a finished MLflow run and a completed Prefect flow run, and that the three UIs
answer. Everything it started is stopped at the end, also on failure or Ctrl-C, and it verifies that no
process of the topology is left and that its ports are free. `--report FILE` writes all of it as JSON;
`--hold` keeps the topology up (printing the environment to point a shell at it) until Ctrl-C;
`down --state DIR` ends what a killed run left behind.

Linux only. Ray 2.60 rewrites a node address of 127.0.0.1 into the machine's routable address, so the nodes
use the loopback aliases 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 over `lo`); the servers bind
127.0.0.1. Ray's gRPC servers still listen on every interface: they narrow to loopback only for a node whose
address is 127.0.0.1 (a stage's local Ray, flows/env.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from flows.env import OFFLINE_ENV
from flows.tracking import EXPERIMENT

HEAD_IP, WORKER_IP, HOST = "127.0.0.2", "127.0.0.3", "127.0.0.1"
MODES = ("gcs", "client", "jobs")
WORK_POOL = "presto"  # the pool infra/prefect/prefect.yaml deploys to
# Ray puts unix sockets under <temp dir>/session_<39 chars>/sockets/plasma_store; Linux caps the path at 107.
MAX_RAY_TEMP_DIR = 46
START_TIMEOUT_S = 240.0  # a loaded 2-core machine takes a minute or more to start all of it
STOP_GRACE_S = 25.0
BIN = Path(sys.executable).parent


class LoopbackError(RuntimeError):
    """The topology did not come up, a run failed, or a check did not hold: one line says which."""


@dataclass
class Service:
    name: str
    log: Path
    proc: subprocess.Popen


@dataclass
class Topology:
    state: Path
    project: Path
    worker_cpus: int
    object_store_bytes: int
    sessions: list[dict[str, Any]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    seen_ports: set[int] = field(default_factory=set)
    prefect_auth: str = field(default_factory=lambda: f"presto:{secrets.token_hex(16)}")

    # ---- layout -------------------------------------------------------------------------------------
    @property
    def ray_dir(self) -> Path:
        return self.state / "ray"

    @property
    def token_file(self) -> Path:
        return self.state / "ray-auth-token"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def gcs_address(self) -> str:
        return f"{HEAD_IP}:{self.ports['ray_gcs']}"

    @property
    def dashboard(self) -> str:
        return f"http://{HOST}:{self.ports['ray_dashboard']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}/api"

    def ray_address(self, mode: str) -> str:
        return {"gcs": self.gcs_address, "client": f"ray://{HOST}:{self.ports['ray_client']}",
                "jobs": self.dashboard}[mode]

    def _base_env(self) -> dict[str, str]:
        # Nothing of the caller's own servers or cluster leaks in; telemetry off as flows/env.py has it.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_", "PRESTO_"))}
        env.update(OFFLINE_ENV)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        return env

    def pipeline_env(self, mode: str) -> dict[str, str]:
        """What a team exports to point the pipeline at the topology (see infra/README.md)."""
        return self._base_env() | {"RAY_ADDRESS": self.ray_address(mode), "MLFLOW_TRACKING_URI": self.mlflow_uri,
                                   "PREFECT_API_URL": self.prefect_api, "PREFECT_API_AUTH_STRING": self.prefect_auth}

    @property
    def _prefect_headers(self) -> dict[str, str]:
        return {"Authorization": f"Basic {base64.b64encode(self.prefect_auth.encode()).decode()}"}

    def _node_env(self) -> dict[str, str]:
        # Ray nodes carry what the cluster's pods carry in production: the tracking server, and numba's cache
        # outside the virtualenv (processes compiling at once corrupt the shared one).
        return self._base_env() | {
            "MLFLOW_TRACKING_URI": self.mlflow_uri, "NUMBA_CACHE_DIR": str(self.state / "numba"),
            # The head's metrics exporters default to fixed ports that any other Ray on the machine also wants.
            "AUTOSCALER_METRIC_PORT": str(self.ports["ray_autoscaler_metrics"]),
            "DASHBOARD_METRIC_PORT": str(self.ports["ray_dashboard_metrics"]),
            # A node drains for 30 s on SIGTERM so that Ray Serve can move traffic; nothing here serves.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        }

    # ---- processes ----------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], env: dict[str, str], stop_group: bool = True) -> Service:
        """Each service is the leader of its own session: everything it spawns (Ray's workers included, which
        take process groups of their own) keeps that session id, which is how teardown finds it all.
        `stop_group`: SIGTERM its whole process group, not only the leader."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=self.state, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append({"name": name, "sid": proc.pid, "start_ticks": _start_ticks(proc.pid),
                              "stop_group": stop_group})
        self._save()
        return Service(name, log, proc)

    def _save(self) -> None:
        record = {"sessions": self.sessions, "ports": self.ports, "seen_ports": sorted(self.seen_ports)}
        tmp = self.state / "topology.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(self.state / "topology.json")

    def _alive_or_fail(self, svc: Service) -> None:
        if svc.proc.poll() is not None:
            raise LoopbackError(f"{svc.name} exited with {svc.proc.returncode} while starting; "
                                f"its log ({svc.log}) ends with:\n{_tail(svc.log)}")

    def _wait(self, what: str, svc: Service, ready, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive_or_fail(svc)
            if ready():
                return
            time.sleep(0.5)
        raise LoopbackError(f"{what} not ready after {timeout:.0f} s; {svc.log} ends with:\n{_tail(svc.log)}")

    # ---- up -----------------------------------------------------------------------------------------
    def up(self) -> None:
        if len(str(self.ray_dir)) > MAX_RAY_TEMP_DIR:
            raise LoopbackError(f"--state {self.state}: too long for Ray's unix sockets (at most "
                                f"{MAX_RAY_TEMP_DIR - 4} characters); use a short folder such as /tmp/presto-lb")
        for d in (self.ray_dir, self.state / "mlflow" / "artifacts", self.state / "prefect"):
            d.mkdir(parents=True, exist_ok=True)
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        names = ("ray_gcs", "ray_dashboard", "ray_client", "ray_agent_head", "ray_agent_worker",
                 "ray_autoscaler_metrics", "ray_dashboard_metrics", "mlflow", "prefect")
        self.ports.update(zip(names, _free_ports(len(names))))
        self._save()

        head = self._start("ray-head", [
            str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", HEAD_IP,
            "--port", str(self.ports["ray_gcs"]), "--dashboard-host", HOST,
            "--dashboard-port", str(self.ports["ray_dashboard"]),
            "--ray-client-server-port", str(self.ports["ray_client"]),
            "--dashboard-agent-listen-port", str(self.ports["ray_agent_head"]),
            "--num-cpus", "0", "--num-gpus", "0", "--object-store-memory", str(self.object_store_bytes),
            "--temp-dir", str(self.ray_dir), "--disable-usage-stats",
        ], self._node_env(), stop_group=False)
        mlflow = self._start("mlflow", [
            sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(self.ports["mlflow"]),
            "--backend-store-uri", f"sqlite:///{self.state / 'mlflow' / 'mlflow.db'}",
            "--artifacts-destination", (self.state / "mlflow" / "artifacts").as_uri(), "--workers", "1",
        ], self._base_env())
        prefect = self._start("prefect", [
            sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(self.ports["prefect"]),
        ], self._base_env() | {"PREFECT_HOME": str(self.state / "prefect"),
                               "PREFECT_SERVER_API_AUTH_STRING": self.prefect_auth})

        self._wait("Ray head (GCS)", head, lambda: _port_open(HEAD_IP, self.ports["ray_gcs"]))
        worker = self._start("ray-worker", [
            str(BIN / "ray"), "start", "--block", "--address", self.gcs_address, "--node-ip-address", WORKER_IP,
            "--dashboard-agent-listen-port", str(self.ports["ray_agent_worker"]),
            "--num-cpus", str(self.worker_cpus), "--object-store-memory", str(self.object_store_bytes),
            "--disable-usage-stats",
        ], self._node_env(), stop_group=False)
        self._wait("MLflow server", mlflow, lambda: _status(f"{self.mlflow_uri}/health") == 200)
        self._wait("Prefect server", prefect, lambda: _status(f"{self.prefect_api}/health") == 200)
        self._wait("the Ray cluster's two nodes", worker, lambda: len(self.ray_nodes(alive_only=True)) == 2)
        pool = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", WORK_POOL, "--type", "process",
                               "--overwrite"], cwd=self.state, capture_output=True, text=True, timeout=120,
                              env=self.pipeline_env("gcs") | {"PREFECT_HOME": str(self.state / "prefect-cli")})
        if pool.returncode != 0:
            raise LoopbackError(f"prefect work-pool create {WORK_POOL} failed: {(pool.stdout + pool.stderr)[-2000:]}")
        self.note_ports()
        _say(f"up: Ray {self.gcs_address} (dashboard {self.dashboard}), MLflow {self.mlflow_uri}, "
             f"Prefect {self.prefect_api} (work pool {WORK_POOL}); state in {self.state}")

    # ---- runs ---------------------------------------------------------------------------------------
    def run(self, target: str, mode: str, timeout: float) -> None:
        argv = [sys.executable, "-m", "dvc", "repro"] + ([] if target == "all" else [target])
        _say(f"run: dvc repro {'' if target == 'all' else target} with RAY_ADDRESS={self.ray_address(mode)}")
        log = self.logs / f"run-{target}-{mode}.log"
        proc = subprocess.Popen(argv, cwd=self.project, env=self.pipeline_env(mode), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.sessions.append({"name": f"run-{target}", "sid": proc.pid, "start_ticks": _start_ticks(proc.pid),
                              "stop_group": True})
        self._save()
        # Streamed to the console as well as to the log: a whole pipeline takes a while.
        copier = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
        copier.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LoopbackError(f"dvc repro {target} ({mode}) still running after {timeout:.0f} s; see {log}") from None
        copier.join(timeout=10)
        self.note_ports()
        if code != 0:
            raise LoopbackError(f"dvc repro {target} ({mode}) failed with {code}; {log} ends with:\n{_tail(log)}")

    # ---- what the servers say -----------------------------------------------------------------------
    def _ray_get(self, path: str) -> Any:
        return _get_json(f"{self.dashboard}{path}", {"Authorization": f"Bearer {self.token_file.read_text()}"})

    def ray_nodes(self, alive_only: bool = False) -> list[dict[str, Any]]:
        try:
            rows = self._ray_get("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []  # the dashboard is still starting
        nodes = [{"node_id": n["node_id"], "ip": n["node_ip"], "head": n["is_head_node"], "state": n["state"],
                  "cpus": n["resources_total"].get("CPU", 0.0)} for n in rows]
        return [n for n in nodes if n["state"] == "ALIVE"] if alive_only else nodes

    def ray_stage_tasks(self) -> list[dict[str, Any]]:
        rows = self._ray_get("/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
        return [{"stage": t["name"].removeprefix("stage:"), "state": t["state"], "node_id": t["node_id"],
                 "job_id": t["job_id"]} for t in rows if t["name"].startswith("stage:")]

    def ray_jobs(self) -> list[dict[str, Any]]:
        return [{"type": j["type"], "job_id": j.get("job_id"), "submission_id": j.get("submission_id"),
                 "status": j["status"], "stage": (j.get("metadata") or {}).get("presto.stage")}
                for j in self._ray_get("/api/jobs/")]

    def mlflow_stage_runs(self) -> list[dict[str, Any]]:
        found = _get_json(f"{self.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}",
                          missing_ok=True)
        if not found:
            return []
        body = {"experiment_ids": [found["experiment"]["experiment_id"]], "max_results": 1000,
                "filter": "tags.`presto.kind` = 'stage'"}
        runs = []
        for r in _post_json(f"{self.mlflow_uri}/api/2.0/mlflow/runs/search", body).get("runs", []):
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            listing = _get_json(f"{self.mlflow_uri}/api/2.0/mlflow/artifacts/list?run_id={r['info']['run_id']}")
            runs.append({"run_id": r["info"]["run_id"], "stage": tags.get("presto.stage"),
                         "status": r["info"]["status"], "prefect_flow_run": tags.get("prefect.flow_run_id"),
                         "artifacts": [f["path"] for f in listing.get("files", [])]})
        return runs

    def prefect_flow_runs(self) -> list[dict[str, Any]]:
        return [{"id": r["id"], "name": r["name"], "state": r["state_type"]}
                for r in _post_json(f"{self.prefect_api}/flow_runs/filter", {"limit": 200}, self._prefect_headers)]

    def check(self, executed: list[dict[str, Any]]) -> dict[str, Any]:
        """Evidence, from the servers themselves, that each stage that ran did so on this topology."""
        failures: list[str] = []
        nodes = self.ray_nodes()
        workers = {n["node_id"]: n for n in nodes if not n["head"] and n["state"] == "ALIVE"}
        if len([n for n in nodes if n["state"] == "ALIVE"]) != 2 or len(workers) != 1:
            failures.append(f"the Ray cluster should have a head and one worker node alive: {nodes}")
        if not executed:
            failures.append("no stage ran: every target was up to date")
        tasks = self._wait_for_tasks({e["stage"] for e in executed})
        jobs = self.ray_jobs()
        flow_runs = {r["id"]: r for r in self.prefect_flow_runs()}
        stages = []
        for e in executed:
            mine = [t for t in tasks if t["stage"] == e["stage"]]
            on_worker = [t for t in mine if t["node_id"] in workers and t["state"] == "FINISHED"]
            flow = flow_runs.get(e["prefect_flow_run"] or "")
            entry = {**e, "ray_tasks": [{"state": t["state"], "node_ip": workers.get(t["node_id"], {}).get("ip"),
                                         "job_id": t["job_id"]} for t in mine],
                     "prefect_state": flow and flow["state"]}
            if not on_worker:
                failures.append(f"stage {e['stage']}: no finished Ray task stage:{e['stage']} on the worker node "
                                f"(tasks: {mine})")
            if e["status"] != "FINISHED":
                failures.append(f"stage {e['stage']}: MLflow run {e['run_id']} is {e['status']}")
            if not e["artifacts"]:
                failures.append(f"stage {e['stage']}: MLflow run {e['run_id']} holds no artifacts")
            if not flow or flow["name"] != e["stage"] or flow["state"] != "COMPLETED":
                failures.append(f"stage {e['stage']}: Prefect flow run {e['prefect_flow_run']} is {flow}")
            if e["mode"] == "jobs":
                submitted = [j for j in jobs if j["stage"] == e["stage"] and j["status"] == "SUCCEEDED"]
                entry["ray_jobs"] = submitted
                if not submitted:
                    failures.append(f"stage {e['stage']}: no succeeded Ray job for it on the Jobs API ({jobs})")
            stages.append(entry)
        pool = _get_json(f"{self.prefect_api}/work_pools/{WORK_POOL}", self._prefect_headers, missing_ok=True)
        if not pool:
            failures.append(f"Prefect work pool {WORK_POOL} is missing")
        uis = {name: _status(url) for name, url in (("ray_dashboard", f"{self.dashboard}/"),
                                                    ("mlflow", f"{self.mlflow_uri}/"),
                                                    ("prefect", f"http://{HOST}:{self.ports['prefect']}/"))}
        failures += [f"the {name} UI answered {code}" for name, code in uis.items() if code != 200]
        # The APIs refuse a caller without the credentials the pipeline was given.
        anonymous = {"ray": _status(f"{self.dashboard}/api/v0/nodes"),
                     "prefect": _status(f"{self.prefect_api}/work_pools/{WORK_POOL}")}
        failures += [f"the {name} API let an anonymous caller in ({code})" for name, code in anonymous.items()
                     if code != 401]
        return {"ray_nodes": nodes, "stages": stages, "work_pool": pool and {"name": pool["name"], "type": pool["type"]},
                "uis": uis, "anonymous_api_calls": anonymous, "failures": failures}

    def _wait_for_tasks(self, stages: set[str], timeout: float = 30.0) -> list[dict[str, Any]]:
        # Ray reports task events to the dashboard asynchronously: a just-finished task can lag a second.
        deadline = time.monotonic() + timeout
        while True:
            tasks = self.ray_stage_tasks()
            done = {t["stage"] for t in tasks if t["state"] == "FINISHED"}
            if stages <= done or time.monotonic() > deadline:
                return tasks
            time.sleep(1)

    def note_ports(self) -> None:
        """Every port a process of the topology listens on, so teardown can check each is free again."""
        for proc in _processes_of(self.sessions):
            try:
                self.seen_ports |= {c.laddr.port for c in proc.net_connections("inet")
                                    if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                continue  # it just exited
        self._save()

    # ---- down ---------------------------------------------------------------------------------------
    def down(self) -> dict[str, Any]:
        return teardown(self.state, self.sessions, sorted(self.seen_ports | set(self.ports.values())))


def teardown(state: Path, sessions: list[dict[str, Any]], ports: list[int],
             grace_s: float = STOP_GRACE_S) -> dict[str, Any]:
    """Stop the sessions in reverse order of start (runs, servers, the worker node, the head): SIGTERM, a grace
    period, then SIGKILL for whatever is left of the session. Report any survivor and any port still held."""
    killed = []
    for s in reversed(sessions):
        if not _session_alive(s):
            continue
        # Ray's `start --block` stops its node's processes in order itself; signalling them all at once races it.
        try:
            (os.killpg if s["stop_group"] else os.kill)(s["sid"], signal.SIGTERM)
        except ProcessLookupError:
            pass  # the leader or its group is gone; the session's other members are killed below
        deadline = time.monotonic() + grace_s
        while _session_alive(s) and time.monotonic() < deadline:
            time.sleep(0.25)
        for proc in _processes_of([s]):
            try:
                killed.append(f"{proc.pid} {proc.name()}")
                proc.kill()
            except psutil.Error:
                pass
    psutil.wait_procs(_processes_of(sessions), timeout=10)
    left = [f"{p.pid} {_describe(p)}" for p in _processes_of(sessions)]
    held, taken = _listening(ports, state)
    return {"killed_after_grace": killed, "left_processes": left, "ports_checked": ports,
            "ports_still_listening": held, "ports_taken_by_others": taken, "clean": not left and not held}


# ---- helpers --------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int:
    return int(_stat_fields(pid)[19])


def _session_alive(s: dict[str, Any]) -> bool:
    return bool(_processes_of([s]))


def _processes_of(sessions: list[dict[str, Any]]) -> list[psutil.Process]:
    """Live processes in the recorded sessions. Linux never hands out a pid that is still some live process's
    session id, so a member of a session is ours; a leader is ours only if it started when we recorded it."""
    sids = {s["sid"]: s["start_ticks"] for s in sessions}
    found = []
    for pid in psutil.pids():
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        sid, ticks = int(fields[3]), int(fields[19])
        if sid in sids and (pid != sid or ticks == sids[sid]) and fields[0] != "Z":
            found.append(psutil.Process(pid))
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:200] or proc.name()
    except psutil.Error:
        return "?"


def _listening(ports: list[int], state: Path) -> tuple[list[str], list[str]]:
    """Listeners on `ports`: (ours, others'). On a shared machine another program may take a port as soon as
    we free it; a listener is ours if it runs in, or names, the state folder (every service starts there)."""
    wanted = set(ports)
    ours, others = [], []
    for c in psutil.net_connections("inet"):
        if c.status != psutil.CONN_LISTEN or c.laddr.port not in wanted:
            continue
        if not c.pid:
            others.append(f"{c.laddr.ip}:{c.laddr.port} (owner not visible)")
            continue
        try:
            proc = psutil.Process(c.pid)
            mine = proc.cwd().startswith(str(state)) or str(state) in " ".join(proc.cmdline())
            line = f"{c.laddr.ip}:{c.laddr.port} pid {c.pid} {_describe(proc)}"
        except (psutil.Error, ValueError):
            continue  # gone meanwhile
        (ours if mine else others).append(line)
    return ours, others


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on every interface (Ray's servers listen on all of them)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ValueError):
        return 0


def _get_json(url: str, headers: dict[str, str] | None = None, missing_ok: bool = False) -> Any:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        if missing_ok and err.code == 404:
            return None
        raise LoopbackError(f"GET {url}: HTTP {err.code} {err.read()[:300]!r}") from None


def _post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"} | (headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise LoopbackError(f"POST {url}: HTTP {err.code} {err.read()[:300]!r}") from None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _tee(stream, log: Path) -> None:
    with open(log, "wb") as out:
        for line in iter(stream.readline, b""):
            out.write(line)
            out.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _say(message: str) -> None:
    print(f"loopback: {message}", file=sys.stderr, flush=True)


def _parse_run(text: str) -> tuple[str, str]:
    target, _, mode = text.partition("@")
    mode = mode or "gcs"
    if not target or mode not in MODES:
        raise argparse.ArgumentTypeError(f"--run {text!r}: expected STAGE[@MODE] with MODE one of {', '.join(MODES)}")
    return target, mode


def _stop(signum, frame) -> None:
    raise LoopbackError(f"stopped by signal {signum}")  # unwinds through the teardown in main's `finally`


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    down = sub.add_parser("down", help="end what a killed run left behind (its --state folder)")
    down.add_argument("--state", type=Path, required=True)
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="the DVC project to run (default: here)")
    parser.add_argument("--run", type=_parse_run, action="append", default=[], metavar="STAGE[@MODE]",
                        help="dvc repro STAGE (or `all`) with RAY_ADDRESS of MODE gcs|client|jobs; repeatable")
    parser.add_argument("--state", type=Path, help="folder for logs, databases and Ray's sockets (short path; "
                                                    "default: a new one under /tmp)")
    parser.add_argument("--report", type=Path, help="write what was observed here, as JSON")
    parser.add_argument("--worker-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the worker node")
    parser.add_argument("--object-store-mb", type=int, default=256, help="Ray object store per node")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="seconds allowed to each run")
    parser.add_argument("--hold", action="store_true", help="keep the topology up until Ctrl-C")
    args = parser.parse_args(argv)

    if args.command == "down":
        if not (args.state / "topology.json").is_file():
            parser.error(f"--state {args.state}: no topology.json there (not a loopback state folder)")
        record = json.loads((args.state / "topology.json").read_text())
        result = teardown(args.state.resolve(), record["sessions"],
                          sorted(set(record["seen_ports"]) | set(record["ports"].values())))
        _say(json.dumps(result))
        return 0 if result["clean"] else 1

    project = args.project.resolve()
    if not (project / "dvc.yaml").is_file():
        parser.error(f"--project {project}: no dvc.yaml there")
    if args.worker_cpus < 1:
        parser.error(f"--worker-cpus {args.worker_cpus}: the worker node needs at least 1 CPU to run stages")
    if args.object_store_mb < 80:
        parser.error(f"--object-store-mb {args.object_store_mb}: Ray needs at least 80")
    state = (args.state or Path(tempfile.mkdtemp(prefix="presto-lb-", dir="/tmp"))).resolve()
    state.mkdir(parents=True, exist_ok=True)
    topo = Topology(state, project, args.worker_cpus, args.object_store_mb * 2**20)
    report: dict[str, Any] = {"state": str(state), "project": str(project), "runs": [], "ok": False}
    signal.signal(signal.SIGTERM, _stop)
    # A shell starts a background job (`... &`, nohup) with SIGINT ignored and Python keeps it so: --hold would
    # then never end on Ctrl-C or `kill -INT`, and its topology would outlive it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        topo.up()
        report["ports"] = dict(topo.ports)
        report["seconds_up"] = round(time.monotonic() - started, 1)
        executed: list[dict[str, Any]] = []
        for target, mode in args.run:
            before = {r["run_id"] for r in topo.mlflow_stage_runs()}
            t0 = time.monotonic()
            topo.run(target, mode, args.run_timeout)
            new = [r | {"mode": mode} for r in topo.mlflow_stage_runs() if r["run_id"] not in before]
            executed += new
            report["runs"].append({"target": target, "mode": mode, "ray_address": topo.ray_address(mode),
                                   "seconds": round(time.monotonic() - t0, 1), "stages": [r["stage"] for r in new]})
        if args.run:
            report["checks"] = topo.check(executed)
            if report["checks"]["failures"]:
                raise LoopbackError("; ".join(report["checks"]["failures"]))
        if args.hold:
            env = topo.pipeline_env("gcs")
            for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI",
                        "PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
                print(f"export {key}={env[key]}", flush=True)
            _say(f"holding; Ctrl-C tears it down (Ray Jobs API: {topo.dashboard}, client: {topo.ray_address('client')})")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass  # the way out of --hold
        report["ok"] = True
    except BaseException as err:
        report["error"] = f"{type(err).__name__}: {err}"
        _say(f"error: {report['error']}")
        if not isinstance(err, (LoopbackError, KeyboardInterrupt, SystemExit)):
            raise  # a bug of this script: its traceback, after the teardown below
    finally:
        # A second Ctrl-C or SIGTERM must not cut the teardown short and leave half the topology running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        report["teardown"] = topo.down()
        report["ok"] = report["ok"] and report["teardown"]["clean"]
        report["seconds"] = round(time.monotonic() - started, 1)
        if args.report:
            args.report.write_text(json.dumps(report, indent=2))
        state_note = f"logs in {state / 'logs'}"
        if report["teardown"]["clean"]:
            _say(f"down: nothing left running, ports free; {state_note}")
        else:
            _say(f"down: NOT clean: {report['teardown']}; {state_note}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
