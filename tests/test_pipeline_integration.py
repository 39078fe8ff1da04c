"""The real thing on a tiny corpus: `dvc repro` runs each stage as a Prefect flow dispatched to Ray, recorded in
MLflow on SQLite. No mocks. The first build shares one Ray head and one Prefect server between its stages (what
README's "Scale out" has a team start on its own machine); the later runs use what a stage starts by itself
(a local Ray and a temporary Prefect server), as `make demo` does."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_infra import loopback

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

from flows.env import LOCAL_RAY_ENV
from stages import runner
from stages.specs import STAGES

ALL_STAGES = [s.name for s in STAGES]
LEAVES = [name for name in ALL_STAGES if not any(name in s.upstream for s in STAGES if s.name in ALL_STAGES)]


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_ADDRESS", "PRESTO_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def _run(cmd: list[str], root: Path, check: bool = True, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=root, env=_env(root) | (env or {}), capture_output=True, text=True, timeout=2400)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _set_params(root: Path, **sections: dict) -> None:
    data = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        if section in data:  # a stage not built yet has no section
            data[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _run_of(name: str, stage: str, sampler: str, steps: int) -> dict:
    guided = sampler != "consistency"
    return {"name": name, "stage": stage,
            "recipe": {"sampler": sampler, "steps": steps, "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0,
                       "guidance": "cfgpp" if guided else "none", "scale": 0.8 if guided else 0.0, "budgets": None}}


# One run of every model, at few steps.
EVALUATED = [("base", "train_dit", "dpmpp_2m_sde", 2), ("presto_l", "presto_l", "dpmpp_2m_sde", 2),
             ("ase", "ase", "dpmpp_2m_sde", 2), ("presto_s", "presto_s", "consistency", 1),
             ("presto_ls", "presto_ls", "consistency", 1)]

# Every stage at the smallest size that still exercises its code: the point is the plumbing.
TINY = {
    "demo_corpus": {"minutes": 0.6, "max_piece_seconds": 12},
    "caption": {"per_clip": 2},
    "train_vae": {"steps": 4, "batch": 2, "disc_warmup_steps": 2, "log_every": 2, "ckpt_every": 2,
                  "val_every": 4, "val_clips": 2, "examples": 1},
    "train_stereo": {"steps": 4, "batch": 2, "disc_warmup_steps": 2, "log_every": 2, "ckpt_every": 2,
                     "val_every": 4, "val_clips": 2, "examples": 1},
    "train_dit": {"steps": 4, "batch": 4, "warmup_steps": 1, "log_every": 2, "ckpt_every": 2, "val_every": 4,
                  "val_clips": 2, "samples": 1, "sample_seconds": 1.0},
    "layer_dropping": {"steps": 4, "batch": 4, "log_every": 2, "ckpt_every": 2, "val_every": 4, "val_clips": 2},
    "presto_s": {"iterations": 10, "batch": 4, "log_every": 5, "ckpt_every": 5, "eval_clips": 2,
                 "eval_steps": [1, 2]},
    "presto_ls": {"iterations": 10, "batch": 4, "log_every": 5, "ckpt_every": 5, "eval_clips": 2,
                  "eval_steps": [1, 2]},
    "evaluate": {"runs": [_run_of(name, stage, sampler, steps) for name, stage, sampler, steps in EVALUATED],
                 "reference_run": "base/2", "n_prompts": 3, "reference_clips": 3, "prdc_k": 2, "seconds": 1.0,
                 "latency_repeats": 1, "compare_latency_repeats": 2, "rho_sweep": {"run": "presto_s/1", "rhos": [1.0]},
                 "compare": [["presto_l/2", "ase/2"], ["presto_ls/1", "presto_s/1"]],
                 "best_of_n": {"runs": ["presto_s/1"], "max_candidates": 2,
                               "latency_budget_ms": 1.0e6}},  # room for both candidates: not timing-dependent
}


# One CPU, so one torch thread, per stage: pytest-xdist runs other test files beside this one on two cores, and
# two-thread torch processes sharing two cores slow each other several-fold (presto_ls: 165 s here, 39 s alone).
ONE_CPU = {section: {"resources": {"cpus": 1, "gpus": 0}}
           for section, values in yaml.safe_load((REPO / "params.yaml").read_text()).items()
           if isinstance(values, dict) and "resources" in values} | {"train_dit": {"cpus_per_worker": 1}}


@dataclass
class SharedServices:
    env: dict[str, str]  # what points the pipeline at them
    ray_logs: Path
    prefect_api: str


@contextmanager
def _shared_services(project: Path) -> Iterator[SharedServices]:
    """A Ray head (`ray start --head`) and a Prefect server (`prefect server start`, its database the project's)
    on 127.0.0.1, each in a session of its own; at the end they are stopped and nothing of them may be left."""
    state = Path(tempfile.mkdtemp(prefix="presto-it-", dir="/tmp"))  # Ray's unix sockets need a short path
    token = state / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    names = ("gcs", "agent", "metrics", "autoscaler_metrics", "dashboard_metrics", "prefect")
    ports = dict(zip(names, loopback._free_ports(len(names))))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    sessions = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(state / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(argv, cwd=state, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        # `ray start --block` stops its node's processes itself, in order: only the leader is signalled.
        sessions.append({"name": name, "sid": proc.pid, "start_ticks": loopback._start_ticks(proc.pid),
                         "stop_group": name != "ray"})
        return proc

    bin_dir = Path(sys.executable).parent
    # The switch a stage's own local Ray has (flows/env.py): a node on 127.0.0.1 that listens there only. Every
    # port free, the ones Ray would otherwise fix included (another Ray may run on this machine).
    ray = start("ray", [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                        "--port", str(ports["gcs"]), "--num-cpus", str(os.cpu_count()), "--include-dashboard",
                        "false", "--dashboard-agent-listen-port", str(ports["agent"]), "--metrics-export-port",
                        str(ports["metrics"]), "--temp-dir", str(state / "ray"), "--disable-usage-stats"],
                _env(project) | auth | LOCAL_RAY_ENV | {
                    "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]),
                    "DASHBOARD_METRIC_PORT": str(ports["dashboard_metrics"]),
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    prefect = start("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                str(ports["prefect"]), "--no-services", "--no-ui"],
                    _env(project) | {"PREFECT_HOME": str(project / ".prefect")})
    api = f"http://127.0.0.1:{ports['prefect']}/api"
    try:
        deadline = time.monotonic() + 240
        while not (loopback._port_open("127.0.0.1", ports["gcs"]) and loopback._status(f"{api}/health") == 200):
            assert ray.poll() is None and prefect.poll() is None and time.monotonic() < deadline, \
                "\n".join((state / f"{n}.log").read_text()[-2000:] for n in ("ray", "prefect"))
            time.sleep(0.5)
        yield SharedServices(env=auth | {"RAY_ADDRESS": f"127.0.0.1:{ports['gcs']}", "PREFECT_API_URL": api},
                             ray_logs=state / "ray" / "session_latest" / "logs", prefect_api=api)
    finally:
        stopped = loopback.teardown(state, sessions, list(ports.values()))
        shutil.rmtree(state, ignore_errors=True)
    assert stopped["clean"], stopped


@dataclass
class Build:
    root: Path
    ray_drivers: int  # processes that joined the shared Ray head
    flow_runs: list[dict]  # as the shared Prefect server's API lists them


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    """A fresh project: the repository's pipeline files and code, git + DVC initialised, tiny params, built by
    one `dvc repro` whose stages share a Ray head and a Prefect server."""
    root = tmp_path_factory.mktemp("project")
    for name in ("params.yaml", "dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("presto", "stages", "flows", "profiles"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _set_params(root, **TINY)
    _set_params(root, **ONE_CPU)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], root)
    with _shared_services(root) as shared:
        _run(["dvc", "repro", *LEAVES], root, env=shared.env)
        drivers = len(list(shared.ray_logs.glob("python-core-driver-*.log")))
        flow_runs = loopback._post_json(f"{shared.prefect_api}/flow_runs/filter", {})
    return Build(root=root, ray_drivers=drivers, flow_runs=flow_runs)


@pytest.fixture(scope="module")
def project(build: Build) -> Path:
    return build.root


def _runs(root: Path) -> list[dict]:
    db = sqlite3.connect(root / ".mlflow" / "mlflow.db")
    rows = db.execute("select run_uuid, name, status from runs").fetchall()
    out = []
    for run_id, name, status in rows:
        tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)).fetchall())
        params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
        metrics = dict(db.execute("select key, max(step) from metrics where run_uuid=? group by key", (run_id,)).fetchall())
        out.append({"id": run_id, "name": name, "status": status, "tags": tags, "params": params,
                    "metrics": metrics})
    return out


def test_repro_builds_every_stage(project: Path) -> None:
    for stage in ALL_STAGES:
        out = project / "artifacts" / stage
        assert (out / "metrics.json").is_file(), stage
    leftovers = [p.name for p in (project / "artifacts").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == [], "no temporary folders left behind"


def test_evaluate_scores_every_model_and_registers_it(project: Path) -> None:
    scores = json.loads((project / "artifacts" / "evaluate" / "metrics.json").read_text())
    stereo = json.loads((project / "artifacts" / "evaluate" / "stereo.json").read_text())
    assert {(name, steps) for name, by_steps in scores.items() for steps in by_steps} == \
        {(name, str(steps)) for name, _, _, steps in EVALUATED} | {("presto_s_best_of_n", "1")}
    for name, by_steps in scores.items():
        for row in by_steps.values():
            assert row["fad"] > 0 and row["latency_ms"] > 0, name
            assert row["upmix_ms"] > 0 and row["latency_stereo_ms"] == pytest.approx(row["latency_ms"]
                                                                                     + row["upmix_ms"]), name
    # The demo corpus is stereo: every reference clip has its stereo original, scored beside dual mono.
    assert stereo["real"]["clips"] >= 2
    for side in ("upmixer", "dual_mono"):
        assert set(stereo[side]) == {"side_stft_distance", "channel_stft_distance", "correlation",
                                     "correlation_error", "width", "width_error", "side_fad"}
        assert all(value is not None for value in stereo[side].values()), side
    assert stereo["dual_mono"]["correlation"] == pytest.approx(1.0) and stereo["dual_mono"]["width"] == 0.0
    assert stereo["served"]["side_fad"] is not None  # the served model's clips upmixed (3 prompts)
    report = (project / "artifacts" / "evaluate" / "report.html").read_text()
    assert "Listen in stereo: real test clips" in report and 'class="spec stereo"' in report
    db = sqlite3.connect(project / ".mlflow" / "mlflow.db")
    registered = {name for (name,) in db.execute("select name from registered_models")}
    assert not (project / "mlruns").exists()  # the registered models' files are in the store, not the cwd
    assert {f"presto-{name}" for name, _, _, _ in EVALUATED} <= registered
    evaluate = next(r for r in _runs(project) if r["name"] == "evaluate")
    assert {"stereo.upmixer.side_fad", "stereo.dual_mono.side_stft_distance"} <= evaluate["metrics"].keys()


def test_paired_comparisons_are_dvc_metrics(project: Path) -> None:
    """`dvc metrics show` (and so `dvc exp show` across experiments) reads each compared pair's differences."""
    comparisons = json.loads((project / "artifacts" / "evaluate" / "comparisons.json").read_text())
    assert set(comparisons) == {"presto_l/2 vs ase/2", "presto_ls/1 vs presto_s/1"}
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], project).stdout)[""]["data"]
    read = shown["artifacts/evaluate/comparisons.json"]["data"]
    for pair, entry in comparisons.items():
        assert read[pair]["fad_diff"] == pytest.approx(entry["fad_diff"]), pair
        assert read[pair]["latency_ratio"] == pytest.approx(entry["latency_ratio"]), pair
    assert "upmixer" in shown["artifacts/evaluate/stereo.json"]["data"]


