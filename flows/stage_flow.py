"""Every stage runs as a Prefect flow: open its MLflow run, dispatch the body to Ray, record the outcome.

Prefect owns running one stage (retries of infrastructure failures, logs, a record of the run); DVC owns
the DAG, so a flow never calls another stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# Imported on loading, not on first use, so that they load while the temporary Prefect server boots.
import mlflow  # noqa: F401
import ray  # noqa: F401
import yaml
from prefect import flow, get_run_logger, task
from prefect.context import get_run_context

from flows import tracking
from flows.dispatch import InfraError, run_on_ray
from flows.env import record_root
from presto.config import load_params, select
from stages import runner
from stages.specs import StageSpec, get

INFRA_RETRIES = 2


def _is_infra_failure(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry only what another attempt can fix: never bad params, bad data or a diverged loss."""
    try:
        state.result()
    except InfraError:
        return True
    except Exception:  # noqa: BLE001 - anything else is deterministic
        return False
    return False


def _locked_outs(root: Path, stage: str) -> list | None:
    """The outputs (paths and content hashes) dvc.lock records for `stage`, None without an entry."""
    lock = root / "dvc.lock"
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage) if lock.is_file() else None
    return entry.get("outs") if entry else None


def upstream_runs(spec: StageSpec, root: Path) -> dict[str, str]:
    """The MLflow run of each upstream stage, from its run record. A DVC experiment in a temporary copy of the
    project reruns only what it changes: a stage it did not rerun has its record in the project it came from,
    which holds for the copy when both dvc.lock files give that stage the same outputs."""
    home = record_root(root)
    runs = {}
    for up in spec.upstream:
        rec = runner.read_run_record(root, up)
        if rec is None and home != root:
            outs = _locked_outs(root, up)
            rec = runner.read_run_record(home, up) if outs is not None and outs == _locked_outs(home, up) else None
        if rec is not None:
            runs[up] = rec["run_id"]
    return runs


@task(retries=INFRA_RETRIES, retry_delay_seconds=5, retry_condition_fn=_is_infra_failure)
def dispatch(stage: str, root: str, tracker: tracking.MlflowTracker, fp: str, cpus: float,
             gpus: float) -> dict[str, Any]:
    return run_on_ray(stage, Path(root), tracker, fp, cpus, gpus)


def _run_stage(stage: str, root: str) -> dict[str, Any]:
    logger = get_run_logger()
    spec = get(stage)
    root_path = Path(root)
    params = load_params(root_path / "params.yaml")
    fp = runner.fingerprint(spec, params, root_path)
    upstream = upstream_runs(spec, root_path)
    prefect_run = str(get_run_context().flow_run.id)
    tracker = tracking.start_stage_run(root_path, stage, select(params, spec.params), fp, upstream,
                                       {"prefect.flow_run_id": prefect_run})
    # A stage without resources of its own only drives others (Ray Train workers reserve the compute).
    res = getattr(params, spec.resources_key).resources if spec.resources_key else None
    cpus, gpus = (res.cpus, res.gpus) if res else (0.0, 0.0)
    logger.info("stage %s: fingerprint %s, MLflow run %s, Ray task with %s CPU / %s GPU",
                stage, fp, tracker.run_id, cpus, gpus)
    start = time.time()
    try:
        metrics = dispatch(stage, root, tracker, fp, cpus, gpus)
    except BaseException:
        tracking.end_stage_run(tracker, ok=False)
        raise
    tracker.log_metrics(runner.flatten_metrics(metrics) | {"stage_seconds": time.time() - start},
                        step=runner.summary_step(metrics))
    metrics_file = root_path / spec.metrics
    if metrics_file.is_file():
        tracker.log_artifact(metrics_file)
    tracking.end_stage_run(tracker, ok=True)
    runner.write_run_record(root_path, stage, {"run_id": tracker.run_id, "fingerprint": fp,
                                               "prefect_flow_run": prefect_run})
    logger.info("stage %s done in %.1f s", stage, time.time() - start)
    return metrics


def stage_flow(stage: str):
    """The Prefect flow of one stage, named after it so the Prefect UI lists runs per stage."""
    get(stage)
    return flow(name=stage, flow_run_name=f"{stage}", validate_parameters=False,
                log_prints=True)(_run_stage)


def run(stage: str, root: Path) -> dict[str, Any]:
    return stage_flow(stage)(stage, str(root))
