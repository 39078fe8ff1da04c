"""The stage runner: fingerprints that change with what a stage reads, atomic out folders, retry policy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from prefect.states import Completed, Failed

from flows.dispatch import InfraError
from flows.stage_flow import _is_infra_failure
from presto.config import load_params, parse_params
from presto.errors import DivergenceError, ParamsError
from stages.runner import _move_into_place, fingerprint, resolve_template, summary_step
from stages.specs import get

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    for folder in ("stages", "presto"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "artifacts" / "prepare").mkdir(parents=True)
    (tmp_path / "artifacts" / "prepare" / "manifest.jsonl").write_text("{}\n")
    return tmp_path


def test_fingerprint_tracks_params_code_and_inputs(project: Path) -> None:
    spec = get("augment")
    params = load_params(project / "params.yaml")
    base = fingerprint(spec, params, project)
    assert fingerprint(spec, params, project) == base, "deterministic"

    data = params.model_dump()
    data["augment"]["pitch_semitones"] = [-3, 3]
    assert fingerprint(spec, parse_params(data), project) != base, "own param"
    data = params.model_dump()
    data["caption"]["per_clip"] = 9
    assert fingerprint(spec, parse_params(data), project) == base, "another stage's param"

    code = project / "presto" / "data" / "shards.py"
    code.write_text(code.read_text() + "\n# changed\n")
    changed_code = fingerprint(spec, params, project)
    assert changed_code != base, "own code"

    manifest = project / "artifacts" / "prepare" / "manifest.jsonl"
    manifest.write_text("{}\n{}\n")
    assert fingerprint(spec, params, project) != changed_code, "rebuilt upstream out"


def test_template_deps_resolve_from_params(repo: Path) -> None:
    params = load_params(repo / "params.yaml")
    assert resolve_template("${prepare.corpus_dir}", params) == params.prepare.corpus_dir


def test_move_into_place_replaces_atomically(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = tmp_path / ".out.tmp"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    _move_into_place(tmp, final)
    assert sorted(os.listdir(final)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"], "no old or temporary folder left"


@pytest.mark.parametrize(
    ("error", "retried"),
    [(InfraError("node died"), True), (ParamsError("bad"), False), (DivergenceError("nan"), False),
     (ValueError("bug"), False)],
)
def test_only_infrastructure_failures_are_retried(error: Exception, retried: bool) -> None:
    assert _is_infra_failure(None, None, Failed(data=error)) is retried


def test_success_is_not_retried() -> None:
    assert _is_infra_failure(None, None, Completed(data=1)) is False


def test_summary_is_logged_at_the_last_training_step() -> None:
    assert summary_step({"steps": 400.0, "val_loss": 0.5}) == 400
    assert summary_step({"iterations": 100.0, "generator_updates": 20.0}) == 100
    assert summary_step({"fad": 7.5}) == 0


def test_metrics_may_nest_and_flatten_for_mlflow() -> None:
    from stages.runner import _check_metrics, flatten_metrics

    metrics = {"base": {"32": {"fad": 1.5, "clap_score": None, "rtf": float("inf")}}, "steps": 3}
    clean = _check_metrics("evaluate", metrics)
    assert clean == {"base": {"32": {"fad": 1.5, "clap_score": None, "rtf": None}}, "steps": 3}
    assert flatten_metrics(clean) == {"base.32.fad": 1.5, "steps": 3.0}
    with pytest.raises(TypeError, match="base.32.fad = 'x'"):
        _check_metrics("evaluate", {"base": {"32": {"fad": "x"}}})
