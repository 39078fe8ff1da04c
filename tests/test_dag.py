"""The DAG is declared once (stages/specs.py) and dvc.yaml is generated from it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.dag import render
from presto.config import load_params, select
from stages.specs import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_current() -> None:
    assert (REPO / "dvc.yaml").read_text() == render(), "run `presto dag` to regenerate dvc.yaml"


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_spec_points_at_real_things(spec) -> None:
    params = load_params(REPO / "params.yaml")
    assert select(params, spec.params), f"{spec.name}: params keys resolve"
    for path in spec.code:
        assert (REPO / path).exists(), f"{spec.name}: code dependency {path} does not exist"
    assert importlib.util.find_spec(spec.module) is not None
    for up in spec.upstream:
        assert up in {s.name for s in STAGES[: STAGES.index(spec)]}, f"{spec.name}: {up} must come earlier"
    if spec.resources_key:
        assert getattr(params, spec.resources_key).resources.cpus > 0


def test_each_stage_reads_only_its_params() -> None:
    """No stage lists another stage's section: a Presto-L knob must not rerun the VAE."""
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    names = {s.name for s in STAGES}
    for name, stage in doc["stages"].items():
        for key in stage["params"]:
            section = key.split(".")[0]
            assert section == "shared" or section == name or section not in names, (name, key)


def test_cli_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("stage", "params", "profile", "dag", "ui"):
        assert command in out
    stage_help = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "--help"], capture_output=True,
                                text=True, check=True).stdout
    for spec in STAGES:
        assert spec.name in stage_help


def test_cli_generate_refuses_an_empty_prompt_before_loading_anything(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "generate", " \t "], cwd=tmp_path,
                          capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "prompt is empty" in proc.stderr
    assert not (tmp_path / "out.wav").exists()


def test_cli_rejects_bad_params_in_one_line(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text().replace("shard_clips: 256", "shard_clips: -3")
    (tmp_path / "params.yaml").write_text(text)
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "prepare"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "prepare.shard_clips = -3" in proc.stderr
