"""Serving: a tiny random bundle logged and registered through MlflowTracker.log_model into a sqlite MLflow
store, served by `mlflow models serve` from the registry alias, answers real HTTP requests with WAV audio,
mono or, with the param stereo, upmixed; and the same model in-process, cheaply, for its stereo path."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from mlflow.exceptions import MlflowException
from test_upmixer import TINY_UPMIXER

from flows.serving import CONFIG_FILE, PrestoModel
from flows.tracking import MlflowTracker
from presto.data.latents import LATENT_STATS, TEXT_ENCODER, LatentStats
from presto.generation import EDM_FILE, MODEL_DIR
from presto.models.checkpoint import save_model
from presto.models.dit import DiT, DiTConfig
from presto.models.upmixer import INFO_FILE, Upmixer
from presto.models.vae import AudioVAE, VAEConfig
from stages.evaluate import BEST_ALIAS, bundle

SR, C = 8000, 4
VAE_CFG = VAEConfig(channels=4, channel_multipliers=[1, 2, 2], strides=[4, 4, 4], latent_channels=C, dilations=[1],
                    kernel_size=3)
RECIPE = {"sampler": "dpmpp_2m", "steps": 2, "rho": 7.0, "sigma_min": 0.002, "sigma_max": 80.0, "guidance": "cfgpp",
          "scale": 0.8, "budgets": None}
SERVER_START_S = 240  # importing torch, MLflow and the text encoder in a fresh process, on shared cores


def make_project(root: Path) -> None:
    """What train_dit, train_vae, train_stereo and encode leave behind, at toy size with random weights."""
    art = root / "artifacts"
    torch.manual_seed(0)
    dit = DiT(DiTConfig(latent_channels=C, width=32, depth=2, heads=2, mlp_ratio=2.0, text_dim=384,
                        budget_conditioning=False))
    save_model(dit, dit.cfg, art / "train_dit" / MODEL_DIR)
    (art / "train_dit" / EDM_FILE).write_text(json.dumps({"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}))
    save_model(AudioVAE(VAE_CFG), VAE_CFG, art / "train_vae" / "model")
    save_model(Upmixer(TINY_UPMIXER), TINY_UPMIXER, art / "train_stereo" / "model")
    (art / "train_stereo" / INFO_FILE).write_text(json.dumps({"sample_rate": SR}))
    (art / "encode").mkdir()
    LatentStats(mean=[0.0] * C, std=[1.0] * C, sigma_data=0.5, hop_length=64, sample_rate=SR,
                frames_per_second=SR / 64, latent_channels=C).save(art / "encode" / LATENT_STATS)
    (art / "encode" / TEXT_ENCODER).write_text(json.dumps({"kind": "minilm", "path": None, "max_tokens": 16}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    pytest.fail(f"the model server did not answer /ping within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def wav(answer: dict) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(base64.b64decode(answer["audio_wav_base64"])), dtype="float32")
    assert rate == answer["sample_rate"] == SR
    return audio


def test_stereo_requests_in_process(tmp_path: Path):
    """The pyfunc model on the bundle evaluate registers, without MLflow's server: the param stereo gives
    2-channel WAVs whose downmix is the mono answer to the same row."""
    make_project(tmp_path)
    config = tmp_path / CONFIG_FILE
    config.write_text(json.dumps({"recipe": RECIPE, "seconds": 0.5, "run": "base/2"}))
    model = PrestoModel()
    rows = pd.DataFrame([{"prompt": "calm organ chorale", "seconds": 0.25, "seed": 3, "steps": 1}])
    with bundle(tmp_path, "train_dit") as files:
        model.load_context(SimpleNamespace(artifacts={"config": str(config)} | {k: str(v) for k, v in files.items()}))
    mono = model.predict(None, rows).iloc[0]
    stereo = model.predict(None, rows, params={"stereo": True}).iloc[0]
    assert mono["channels"] == 1 and stereo["channels"] == 2 and stereo["seconds"] == mono["seconds"] == 0.25
    one, two = wav(mono), wav(stereo)
    assert one.ndim == 1 and two.shape == (len(one), 2)
    np.testing.assert_allclose(two.mean(axis=1), one, atol=2 / 32768)  # 16-bit: the downmix is the mono clip
    assert np.abs(two[:, 0] - two[:, 1]).max() > 0
    with pytest.raises(MlflowException, match="param stereo must be true or false"):
        model.predict(None, rows, params={"stereo": "yes"})


@pytest.mark.integration
def test_registered_model_is_served_over_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    make_project(tmp_path / "project")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    client = MlflowClient(uri)
    experiment = client.create_experiment("presto", artifact_location=(tmp_path / "mlruns").as_uri())
    run = client.create_run(experiment, run_name="evaluate")
    tracker = MlflowTracker(uri, run.info.run_id)
    with bundle(tmp_path / "project", "train_dit") as files:
        tracker.log_model("base", files, {"recipe": RECIPE, "seconds": 0.5, "run": "base/2"}, BEST_ALIAS)
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # log_model put the process-wide URI back

    version = client.get_model_version_by_alias("presto-base", BEST_ALIAS)
    assert version.run_id == run.info.run_id and version.tags["presto.run"] == "base/2"
    # In the run's experiment, whose artifacts are in the store: MLflow's default, experiment 0, keeps its
    # artifacts in ./mlruns of whatever the working directory is.
    logged = client.search_logged_models(experiment_ids=[experiment])
    assert [m.name for m in logged] == ["base"] and logged[0].artifact_location.startswith((tmp_path / "mlruns").as_uri())
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ

    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/presto-base@{BEST_ALIAS}",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
            # MLflow starts `uvicorn` by name: the virtualenv's bin folder must be on PATH.
            cwd=tmp_path, env=os.environ | {"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:"
                                                                                  f"{os.environ['PATH']}"},
            stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server's workers go down with it
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        status, body = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [
            {"prompt": "calm organ chorale at 80 bpm", "seconds": 0.25, "seed": 3, "steps": 1},
            {"prompt": "bright piano"},  # seconds, seed and steps from the registered settings
        ]})
        assert status == 200, body
        first, second = body["predictions"]
        for answer, seconds in ((first, 0.25), (second, 0.5)):
            audio = wav(answer)
            assert audio.ndim == 1 and len(audio) == round(seconds * SR) and answer["channels"] == 1
        assert first["nfe"] == 2 and second["nfe"] == 4  # CFG++: two evaluations per step

        status, body = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [
            {"prompt": "calm organ chorale at 80 bpm", "seconds": 0.25, "seed": 3, "steps": 1}],
            "params": {"stereo": True}})  # the first row again, in stereo
        assert status == 200, body
        (answer,) = body["predictions"]
        stereo, mono = wav(answer), wav(first)
        assert answer["channels"] == 2 and stereo.shape == (len(mono), 2)
        np.testing.assert_allclose(stereo.mean(axis=1), mono, atol=2 / 32768)  # the downmix is the mono clip

        status, body = post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": [{"prompt": " "}]})
        assert status == 400 and "prompt" in json.dumps(body)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_generate_takes_a_registered_model_or_a_stage_with_its_own_recipe(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """`presto generate --model presto-base@best` downloads the registered bundle and samples by the recipe it
    was registered with; `--model presto_s` samples by the recipe its stage wrote (presto_s.json), not by
    params' generate.recipe; an unknown registered name is a one-line error."""
    import re
    import shutil

    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app

    project = tmp_path / "project"
    make_project(project)
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", project / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # In-process: the CLI's environment defaults (configure) go into a copy of the environment, dropped after.
    monkeypatch.setattr(os, "environ", dict(os.environ, PRESTO_ROOT=str(project), MLFLOW_TRACKING_URI=uri))
    client = MlflowClient(uri)
    experiment = client.create_experiment("presto", artifact_location=(tmp_path / "store").as_uri())
    tracker = MlflowTracker(uri, client.create_run(experiment, run_name="evaluate").info.run_id)
    with bundle(project, "train_dit") as files:
        tracker.log_model("base", files, {"recipe": RECIPE | {"steps": 3}, "seconds": 0.25, "run": "base/3"},
                          BEST_ALIAS)
    out = tmp_path / "registered.wav"
    done = CliRunner().invoke(app, ["generate", "calm piano", "--model", f"presto-base@{BEST_ALIAS}",
                                    "--device", "cpu", "--stereo", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "dpmpp_2m, 3 steps, NFE 6" in done.output  # the registered recipe: CFG++ doubles the evaluations
    audio, rate = sf.read(out, dtype="float32")
    assert rate == SR and audio.shape == (round(0.25 * SR), 2)  # the registered length; its upmixer

    shutil.copytree(project / "artifacts" / "train_dit", project / "artifacts" / "presto_s")
    (project / "artifacts" / "presto_s" / "presto_s.json").write_text(json.dumps(
        RECIPE | {"sampler": "consistency", "steps": 2, "guidance": "none", "scale": 0.0}))
    done = CliRunner().invoke(app, ["generate", "calm piano", "--model", "presto_s", "--seconds", "0.25",
                                    "--device", "cpu", "-o", str(tmp_path / "stage.wav")])
    assert done.exit_code == 0, done.output
    assert re.search(r"consistency, 2 steps, NFE 2\b", done.output)

    done = CliRunner().invoke(app, ["generate", "calm piano", "--model", "presto-nothing@best", "--device", "cpu"])
    assert done.exit_code == 2 and "models:/presto-nothing@best: not in the model registry" in done.output
