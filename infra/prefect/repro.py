"""The flow the `presto` work pool runs: `dvc repro` in the project, so that a team starts the pipeline, or some
of its stages, from the Prefect UI, the API or a schedule. DVC stays the only DAG: each stage it runs is a flow
run of its own (flows/stage_flow.py), on the Ray cluster that RAY_ADDRESS names."""

from __future__ import annotations

import subprocess

from prefect import flow


@flow(name="presto-repro", log_prints=True)
def repro(targets: list[str] | None = None, project: str = ".") -> None:
    """`dvc repro [targets]` in `project` (the deployment's working directory by default)."""
    cmd = ["dvc", "repro", *(targets or [])]
    print(f"$ {' '.join(cmd)}  (in {project})")
    proc = subprocess.Popen(cmd, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # into the flow run's log as it comes
        print(line, end="")
    if proc.wait() != 0:
        raise RuntimeError(f"dvc repro {' '.join(targets or [])} failed with exit code {proc.returncode}")