def _flow_runs(project: Path) -> list[tuple[str, str, list[str]]]:
    """(name, state, log messages) of each flow run in the project's Prefect database, oldest first."""
    db = sqlite3.connect(project / ".prefect" / "prefect.db")
    runs = db.execute("select id, name, state_type from flow_run order by created").fetchall()
    return [(name, state, [m for (m,) in db.execute("select message from log where flow_run_id=? order by timestamp",
                                                     (run_id,))]) for run_id, name, state in runs]


def _completed_with_all_logs(name: str, state: str, logs: list[str]) -> None:
    """Its last log lines (written after the stage's work) reached the server before the stage process left."""
    assert state == "COMPLETED", (name, logs)
    assert any(m.startswith(f"stage {name} done in ") for m in logs), (name, logs)
    assert logs[-1] == "Finished in state Completed()", (name, logs)


def test_the_build_shared_one_ray_head_and_one_prefect_server(build: Build) -> None:
    """RAY_ADDRESS=127.0.0.1:port and PREFECT_API_URL set: every stage process joined that Ray as a driver (none
    started a Ray of its own) and recorded its flow run on that server."""
    assert build.ray_drivers == len(ALL_STAGES)
    assert sorted((r["name"], r["state_type"]) for r in build.flow_runs) == sorted((s, "COMPLETED") for s in ALL_STAGES)
    runs = {r["tags"]["presto.stage"]: r for r in _runs(build.root) if r["tags"].get("presto.kind") == "stage"}
    assert {r["id"] for r in build.flow_runs} == {r["tags"]["prefect.flow_run_id"] for r in runs.values()}


