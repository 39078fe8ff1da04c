"""VAE training: the generator/discriminator split, loss going down, the trivial codec baseline, and the
train_vae stage end to end on a tiny corpus (output loads, a crash resumes from the last checkpoint)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from presto.config import load_params
from presto.data.shards import ShardWriter, write_manifest
from presto.errors import InputError, ParamsError
from presto.models.audio_losses import si_sdr
from presto.models.checkpoint import load_model
from presto.models.discriminators import MultiScaleSTFTDiscriminator, STFTDiscriminatorConfig
from presto.models.vae import AudioVAE, VAEConfig
from presto.training.vae_trainer import (
    VAELossWeights,
    VAETrainer,
    codec_comparison,
    latent_values_per_second,
    resampling_codec,
)
from stages import train_vae as stage
from stages.base import StageContext
from recording_tracker import RecordingTracker

REPO = Path(__file__).resolve().parents[1]
SR = 16000
TINY_VAE = VAEConfig(channels=4, channel_multipliers=[2, 4, 8], strides=[2, 4, 4], latent_channels=8,
                     dilations=[1, 3], kernel_size=7)  # hop 32
TINY_DISC = STFTDiscriminatorConfig(channels=4, fft_sizes=[64, 128], dilations=[1, 2])
FFT_SIZES = [64, 128, 256]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def tones(n: int, samples: int, seed: int = 0) -> torch.Tensor:
    """n clips [n, 1, samples] of two decaying harmonic tones each, at random pitches."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SR
    clips = []
    for _ in range(n):
        f = 110.0 * 2 ** (torch.randint(0, 24, (2,), generator=g) / 12)
        x = sum(0.5 ** h * torch.sin(2 * math.pi * f[:, None] * (h + 1) * t).sum(0) for h in range(3))
        clips.append(0.1 * x * torch.exp(-3 * t))
    return torch.stack(clips)[:, None]


def trainer(disc_start_step: int = 0, lr: float = 1e-3, grad_clip: float = 1e3, seed: int = 0) -> VAETrainer:
    torch.manual_seed(seed)
    return VAETrainer(AudioVAE(TINY_VAE), MultiScaleSTFTDiscriminator(TINY_DISC), lr=lr, betas=(0.8, 0.99),
                      weights=VAELossWeights(1.0, 1e-4, 0.1, 1.0), fft_sizes=FFT_SIZES, grad_clip=grad_clip,
                      disc_start_step=disc_start_step, ema_decay=0.9)


# --- the training step -------------------------------------------------------------------------------------

def test_discriminator_step_leaves_the_generator_alone():
    t = trainer()
    audio = tones(2, 1024)
    _, recon = t.generator_step(audio)
    # The generator's adversarial terms read D frozen: no gradient reached D's parameters.
    assert all(p.grad is None for p in t.discriminator.parameters())
    vae_grads = {n: p.grad.clone() for n, p in t.vae.named_parameters()}
    vae_weights = {n: p.detach().clone() for n, p in t.vae.named_parameters()}
    disc_before = [p.detach().clone() for p in t.discriminator.parameters()]

    t.discriminator_step(audio, recon)
    for n, p in t.vae.named_parameters():
        assert torch.equal(p.grad, vae_grads[n]), n
        assert torch.equal(p.detach(), vae_weights[n]), n
    assert all(p.grad is not None for p in t.discriminator.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(disc_before, t.discriminator.parameters()))


def test_generator_adversarial_terms_move_the_generator():
    """Past the warm-up the generator's loss holds the adversarial and feature-matching terms."""
    t = trainer(disc_start_step=1)
    audio = tones(2, 1024)
    first = t.train_step(audio)
    second = t.train_step(audio)
    assert "adv_g" not in first and "loss_d" not in first
    assert {"adv_g", "feature_matching", "loss_d"} <= second.keys()
    expected = second["stft"] + 1e-4 * second["kl"] + 0.1 * second["adv_g"] + 1.0 * second["feature_matching"]
    assert second["loss_g"] == pytest.approx(expected, rel=1e-5)


