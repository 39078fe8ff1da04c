"""infra/: every file parses, and the pieces agree with each other and with the project (versions, image,
ports, secrets, databases, buckets, the work pool, what a stage asks of a node)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from flows.env import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _load(path: Path):
    """A module from a file of infra/, which is not a package (its scripts run as files)."""
    spec = importlib.util.spec_from_file_location(f"infra_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


loopback = _load(INFRA / "loopback.py")

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
PINS = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
IMAGE = f"presto-gpu:{VERSION}"


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m[0].upper(), m[1].strip()) for m in re.findall(r"^(\w+)\s+(.*)$", text, flags=re.M)]


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _copy_sources(args: str) -> list[str]:
    return args.split()[:-1]


def _env_pairs(args: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in shlex.split(args))


def _gpu_profile_needs() -> tuple[float, float]:
    """The most CPUs and GPUs one stage task of profiles/gpu.yaml asks for."""
    profile = yaml.safe_load((REPO / "profiles" / "gpu.yaml").read_text())
    asks = [v["resources"] for v in profile.values() if isinstance(v, dict) and "resources" in v]
    asks += [{"cpus": v["cpus_per_worker"], "gpus": v["gpus_per_worker"]}
             for v in profile.values() if isinstance(v, dict) and "gpus_per_worker" in v]
    return max(a["cpus"] for a in asks), max(a["gpus"] for a in asks)


# ---- the GPU image -------------------------------------------------------------------------------------------
def test_gpu_image_is_cuda_with_python_311_and_the_pinned_project() -> None:
    ins = _dockerfile(INFRA / "Dockerfile")
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    build, final = _stages(ins)
    # torch's PyPI wheels are built for CUDA 12.8: the base image carries the same CUDA.
    cuda = ".".join(PINS["nvidia-cuda-runtime-cu12"].split(".")[:2])
    assert args["CUDA_VERSION"].startswith(f"{cuda}.")
    assert build[0][1].startswith("nvidia/cuda:${CUDA_VERSION}-devel-") and build[0][1].endswith(" AS build")
    assert final[0][1].startswith("nvidia/cuda:${CUDA_VERSION}-runtime-")
    assert PROJECT["requires-python"] == ">=3.11,<3.12"
    runs = [a for k, a in build if k == "RUN"]
    assert any("python3.11 -m venv /opt/venv" in r for r in runs)
    assert "pip install -r constraints.txt" in runs
    assert "pip install -c constraints.txt ." in runs, "the project itself installs against the pins"
    copies = [src for k, a in build if k == "COPY" for src in _copy_sources(a)]
    assert copies[0] == "constraints.txt", "the pinned set is installed before the code is copied"
    assert {"pyproject.toml", "README.md", "presto", "stages", "flows"} <= set(copies)
    # flash-attn: only on request, at a version the gpu extra accepts.
    assert args["FLASH_ATTN"] == "0"
    flash = next(r for r in runs if "flash-attn" in r)
    assert flash.startswith('if [ "$FLASH_ATTN" = 1 ]; then')
    [extra] = PROJECT["optional-dependencies"]["gpu"]
    assert Requirement(extra).name == "flash-attn" and Requirement(extra).specifier.contains(args["FLASH_ATTN_VERSION"])
    # The runtime stage: the venv, the system tools the stages and KubeRay's probes call, telemetry off.
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final
    apt = " ".join(a for k, a in final if k == "RUN")
    assert all(tool in apt.split() for tool in ("python3.11", "sox", "fluidsynth", "git", "wget"))
    env = {}
    for k, a in final:
        if k == "ENV":
            env.update(_env_pairs(a))
    assert env.items() >= OFFLINE_ENV.items()
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert ("USER", "ray") in final and "--uid 1000 ray" in apt


def test_gpu_image_context_holds_exactly_what_it_copies() -> None:
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
    assert "*" in ignore, "everything else (.venv, artifacts, checkpoints) stays out of the context"
    sources = {src for k, a in _dockerfile(INFRA / "Dockerfile") if k == "COPY" and not a.startswith("--from")
               for src in _copy_sources(a)}
    assert sources == allowed
    assert all((REPO / s).exists() for s in sources)


# ---- KubeRay -------------------------------------------------------------------------------------------------
def _kuberay() -> dict[str, dict]:
    kustom = yaml.safe_load((INFRA / "kuberay" / "kustomization.yaml").read_text())
    docs = [d for f in kustom["resources"] for d in _yaml_docs(INFRA / "kuberay" / f)]
    return {"kustomization": kustom} | {d["kind"]: d for d in docs}


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_manifests_kinds_and_versions() -> None:
    k = _kuberay()
    assert set(k) == {"kustomization", "PersistentVolumeClaim", "RayCluster", "Deployment"}
    assert (k["RayCluster"]["apiVersion"], k["Deployment"]["apiVersion"], k["PersistentVolumeClaim"]["apiVersion"]) \
        == ("ray.io/v1", "apps/v1", "v1")
    assert k["RayCluster"]["spec"]["rayVersion"] == PINS["ray"]
    assert k["kustomization"]["images"] == [{"name": "presto-gpu", "newName": "presto-gpu", "newTag": VERSION}]


def test_raycluster_head_runs_no_tasks_and_gpu_workers_fit_the_gpu_profile() -> None:
    spec = _kuberay()["RayCluster"]["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in _containers(head["template"])[0]["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    [gpu] = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    res = _containers(gpu["template"])[0]["resources"]
    assert res["requests"] == res["limits"], "KubeRay derives the node's Ray resources from the limits"
    cpus, gpus = _gpu_profile_needs()
    assert int(res["limits"]["nvidia.com/gpu"]) >= gpus >= 1
    assert int(res["limits"]["cpu"]) >= cpus
    tolerations = gpu["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_kuberay_pods_share_image_workspace_token_and_tracking_secret() -> None:
    k = _kuberay()
    spec = k["RayCluster"]["spec"]
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"]),
                 k["Deployment"]["spec"]["template"]]
    claim = k["PersistentVolumeClaim"]["metadata"]["name"]
    assert k["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for tpl in templates:
        [c] = _containers(tpl)
        assert c["image"] == IMAGE
        assert tpl["spec"]["securityContext"]["fsGroup"] == 1000, "the image's ray user (uid 1000) writes the volume"
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == claim
        assert {"name": "workspace", "mountPath": "/workspace"} in c["volumeMounts"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "presto-ray-auth", "key": "auth_token"}}
        assert {"secretRef": {"name": "presto-mlflow"}} in c["envFrom"]


def test_pipeline_pod_submits_to_the_head_service_and_serves_the_work_pool() -> None:
    k = _kuberay()
    [c] = _containers(k["Deployment"]["spec"]["template"])
    env = {e["name"]: e.get("value") for e in c["env"]}
    head = k["RayCluster"]["metadata"]["name"]
    assert env["RAY_ADDRESS"] == f"http://{head}-head-svc:8265", "KubeRay names the head Service <cluster>-head-svc"
    assert c["command"][:3] == ["prefect", "worker", "start"]
    assert c["command"][c["command"].index("--pool") + 1] == _prefect_yaml()["deployments"][0]["work_pool"]["name"]
    assert {"secretRef": {"name": "presto-prefect"}} in c["envFrom"]
    pull = _prefect_yaml()["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert pull.startswith(f"{c['workingDir']}/"), "flow runs start in the project on the shared workspace"


# ---- the cluster launcher ------------------------------------------------------------------------------------
def test_cluster_launcher_config_passes_rays_schema_and_matches_kuberay() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)  # Ray's own JSON schema
    assert config["docker"] == {}, "nodes install the project themselves: no image registry"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    [gpu] = [t for name, t in types.items() if name != config["head_node_type"]]
    cpus, gpus = _gpu_profile_needs()
    assert gpu["resources"]["GPU"] >= gpus and gpu["resources"]["CPU"] >= cpus
    setup = " && ".join(config["setup_commands"])
    assert "python3.11 -m venv ~/venv" in setup
    assert "pip install -q -c ~/presto-src/constraints.txt ~/presto-src" in setup
    assert config["file_mounts"]["/home/ubuntu/presto-src"] == "."
    assert config["rsync_filter"] == [".gitignore"], "the virtualenv and artifacts are not copied to nodes"
    env_line = next(c for c in config["setup_commands"] if "> ~/presto.env" in c)
    env = dict(w.split("=", 1) for w in shlex.split(env_line.split("printf '%s\\n'", 1)[1].split(">")[0]))
    assert env.items() >= (OFFLINE_ENV | {"RAY_AUTH_MODE": "token"}).items()
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = config["head_start_ray_commands"][-1]
    assert "--head --port=6379" in head_start and "--num-cpus=0" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in config["worker_start_ray_commands"][-1]
    # The project's shared folder: the head exports it, each worker mounts it before its Ray starts.
    assert any("/etc/exports" in c and "/workspace " in c for c in config["head_setup_commands"])
    assert "mount -t nfs4 $RAY_HEAD_IP:/workspace /workspace" in config["worker_start_ray_commands"][0]


# ---- MLflow, MinIO, PostgreSQL, Prefect ----------------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((INFRA / "services" / "compose.yaml").read_text())


def _flags(command: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in command if a.startswith("--") and "=" in a)


def test_compose_wires_mlflow_to_postgres_and_minio_behind_basic_auth() -> None:
    services = _compose()["services"]
    databases = re.findall(r"CREATE DATABASE (\w+);", (INFRA / "services" / "postgres-init.sql").read_text())
    mlflow = services["mlflow"]
    flags = _flags(mlflow["command"])
    env = mlflow["environment"]
    assert mlflow["command"][:2] == ["mlflow", "server"] and "--serve-artifacts" in mlflow["command"]
    assert flags["app-name"] == "basic-auth"
    backend = re.fullmatch(r"postgresql://presto@postgres:5432/(\w+)", flags["backend-store-uri"])
    assert backend and backend[1] in databases
    assert env["PGPASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    # Artifacts: the bucket the one-shot service creates, on MinIO's S3 port, with MinIO's own credentials.
    bucket = re.fullmatch(r"s3://([\w-]+)", flags["artifacts-destination"])[1]
    assert f"mc mb --ignore-existing store/{bucket}" in services["minio-bucket"]["entrypoint"][-1]
    assert "http://minio:9000" in services["minio-bucket"]["entrypoint"][-1]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    minio_env = services["minio"]["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == \
        (minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])
    assert mlflow["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                    "minio-bucket": {"condition": "service_completed_successfully"}}
    # Basic auth: the users database, the admin's password and the session key come from the environment.
    ini = (INFRA / "services" / "basic_auth.ini").read_text()
    auth_db = re.search(r"^database_uri = postgresql://presto@postgres:5432/(\w+)$", ini, flags=re.M)
    assert auth_db and auth_db[1] in databases and auth_db[1] != backend[1]
    assert "admin_password" not in ini.replace("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    dockerfile = (INFRA / "services" / "mlflow.Dockerfile").read_text()
    assert f"COPY infra/services/basic_auth.ini {env['MLFLOW_AUTH_CONFIG_PATH']}" in dockerfile
    assert f'"mlflow[auth]=={PINS["mlflow"]}"' in dockerfile and "-c /tmp/constraints.txt" in dockerfile
    assert "psycopg2-binary==" in dockerfile and "boto3==" in dockerfile
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_SECRET_KEY:?")
    assert mlflow["ports"] == ["5000:5000"] and mlflow["build"]["context"] == "../.."
    assert "5000" not in str(services["minio"].get("ports")) and "9000" not in str(services["minio"]["ports"]), \
        "MinIO's S3 API stays on the compose network: artifacts go through MLflow"


def test_compose_prefect_server_on_postgres_with_auth_and_the_work_pool() -> None:
    compose = _compose()
    services = compose["services"]
    databases = re.findall(r"CREATE DATABASE (\w+);", (INFRA / "services" / "postgres-init.sql").read_text())
    prefect = services["prefect"]
    env = prefect["environment"]
    assert prefect["image"] == services["prefect-pool"]["image"] == f"prefecthq/prefect:{PINS['prefect']}-python3.11"
    assert env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert env["PREFECT_SERVER_DATABASE_HOST"] == "postgres" and env["PREFECT_SERVER_DATABASE_NAME"] in databases
    assert env["PREFECT_SERVER_DATABASE_PASSWORD"] == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert env["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert prefect["ports"] == ["4200:4200"] and prefect["command"][-1] == "4200"
    pool = services["prefect-pool"]
    assert pool["command"][:4] == ["prefect", "work-pool", "create", loopback.WORK_POOL]
    assert pool["environment"]["PREFECT_API_URL"] == "http://prefect:4200/api"
    # Every image pinned; every secret required (compose stops with the variable's name when one is missing).
    for name, svc in services.items():
        if "image" in svc:
            assert ":" in svc["image"] and not svc["image"].endswith(":latest"), name
    text = (INFRA / "services" / "compose.yaml").read_text()
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD",
                   "MLFLOW_SECRET_KEY", "PREFECT_AUTH_STRING"):
        assert f"${{{secret}:?set " in text, secret


# ---- Prefect deployment --------------------------------------------------------------------------------------
def _prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())


def test_prefect_deployment_points_at_the_repro_flow_in_the_presto_pool() -> None:
    config = _prefect_yaml()
    assert config["prefect-version"] == PINS["prefect"]
    [deployment] = config["deployments"]
    assert deployment["work_pool"]["name"] == loopback.WORK_POOL
    path, func = deployment["entrypoint"].split(":")
    flow = getattr(_load(REPO / path), func)
    assert flow.name == "presto-repro"
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)


def test_repro_flow_runs_dvc_repro_and_fails_with_it(tmp_path: Path) -> None:
    repro = _load(INFRA / "prefect" / "repro.py").repro
    env = {k: v for k, v in os.environ.items()} | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  ok:\n    cmd: echo done > ok.txt\n    outs: [ok.txt]\n"
                                       "  broken:\n    cmd: exit 3\n")
    saved = os.environ["PATH"]
    os.environ["PATH"] = env["PATH"]
    try:
        repro.fn(targets=["ok"], project=str(tmp_path))
        assert (tmp_path / "ok.txt").read_text() == "done\n"
        with pytest.raises(RuntimeError, match="dvc repro broken failed with exit code"):
            repro.fn(targets=["broken"], project=str(tmp_path))
    finally:
        os.environ["PATH"] = saved


# ---- the loopback script's own pieces ------------------------------------------------------------------------
def test_loopback_rejects_bad_arguments_in_one_line(tmp_path: Path) -> None:
    script = [sys.executable, str(INFRA / "loopback.py")]
    bad_run = subprocess.run(script + ["--run", "prepare@carrier-pigeon"], capture_output=True, text=True)
    assert bad_run.returncode == 2 and "expected STAGE[@MODE] with MODE one of gcs, client, jobs" in bad_run.stderr
    no_project = subprocess.run(script + ["--project", str(tmp_path)], capture_output=True, text=True)
    assert no_project.returncode == 2 and "no dvc.yaml there" in no_project.stderr
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    long_state = tmp_path / ("s" * 60)
    too_long = subprocess.run(script + ["--project", str(tmp_path), "--state", str(long_state), "--report",
                                        str(tmp_path / "r.json")], capture_output=True, text=True)
    report = json.loads((tmp_path / "r.json").read_text())
    assert too_long.returncode == 1 and "too long for Ray's unix sockets" in report["error"]
    assert report["teardown"]["clean"] and not (long_state / "ray").exists()


def test_teardown_ends_every_process_of_a_session_and_only_those() -> None:
    # A leader with a child in its own process group, as Ray's workers are: both must go.
    leader = subprocess.Popen([sys.executable, "-c", "import os, subprocess, sys, time\n"
                               "subprocess.Popen([sys.executable, '-c', 'import os, time; os.setpgid(0, 0); "
                               "time.sleep(300)'])\ntime.sleep(300)"], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    session = {"name": "t", "sid": leader.pid, "start_ticks": loopback._start_ticks(leader.pid), "stop_group": True}
    try:
        def members_and_groups() -> tuple[list, set[int]]:
            members = loopback._processes_of([session])
            return members, {os.getpgid(p.pid) for p in members}

        deadline = time.monotonic() + 20
        # Until the child has started and moved to its own group (a busy machine can take seconds for both).
        while len(members_and_groups()[1]) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        members, _ = members_and_groups()
        assert len(members) == 2 and len({os.getpgid(p.pid) for p in members}) == 2
        # A recorded leader that started at another time is some other program that got the same pid.
        assert loopback._processes_of([session | {"start_ticks": session["start_ticks"] + 1}]) == \
            [p for p in members if p.pid != leader.pid]
        result = loopback.teardown(REPO, [session], [], grace_s=2)
        assert result["clean"] and result["left_processes"] == []
        assert loopback._processes_of([session]) == []
        assert bystander.poll() is None, "a process outside the session is left alone"
    finally:
        for proc in loopback._processes_of([session]):
            proc.kill()
        for proc in (leader, bystander):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_readme_documents_every_infra_file_and_the_variables_the_pipeline_reads() -> None:
    readme = (INFRA / "README.md").read_text()
    files = [p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert [f for f in files if f != "README.md" and f not in readme] == []
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
        assert var in readme, var
    for form in ("ray://", "http://", ":6379"):
        assert form in readme