def test_each_stage_is_a_completed_prefect_flow_run_with_all_its_logs(project: Path) -> None:
    """The server of the build kept its database in the project's .prefect/, where `presto stage` keeps it."""
    runs = _flow_runs(project)
    assert sorted(name for name, _, _ in runs) == sorted(ALL_STAGES)
    for run in runs:
        _completed_with_all_logs(*run)


def test_one_mlflow_run_per_stage_grouped_with_provenance(project: Path) -> None:
    runs = _runs(project)
    stages = {r["name"]: r for r in runs if r["tags"].get("presto.kind") == "stage"}
    assert set(stages) == set(ALL_STAGES)
    parents = [r for r in runs if r["tags"].get("presto.kind") == "pipeline"]
    assert len(parents) == 1, "one parent run per invocation"
    for name, run in stages.items():
        assert run["status"] == "FINISHED"
        assert run["tags"]["mlflow.parentRunId"] == parents[0]["id"]
        assert run["tags"]["presto.stage"] == name
        assert len(run["tags"]["presto.fingerprint"]) == 16
        assert run["tags"]["mlflow.source.git.commit"] != "unknown"
        assert "prefect.flow_run_id" in run["tags"]
        declared = next(s for s in STAGES if s.name == name).params
        assert all(any(k == d or k.startswith(f"{d}.") for d in declared) for k in run["params"]), \
            "only the params the stage reads"
        assert all(any(k == d or k.startswith(f"{d}.") for k in run["params"]) for d in declared), \
            "every param the stage reads, dotted"
        assert "stage_seconds" in run["metrics"]
        # The summary closes the training curves: logged at the last step, not at MLflow's default step 0.
        summary = json.loads((project / "artifacts" / name / "metrics.json").read_text())
        assert run["metrics"]["stage_seconds"] == runner.summary_step(summary), name
    assert stages["augment"]["tags"]["presto.upstream.prepare"] == stages["prepare"]["id"]
    assert stages["caption"]["tags"]["presto.upstream.augment"] == stages["augment"]["id"]