def test_no_side_loses_steps():
    """One generator step per iteration, and one discriminator step per iteration after the warm-up."""
    t = trainer(disc_start_step=2)
    audio = tones(2, 1024)
    for _ in range(5):
        t.train_step(audio)

    def adam_steps(opt):
        return {int(s["step"]) for s in opt.state.values()}

    assert t.step == 5
    assert adam_steps(t.opt_g) == {5}
    assert adam_steps(t.opt_d) == {3}


def test_gradients_are_clipped_to_the_asked_norm():
    t = trainer(disc_start_step=0, grad_clip=1e-3)
    audio = tones(2, 1024)
    logs, recon = t.generator_step(audio)
    logs |= t.discriminator_step(audio, recon)
    for module, key in ((t.vae, "grad_norm_g"), (t.discriminator, "grad_norm_d")):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
        assert logs[key] > 1e-2  # the norm before clipping is logged
        assert norm.item() == pytest.approx(1e-3, rel=1e-3)


def test_loss_decreases_on_a_tiny_set():
    t = trainer(disc_start_step=10_000, lr=3e-3)
    audio = tones(4, 2048)
    losses = [t.train_step(audio)["stft"] for _ in range(60)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_ema_model_holds_the_average():
    t = trainer()
    t.train_step(tones(2, 1024))
    ema = t.ema_model()
    for name, p in ema.named_parameters():
        assert torch.equal(p, t.ema.shadow[name])
    assert not ema.training and ema is not t.vae


# --- the trivial codec -------------------------------------------------------------------------------------

def sine(freq: float, seconds: float = 1.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(SR * seconds)) / SR)).astype(np.float32)


