"""Where a stage's compute runs: a local Ray when RAY_ADDRESS is unset, the cluster when it is set.

- RAY_ADDRESS unset: `ray.init` starts a local Ray bound to 127.0.0.1; the stage body runs as a Ray task
  holding the stage's CPUs/GPUs from params (and fans out further tasks itself).
- RAY_ADDRESS=ray://... or host:port: this process joins the cluster as a driver; same task.
- RAY_ADDRESS=http://host:8265: the Ray Jobs API: the stage is submitted as a job whose entrypoint joins the
  cluster from a cluster node and runs the same task (`python -m flows.dispatch`); logs are streamed back.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from presto.errors import PrestoError


class InfraError(RuntimeError):
    """Ray lost a worker, a node or the connection: worth a bounded retry."""


def _forwarded_env() -> dict[str, str]:
    """What the stage task needs from this process's environment, wherever it runs."""
    return {k: os.environ[k] for k in ("PRESTO_ROOT", "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE",
                                       "TRANSFORMERS_OFFLINE", "PYTHONWARNINGS") if k in os.environ}


# Train V2's placement-group cleaner asks the state API (served by the dashboard, which the local Ray runs
# without) whether its controller lives, every second, and warns each time it cannot: 2740 lines in a 46-minute
# train_dit. The cleaner only matters when a controller dies and the cluster outlives it; a local Ray does not.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_worker_logs() -> None:
    """Ray worker set-up hook of the local Ray."""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def ray_init() -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    env_vars = _forwarded_env()
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env_vars, "worker_process_setup_hook": "flows.dispatch.quiet_worker_logs"},
                 configure_logging=False)
        node_ip = ray.util.get_node_ip_address()
        if node_ip != "127.0.0.1":  # its servers would listen on every interface
            ray.shutdown()
            raise RuntimeError(f"the local Ray came up on {node_ip}, not 127.0.0.1: ray was imported before "
                               "flows.env.set_defaults() could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")


def _unwrap(err: BaseException) -> BaseException:
    """Turn Ray's wrappers back into what happened: the stage's own error, or an infrastructure failure."""
    import ray.exceptions as rex

    if isinstance(err, rex.RayTaskError):
        cause = err.cause if err.cause is not None else err
        return cause
    if isinstance(err, (rex.RayError, ConnectionError)):
        return InfraError(f"{type(err).__name__}: {err}")
    return err


def run_on_ray(stage: str, root: Path, tracker: Any, fp: str, cpus: float, gpus: float) -> dict[str, Any]:
    """Run `stages.runner.execute` for one stage as a Ray task and wait for its metrics."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith("http://") or address.startswith("https://"):
        return _submit_job(address, stage, root, tracker, fp, cpus, gpus)
    import ray

    from stages.runner import execute

    ray_init()
    # Named after the stage, so the Ray dashboard and state API show which stage ran where.
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0, name=f"stage:{stage}")(execute)
    try:
        return ray.get(task.remote(stage, str(root), tracker, fp))
    except Exception as err:  # noqa: BLE001 - re-raised as what it really is
        raise _unwrap(err) from None


def _submit_job(address: str, stage: str, root: Path, tracker: Any, fp: str, cpus: float,
                gpus: float) -> dict[str, Any]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    spec = json.dumps({"stage": stage, "root": str(root), "tracking_uri": tracker.tracking_uri,
                       "run_id": tracker.run_id, "fp": fp, "cpus": cpus, "gpus": gpus})
    # The job's runtime_env is the one its driver and the stage task inherit (a second one in the driver's
    # ray.init would conflict). RAY_ADDRESS is left to the Jobs supervisor, which sets it to its own
    # cluster; "auto" would pick whichever cluster started last on that node.
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m flows.dispatch {shlex.quote(spec)}",
        runtime_env={"env_vars": _forwarded_env() | {"PRESTO_ROOT": str(root)}},
        metadata={"presto.stage": stage, "presto.run_id": tracker.run_id},
    )
    import asyncio

    async def _tail() -> None:
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)

    asyncio.run(_tail())
    status = client.get_job_status(job)
    if status != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(job)
        if "PrestoError" in logs or "ParamsError" in logs or "InputError" in logs or "DivergenceError" in logs:
            raise PrestoError(f"stage {stage} failed on the cluster (job {job}); see its log above")
        raise InfraError(f"stage {stage}: Ray job {job} ended {status}")
    metrics_file = root / "artifacts" / stage / "metrics.json"
    return json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}


def _job_main(spec_json: str) -> None:
    """Entrypoint of a Ray job: runs on a cluster node, joins the cluster and runs the stage task."""
    import ray

    from flows.tracking import MlflowTracker

    spec = json.loads(spec_json)
    ray.init(log_to_driver=True)  # the cluster and runtime_env the Jobs supervisor gave this job
    tracker = MlflowTracker(spec["tracking_uri"], spec["run_id"])
    metrics = run_on_ray(spec["stage"], Path(spec["root"]), tracker, spec["fp"], spec["cpus"], spec["gpus"])
    print(json.dumps(metrics))


if __name__ == "__main__":
    _job_main(sys.argv[1])