def test_second_repro_is_a_noop(project: Path) -> None:
    proc = _run(["dvc", "repro", *LEAVES], project)
    assert "Data and pipelines are up to date" in proc.stdout + proc.stderr
    assert len([r for r in _runs(project) if r["tags"].get("presto.kind") == "stage"]) == len(ALL_STAGES)


def test_an_experiment_in_a_temporary_copy_is_recorded_in_the_project(project: Path) -> None:
    """`dvc exp run --temp` (as `--queue`) runs in a copy of the project that DVC deletes afterwards: the stage's
    MLflow run lands in the project's store all the same, tagged with the experiment's name."""
    _run(["git", "add", "dvc.lock"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock"], project)
    before = {r["id"] for r in _runs(project)}
    lock = (project / "dvc.lock").read_text()
    _run(["dvc", "exp", "run", "--temp", "-n", "l-seed1", "-S", "layer_dropping.seed=1", "presto_l"], project)
    new = [r for r in _runs(project) if r["id"] not in before]
    stages = [r for r in new if r["tags"].get("presto.kind") == "stage"]
    assert [(r["name"], r["status"]) for r in stages] == [("presto_l", "FINISHED")], "only the stage it changes"
    assert stages[0]["params"]["layer_dropping.seed"] == "1"
    assert new and all(r["tags"].get("presto.dvc_experiment") == "l-seed1" for r in new)
    # Its inputs were not rerun: their runs are the project's, found through the project's run records.
    (train_dit,) = [r["id"] for r in _runs(project) if r["name"] == "train_dit"]
    assert stages[0]["tags"]["presto.upstream.train_dit"] == train_dit
    assert "l-seed1" in _run(["dvc", "exp", "list", "--name-only"], project).stdout
    assert (project / "dvc.lock").read_text() == lock, "the workspace is left as it was"


def test_param_change_marks_only_that_stage_and_descendants(project: Path) -> None:
    original = (project / "params.yaml").read_text()
    try:
        _set_params(project, augment={"stretch_rates": [0.8]})
        status = _run(["dvc", "status", "--with-deps", "--json", *LEAVES], project).stdout
        assert set(json.loads(status)) == {"augment"}, "only the stage whose param changed is stale"
        _run(["dvc", "repro", "--single-item", "augment"], project)
        status = _run(["dvc", "status", "--with-deps", "--json", *LEAVES], project).stdout
        children = {s.name for s in STAGES if "augment" in s.upstream}
        assert set(json.loads(status)) == children, "its descendants follow"
    finally:
        (project / "params.yaml").write_text(original)
    # No PREFECT_API_URL this time: the stage process started a temporary server of its own on the project's
    # database, and stopped it only once its last logs were in.
    rerun = _flow_runs(project)[-1]
    assert rerun[0] == "augment"
    _completed_with_all_logs(*rerun)


def test_failing_stage_keeps_upstream_outputs_and_says_why(project: Path) -> None:
    original = (project / "params.yaml").read_text()
    corpus = project / "junk_corpus"
    corpus.mkdir()
    (corpus / "notes.wav").write_text("this is not audio")
    before = sorted(p.name for p in (project / "artifacts" / "demo_corpus").rglob("*"))
    try:
        _set_params(project, prepare={"corpus_dir": "junk_corpus", "metadata": None})
        proc = _run(["dvc", "repro", "prepare"], project, check=False)
        assert proc.returncode != 0
        assert "junk_corpus" in proc.stderr + proc.stdout
        assert "error: stage prepare" in proc.stderr
    finally:
        (project / "params.yaml").write_text(original)
    assert sorted(p.name for p in (project / "artifacts" / "demo_corpus").rglob("*")) == before
    assert not [p for p in (project / "artifacts").iterdir() if p.name.startswith(".prepare.tmp")]
    failed = [r for r in _runs(project) if r["name"] == "prepare" and r["status"] == "FAILED"]
    assert len(failed) == 1
    # DVC cleared prepare's out before running it; its previous version is in the DVC cache.
    _run(["dvc", "checkout", "prepare"], project)
    assert (project / "artifacts" / "prepare" / "manifest.jsonl").is_file()
    assert "prepare" not in json.loads(_run(["dvc", "status", "--with-deps", "--json", *LEAVES], project).stdout)


def test_presto_ui_serves_the_runs(project: Path) -> None:
    """`presto ui`: the MLflow UI and its REST API on the project's store."""
    (port,) = loopback._free_ports(1)
    ui = subprocess.Popen(["presto", "ui", "--port", str(port)], cwd=project, env=_env(project),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while loopback._status(f"http://127.0.0.1:{port}/health") != 200:
            assert ui.poll() is None and time.monotonic() < deadline, "presto ui did not answer within 120 s"
            time.sleep(1)
        found = loopback._post_json(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search", {"max_results": 10})
        assert "presto" in [e["name"] for e in found["experiments"]]
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
