"""flows.tracking's process identity: how a stage run left RUNNING by a killed process is told apart from
one whose process still works (tests/test_stage_kill_resume.py has the whole path on MLflow); where runs are
recorded in a DVC experiment (tests/test_pipeline_integration.py runs one)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows.env import mlflow_dir, record_root
from flows.tracking import TAG_DVC_EXPERIMENT, experiment_tags, is_gone, this_process


def test_a_dvc_experiment_in_a_copy_records_in_the_project_it_came_from(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    project, copy = tmp_path / "project", tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpab12"
    copy.mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert record_root(copy) == copy and experiment_tags() == {}
    monkeypatch.setenv("DVC_ROOT", str(project))  # any `dvc repro` sets it: no experiment, no move
    assert record_root(copy) == copy
    monkeypatch.setenv("DVC_EXP_NAME", "l-seed1")
    assert record_root(copy) == project.resolve() and mlflow_dir(copy) == project.resolve() / ".mlflow"
    assert experiment_tags() == {TAG_DVC_EXPERIMENT: "l-seed1"}
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "gone"))  # not a project: stay where we are
    assert record_root(copy) == copy


def test_this_process_is_not_gone():
    assert not is_gone(this_process())


def test_an_ended_process_is_gone_and_its_recycled_pid_is_another_process():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    start = this_process().rsplit(":", 1)[1]
    assert is_gone(f"{host}:{child.pid}:{start}")
    # A live pid whose start time differs: the pid was recycled, the run's process is gone.
    own_pid = this_process().split(":")[1]
    assert is_gone(f"{host}:{own_pid}:{int(start) + 1}")


def test_a_process_on_another_host_is_never_declared_gone():
    assert not is_gone(f"not-{socket.gethostname()}:1:0")


def test_an_experiment_copy_links_the_project_runs_of_the_inputs_it_shares(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage in an experiment's copy links an upstream stage the experiment did not rerun to the project's
    run of it, only where both dvc.lock files give it the same outputs."""
    import yaml

    from flows.stage_flow import upstream_runs
    from stages.runner import write_run_record
    from stages.specs import StageSpec

    project, copy = tmp_path / "project", tmp_path / "copy"
    copy.mkdir(parents=True)
    project.mkdir()
    (project / "dvc.yaml").write_text("stages: {}\n")

    def lock(folder: Path, b_hash: str) -> None:
        outs = {"a": "1111.dir", "b": b_hash}
        (folder / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
            name: {"cmd": f"presto stage {name}", "outs": [{"path": f"artifacts/{name}", "md5": md5}]}
            for name, md5 in outs.items()}}))

    lock(project, "2222.dir")
    lock(copy, "3333.dir")  # the experiment changed b
    write_run_record(project, "a", {"run_id": "run-a"})
    write_run_record(project, "b", {"run_id": "run-b"})
    spec = StageSpec(name="c", help="", params=(), code=(), upstream=("a", "b"))
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert upstream_runs(spec, copy) == {}, "not an experiment: the copy's own records only"
    monkeypatch.setenv("DVC_EXP_NAME", "e")
    assert upstream_runs(spec, copy) == {"a": "run-a"}, "b's outputs differ: the project's run is not its"
    write_run_record(copy, "b", {"run_id": "run-b-exp"})  # the experiment reran b
    assert upstream_runs(spec, copy) == {"a": "run-a", "b": "run-b-exp"}



def test_only_the_ray_dispatch_is_a_retried_prefect_task():
    """Infrastructure failures retry the dispatch to Ray; the bookkeeping around it runs once, in the flow."""
    from prefect import Task

    from flows import stage_flow

    assert isinstance(stage_flow.dispatch, Task) and stage_flow.dispatch.retries == stage_flow.INFRA_RETRIES
    assert not isinstance(stage_flow.upstream_runs, Task) and not isinstance(stage_flow._locked_outs, Task)
