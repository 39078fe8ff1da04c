"""train_vae: the audio VAE, trained on random crops of augment's training clips, scored on the val split.

Writes `model/` (the EMA weights via save_model: safetensors + config.json), `vae.json` (the sample rate
and latent rate the model was trained for) and metrics: reconstruction quality on the first `val_clips`
validation clips beside the resampling codec at the same data rate. Resumable: a state is saved to
`ctx.checkpoint_dir` every `ckpt_every` steps, and a rerun continues from the newest one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from presto.audio.plots import save_spectrograms
from presto.config import TrainVAEParams
from presto.data.shards import MANIFEST, ShardReader, read_clip_manifest
from presto.errors import InputError, ParamsError
from presto.models.audio_losses import reconstruction_metrics
from presto.models.checkpoint import save_model
from presto.models.discriminators import MultiScaleSTFTDiscriminator
from presto.models.vae import AudioVAE
from presto.training.step_loop import LoopSchedule, resume_latest, train_to_end
from presto.training.vae_trainer import (
    VAELossWeights,
    VAETrainer,
    codec_comparison,
    latent_values_per_second,
    reconstruct,
)
from stages.base import StageContext

MODEL = "model"
VAE_INFO = "vae.json"


def mono_clip(reader: ShardReader, row: dict[str, Any]) -> np.ndarray:
    clip = reader.clip(row)
    if clip.ndim != 1:
        raise InputError(f"clip {row['clip_id']} in {row['shard']} is not mono (shape {clip.shape})")
    return clip


class CropSampler:
    """Batches [B, 1, segment] of random crops of random clips, drawn with torch's global RNG (so a restored
    training state also restores the data order). Crops start inside the clip's content (`seconds`); a clip
    shorter than the segment is zero-padded."""

    def __init__(self, reader: ShardReader, rows: list[dict[str, Any]], segment: int):
        self.reader, self.rows, self.segment = reader, rows, segment

    def batch(self, size: int) -> Tensor:
        out = torch.zeros(size, 1, self.segment)
        for b in range(size):
            row = self.rows[int(torch.randint(len(self.rows), ()))]
            clip = mono_clip(self.reader, row)
            content = min(len(clip), round(row["seconds"] * row["sample_rate"]))
            start = int(torch.randint(max(1, content - self.segment + 1), ()))
            piece = clip[start:start + self.segment]
            out[b, 0, :len(piece)] = torch.from_numpy(piece)
        return out


def segment_samples(p: TrainVAEParams, sample_rate: int, hop: int) -> int:
    """The crop length: segment_seconds rounded down to whole latent frames, long enough for every FFT."""
    segment = int(p.segment_seconds * sample_rate) // hop * hop
    longest = max(p.stft_fft_sizes + p.discriminator.fft_sizes + [p.mel_fft_size])
    if segment < longest:
        raise ParamsError(f"train_vae.segment_seconds = {p.segment_seconds} gives {segment} samples "
                          f"(whole frames of {hop}), shorter than the largest FFT size {longest}")
    return segment


def whole_clips(reader: ShardReader, rows: list[dict[str, Any]], hop: int) -> Tensor:
    """The rows' whole clips [B, 1, N], cut to the shortest one's whole latent frames."""
    clips = [mono_clip(reader, r) for r in rows]
    length = min(len(c) for c in clips) // hop * hop
    return torch.from_numpy(np.stack([c[:length] for c in clips]))[:, None]


def log_examples(ctx: StageContext, vae: AudioVAE, audio: Tensor, ids: list[str], sample_rate: int,
                 step: int) -> None:
    """Original/reconstruction wav pairs and one spectrogram PNG of them, to the tracker."""
    recon = reconstruct(vae, audio, len(audio))
    with tempfile.TemporaryDirectory() as tmp:
        pictures = []
        for clip_id, x, y in zip(ids, audio[:, 0].cpu().numpy(), recon[:, 0].cpu().numpy()):
            sf.write(Path(tmp, f"{clip_id}_original.wav"), x, sample_rate)
            sf.write(Path(tmp, f"{clip_id}_reconstruction.wav"), np.clip(y, -1, 1), sample_rate)
            pictures += [(f"{clip_id} original", x), (f"{clip_id} reconstruction (step {step})", y)]
        save_spectrograms(pictures, sample_rate, Path(tmp, "spectrograms.png"))
        ctx.tracker.log_artifact(tmp, subdir=f"reconstructions/step-{step:07d}")


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.train_vae
    sr = ctx.params.shared.sample_rate
    artifacts = ctx.root / "artifacts"
    rows = read_clip_manifest(ctx.upstream("augment") / MANIFEST, artifacts, sr, "augment")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"][:p.val_clips]
    if not train or not val:
        raise InputError(f"{ctx.upstream('augment') / MANIFEST}: {len(train)} train and {len(val)} val clips; "
                         "the VAE needs both (prepare.val_fraction > 0)")
    device = torch.device("cuda" if p.resources.gpus > 0 else "cpu")

    torch.manual_seed(ctx.params.shared.seed)
    vae = AudioVAE(p.model).to(device)
    trainer = VAETrainer(
        vae, MultiScaleSTFTDiscriminator(p.discriminator).to(device), lr=p.lr, betas=p.betas,
        weights=VAELossWeights(p.stft_weight, p.kl_weight, p.adversarial_weight, p.feature_matching_weight),
        fft_sizes=p.stft_fft_sizes, grad_clip=p.grad_clip, disc_start_step=p.disc_warmup_steps,
        ema_decay=p.ema_decay,
    )
    segment = segment_samples(p, sr, vae.hop_length)
    reader = ShardReader(artifacts)
    sampler = CropSampler(reader, train, segment)
    val_clips = whole_clips(reader, val, vae.hop_length).to(device)
    examples = val_clips[:p.examples]
    example_ids = [r["clip_id"] for r in val[:p.examples]]
    metric_settings = dict(sample_rate=sr, fft_sizes=p.stft_fft_sizes, mel_fft_size=p.mel_fft_size,
                           n_mels=p.n_mels)

    first_step = resume_latest("train_vae", trainer, ctx.checkpoint_dir)
    ctx.tracker.set_tags({"train_vae.parameters_vae": str(sum(t.numel() for t in vae.parameters())),
                          "train_vae.resumed_from_step": str(first_step)})

    def validate(step: int) -> None:
        ema = trainer.ema_model()
        scores = reconstruction_metrics(reconstruct(ema, val_clips, p.batch), val_clips, **metric_settings)
        ctx.tracker.log_metrics({f"val_vae_{k}": v for k, v in scores.items()}, step=step)
        if p.examples:
            log_examples(ctx, ema, examples, example_ids, sr, step)

    train_seconds = train_to_end(
        "train_vae", trainer, lambda: sampler.batch(p.batch).to(device),
        LoopSchedule(p.steps, p.log_every, p.ckpt_every, p.val_every), checkpoint_dir=ctx.checkpoint_dir,
        audio_seconds_per_step=p.batch * segment / sr,
        log_metrics=lambda metrics, step: ctx.tracker.log_metrics(metrics, step=step), validate=validate)

    ema = trainer.ema_model()
    scores = codec_comparison(ema, val_clips, batch=p.batch, **metric_settings)
    ctx.tracker.log_metrics({f"val_{k}": v for k, v in scores.items()}, step=p.steps)
    if p.examples:
        log_examples(ctx, ema, examples, example_ids, sr, p.steps)
    save_model(ema.cpu(), p.model, ctx.out_dir / MODEL)
    info = {"sample_rate": sr, "hop_length": vae.hop_length, "latent_channels": p.model.latent_channels,
            "frames_per_second": sr / vae.hop_length,
            "values_per_second": latent_values_per_second(vae, sr)}
    (ctx.out_dir / VAE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return {
        **{f"val_{k}": v for k, v in scores.items()},
        "steps": p.steps,
        "steps_this_run": p.steps - first_step,
        "train_seconds_this_run": train_seconds,
        "parameters_vae": sum(t.numel() for t in vae.parameters()),
        "frames_per_second": sr / vae.hop_length,
        "compression": vae.hop_length / p.model.latent_channels,
        "val_clips": len(val),
    }
