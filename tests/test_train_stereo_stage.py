"""The train_stereo stage end to end on a tiny synthetic prepare output: a loadable upmixer and metrics beside
dual mono, curves and audio triples logged, a crash resumes from the last checkpoint, clear input errors; and
`presto generate --stereo` with the upmixer."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from recording_tracker import RecordingTracker
from test_upmixer import FFT_SIZES, SR, TINY_DISC, TINY_UPMIXER, panned
from typer.testing import CliRunner

from flows.cli import app
from presto.config import load_params
from presto.data.shards import ShardWriter, write_manifest
from presto.errors import InputError, ParamsError
from presto.models.checkpoint import save_model
from presto.models.upmixer import Upmixer, load_upmixer
from presto.models.vae import AudioVAE
from stages import train_stereo as stage
from stages.base import StageContext

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread

REPO = Path(__file__).resolve().parents[1]
CLIP = 4096  # samples (0.256 s)


def make_prepare(root: Path, stereo: bool = True) -> None:
    """prepare's out folder: 6 clips (4 train, 2 val), mono shards and, if `stereo`, their stereo originals."""
    clips = panned(6, CLIP, seed=3)
    rows = []
    out = root / "artifacts" / "prepare"
    with ShardWriter(out, "mono", 4) as mono, ShardWriter(out, "stereo", 4) as two:
        for k, clip in enumerate(clips):
            shard, index = mono.add(clip.mean(0).numpy())
            row = {"clip_id": f"c{k}", "track_id": f"t{k}", "split": "val" if k >= 4 else "train",
                   "shard": f"prepare/{shard}", "index": index, "seconds": CLIP / SR, "sample_rate": SR}
            if stereo:
                sshard, sindex = two.add(clip.numpy())
                row |= {"stereo_shard": f"prepare/{sshard}", "stereo_index": sindex}
            rows.append(row)
    write_manifest(out / "manifest.jsonl", rows)


def tiny_params(**changes):
    params = load_params(REPO / "params.yaml")
    p = params.train_stereo.model_copy(update={**dict(
        model=TINY_UPMIXER, discriminator=TINY_DISC, steps=6, batch=2, segment_seconds=1024 / SR,
        stft_fft_sizes=FFT_SIZES, disc_warmup_steps=2, log_every=2, ckpt_every=2, val_every=4, val_clips=2,
        examples=1), **changes})
    return params.model_copy(update={"train_stereo": p})


def context(root: Path, params) -> StageContext:
    out = root / "out"
    out.mkdir(exist_ok=True)
    return StageContext(name="train_stereo", params=params, root=root, out_dir=out,
                        checkpoint_dir=root / "ckpt", fingerprint="test", tracker=RecordingTracker())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_stereo")
    make_prepare(root)
    ctx = context(root, tiny_params())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ctx, stage.run(ctx)
    finally:
        torch.set_num_threads(threads)


def test_stage_writes_a_loadable_upmixer_and_metrics(straight):
    ctx, metrics = straight
    upmixer = load_upmixer(ctx.out_dir, sample_rate=SR)
    assert isinstance(upmixer, Upmixer) and upmixer.config == TINY_UPMIXER
    assert json.loads((ctx.out_dir / "upmixer.json").read_text()) == {"sample_rate": SR}
    assert metrics["steps"] == 6 and metrics["steps_this_run"] == 6
    assert metrics["val_clips"] == 2 and metrics["train_clips"] == 4
    for key in ("side_stft_distance", "channel_stft_distance", "correlation", "correlation_error", "width",
                "width_error"):
        assert math.isfinite(metrics[f"val_upmix_{key}"]) and math.isfinite(metrics[f"val_dual_mono_{key}"])
    assert metrics["val_dual_mono_correlation"] == pytest.approx(1.0) and metrics["val_dual_mono_width"] == 0.0
    assert 0 < metrics["val_real_width"] < 1


def test_stage_logs_curves_validation_and_audio_triples(straight):
    ctx, _ = straight
    steps = ctx.tracker.by_step()
    assert set(steps) == {2, 4, 6}
    assert "loss_d" not in steps[2] and "loss_d" in steps[4]  # the discriminator starts after 2 steps
    assert "val_upmix_side_stft_distance" in steps[4] and "val_dual_mono_side_stft_distance" not in steps[4]
    assert "val_dual_mono_side_stft_distance" in steps[6]
    logged = dict(ctx.tracker.artifacts)
    assert logged["upmixes/step-0000006"] == ["c4_mono.wav", "c4_real_stereo.wav", "c4_upmixed_stereo.wav"]
    assert "upmixes/step-0000004" in logged


class Crash(Exception):
    pass