def test_resampling_codec_keeps_what_is_below_half_its_rate():
    low, high = sine(100.0), sine(2000.0)
    kept = resampling_codec(low, SR, 1000.0)
    assert kept.shape == low.shape
    middle = slice(SR // 10, -SR // 10)  # away from the resampler's edge transients
    assert si_sdr(torch.from_numpy(kept[middle])[None], torch.from_numpy(low[middle])[None]).item() > 30
    removed = resampling_codec(high, SR, 1000.0)
    assert np.mean(removed[middle] ** 2) < 1e-4 * np.mean(high ** 2)
    assert np.array_equal(resampling_codec(high, SR, SR), high)


def test_latent_data_rate():
    vae = AudioVAE(TINY_VAE)
    assert latent_values_per_second(vae, SR) == 8 * SR / 32


def test_codec_comparison_keys_and_a_perfect_baseline():
    torch.manual_seed(0)
    vae = AudioVAE(TINY_VAE.model_copy(update={"latent_channels": 64}))  # 64 x 500 values/s > 16 kHz
    audio = tones(2, 2048)
    scores = codec_comparison(vae, audio, sample_rate=SR, batch=1, fft_sizes=FFT_SIZES, mel_fft_size=256,
                              n_mels=16)
    assert set(scores) == {f"{who}_{m}" for who in ("vae", "resample") for m in ("stft_distance", "mel_l1",
                                                                                   "si_sdr_db", "chroma_similarity")}
    assert scores["resample_stft_distance"] == pytest.approx(0.0, abs=1e-6)  # at the full rate: the identity
    assert scores["vae_stft_distance"] > 0.1  # an untrained VAE is no codec


# --- the stage ---------------------------------------------------------------------------------------------

CLIP = 4096  # samples (0.256 s)


def make_augment(root: Path, sample_rate: int = SR) -> None:
    audio = tones(6, CLIP, seed=1)[:, 0].numpy()
    rows = []
    with ShardWriter(root / "artifacts" / "prepare", "mono", 4) as writer:
        for k, clip in enumerate(audio):
            shard, index = writer.add(clip)
            rows.append({"clip_id": f"c{k}", "track_id": f"t{k}", "split": "val" if k >= 4 else "train",
                         "shard": f"prepare/{shard}", "index": index, "seconds": CLIP / SR,
                         "sample_rate": sample_rate, "key": "C major"})
    (root / "artifacts" / "augment").mkdir(parents=True)
    write_manifest(root / "artifacts" / "augment" / "manifest.jsonl", rows)


def tiny_params(**changes):
    params = load_params(REPO / "params.yaml")
    p = params.train_vae.model_copy(update={**dict(
        model=TINY_VAE, discriminator=TINY_DISC, steps=6, batch=2, segment_seconds=1024 / SR,
        stft_fft_sizes=FFT_SIZES, disc_warmup_steps=2, log_every=2, ckpt_every=2, val_every=4, val_clips=2,
        examples=1, mel_fft_size=256, n_mels=16), **changes})
    return params.model_copy(update={"train_vae": p})


def context(root: Path, params) -> StageContext:
    out = root / "out"
    out.mkdir(exist_ok=True)
    return StageContext(name="train_vae", params=params, root=root, out_dir=out, checkpoint_dir=root / "ckpt",
                        fingerprint="test", tracker=RecordingTracker())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_vae")
    make_augment(root)
    ctx = context(root, tiny_params())
    torch.set_num_threads(1)
    return ctx, stage.run(ctx)


def test_stage_writes_a_loadable_model_and_metrics(straight):
    ctx, metrics = straight
    model, cfg = load_model(ctx.out_dir / "model")
    assert isinstance(model, AudioVAE) and cfg == TINY_VAE
    info = json.loads((ctx.out_dir / "vae.json").read_text())
    assert info == {"sample_rate": SR, "hop_length": 32, "latent_channels": 8, "frames_per_second": SR / 32,
                    "values_per_second": 8 * SR / 32}
    assert metrics["steps"] == 6 and metrics["steps_this_run"] == 6 and metrics["val_clips"] == 2
    for key in ("stft_distance", "mel_l1", "si_sdr_db", "chroma_similarity"):
        assert math.isfinite(metrics[f"val_vae_{key}"]) and math.isfinite(metrics[f"val_resample_{key}"])
    assert metrics["compression"] == 4.0


def test_stage_logs_curves_validation_and_examples(straight):
    ctx, _ = straight
    steps = ctx.tracker.by_step()
    assert set(steps) == {2, 4, 6}
    assert "loss_d" not in steps[2] and "loss_d" in steps[4]  # the discriminator starts after 2 steps
    assert "val_vae_mel_l1" in steps[4] and "val_resample_mel_l1" not in steps[4]
    assert "val_vae_mel_l1" in steps[6] and "val_resample_mel_l1" in steps[6]
    logged = dict(ctx.tracker.artifacts)
    assert logged["reconstructions/step-0000006"] == ["c4_original.wav", "c4_reconstruction.wav",
                                                      "spectrograms.png"]
    assert "reconstructions/step-0000004" in logged


class Crash(Exception):
    pass


def test_stage_resumes_from_its_last_checkpoint(straight, tmp_path, monkeypatch):
    ctx, _ = straight
    make_augment(tmp_path)
    crashing = context(tmp_path, tiny_params())
    real_step = stage.VAETrainer.train_step

    def crash_at_five(self, audio):
        if self.step == 4:  # the 5th iteration: states exist for steps 2 and 4
            raise Crash
        return real_step(self, audio)

    monkeypatch.setattr(stage.VAETrainer, "train_step", crash_at_five)
    with pytest.raises(Crash):
        stage.run(crashing)
    monkeypatch.setattr(stage.VAETrainer, "train_step", real_step)
    assert sorted(p.name for p in crashing.checkpoint_dir.glob("step-*")) == ["step-00000002", "step-00000004"]

    resumed = context(tmp_path, tiny_params())
    metrics = stage.run(resumed)
    assert resumed.tracker.tags["train_vae.resumed_from_step"] == "4"
    assert metrics["steps_this_run"] == 2
    # Weights, optimiser moments, EMA and the data order were all restored: same result as never stopping.
    a, _ = load_model(ctx.out_dir / "model")
    b, _ = load_model(resumed.out_dir / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_stage_names_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="run the augment stage"):
        stage.run(context(tmp_path, tiny_params()))
    make_augment(tmp_path)
    with pytest.raises(ParamsError, match="train_vae.segment_seconds"):
        stage.run(context(tmp_path, tiny_params(segment_seconds=100 / SR)))


def test_stage_refuses_clips_at_another_rate(tmp_path):
    make_augment(tmp_path, sample_rate=22050)
    with pytest.raises(InputError, match="22050 Hz but shared.sample_rate = 16000"):
        stage.run(context(tmp_path, tiny_params()))