def test_stage_resumes_from_its_last_checkpoint(straight, tmp_path, monkeypatch):
    ctx, _ = straight
    make_prepare(tmp_path)
    real_step = stage.UpmixTrainer.train_step

    def crash_at_five(self, stereo):
        if self.step == 4:  # the 5th iteration: states exist for steps 2 and 4
            raise Crash
        return real_step(self, stereo)

    monkeypatch.setattr(stage.UpmixTrainer, "train_step", crash_at_five)
    crashing = context(tmp_path, tiny_params())
    with pytest.raises(Crash):
        stage.run(crashing)
    monkeypatch.setattr(stage.UpmixTrainer, "train_step", real_step)
    assert sorted(p.name for p in crashing.checkpoint_dir.glob("step-*")) == ["step-00000002", "step-00000004"]

    resumed = context(tmp_path, tiny_params())
    metrics = stage.run(resumed)
    assert resumed.tracker.tags["train_stereo.resumed_from_step"] == "4"
    assert metrics["steps_this_run"] == 2
    # Weights, optimiser moments and the data order were restored: the same model as never stopping.
    a = load_upmixer(ctx.out_dir, sample_rate=SR)
    b = load_upmixer(resumed.out_dir, sample_rate=SR)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_stage_without_stereo_clips_names_the_param(tmp_path):
    with pytest.raises(InputError, match="run the prepare stage"):
        stage.run(context(tmp_path, tiny_params()))
    make_prepare(tmp_path, stereo=False)
    with pytest.raises(InputError, match="no stereo clips.*prepare.keep_stereo"):
        stage.run(context(tmp_path, tiny_params()))


def test_stage_names_bad_params_and_rates(tmp_path):
    make_prepare(tmp_path)
    with pytest.raises(ParamsError, match="train_stereo.segment_seconds"):
        stage.run(context(tmp_path, tiny_params(segment_seconds=100 / SR)))
    params = tiny_params()
    params = params.model_copy(update={"shared": params.shared.model_copy(update={"sample_rate": 22050})})
    with pytest.raises(InputError, match="16000 Hz but shared.sample_rate = 22050"):
        stage.run(context(tmp_path, params))



def test_generate_writes_a_stereo_wav_with_the_upmixer(tmp_path, monkeypatch):
    """`presto generate --stereo` on a bundle of random models: a 2-channel wav whose downmix is the mono
    generation, and the upmix time printed."""
    from test_generation import EDM_FILE, LATENT_STATS, MODEL_DIR, TEXT_ENCODER, VAE_CFG, random_dit, stats

    from presto.generation import Generator

    artifacts = tmp_path / "artifacts"
    dit = random_dit(text_dim=384)  # the packaged MiniLM's width
    save_model(dit, dit.cfg, artifacts / "train_dit" / MODEL_DIR)
    (artifacts / "train_dit" / EDM_FILE).write_text(json.dumps({"sigma_data": 0.5, "sigma_min": 0.002,
                                                                "sigma_max": 80.0}))
    save_model(AudioVAE(VAE_CFG), VAE_CFG, artifacts / "train_vae" / "model")
    (artifacts / "encode").mkdir()
    stats().save(artifacts / "encode" / LATENT_STATS)
    (artifacts / "encode" / TEXT_ENCODER).write_text(json.dumps({"kind": "minilm", "path": None, "max_tokens": 32}))
    torch.manual_seed(0)
    save_model(Upmixer(TINY_UPMIXER), TINY_UPMIXER, artifacts / "train_stereo" / "model")
    (artifacts / "train_stereo" / "upmixer.json").write_text(json.dumps({"sample_rate": stats().sample_rate}))
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")

    # In-process: the CLI's environment defaults (configure) go into a copy of the environment, dropped after.
    monkeypatch.setattr(os, "environ", dict(os.environ, PRESTO_ROOT=str(tmp_path)))
    done = CliRunner().invoke(app, ["generate", "calm piano", "--steps", "2", "--seconds", "0.5", "--device", "cpu",
                                    "--seed", "3", "--stereo", "-o", str(tmp_path / "stereo.wav")])
    assert done.exit_code == 0, done.output
    assert "stereo" in done.output and re.search(r"upmix \d+ ms", done.output)
    two, rate = sf.read(tmp_path / "stereo.wav", dtype="float32")

    generator = Generator.load(artifacts / "train_dit", vae_dir=artifacts / "train_vae" / "model",
                               encode_dir=artifacts / "encode", device=torch.device("cpu"))
    recipe = load_params(tmp_path / "params.yaml").generate.recipe.model_copy(update={"steps": 2})
    one, _ = generator.generate(["calm piano"], 0.5, [3], recipe)
    assert rate == stats().sample_rate and two.shape == (one.shape[1], 2)
    np.testing.assert_allclose(two.mean(1), one[0], atol=2 / 32768)  # 16-bit wav: the downmix is the mono clip
    assert np.abs(two[:, 0] - two[:, 1]).max() > 0
