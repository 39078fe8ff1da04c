"""train_stereo: the mono-to-stereo upmixer, trained on random crops of prepare's stereo training clips.

The upmixer's input is the downmix (L + R) / 2 of a real stereo crop, its target that crop's side signal.
Writes `model/` (save_model: safetensors + config.json) and `upmixer.json` (the sample rate it was trained
at), which presto.models.upmixer.load_upmixer reads, and metrics: on the first `val_clips` stereo clips of
the val split, side-signal STFT distance, inter-channel correlation and width of the upmix beside dual mono
(side = 0). Resumable: a state is saved to `ctx.checkpoint_dir` every `ckpt_every` steps, and a rerun
continues from the newest one.
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

from presto.config import TrainStereoParams
from presto.data.shards import MANIFEST, ShardReader, check_shards, read_clip_manifest
from presto.errors import InputError, ParamsError
from presto.eval.stereo import stereo_comparison
from presto.models.checkpoint import save_model
from presto.models.discriminators import MultiScaleSTFTDiscriminator
from presto.models.upmixer import INFO_FILE, MODEL_DIR, Upmixer, split_mid_side
from presto.training.step_loop import LoopSchedule, resume_latest, train_to_end
from presto.training.upmix_trainer import UpmixLossWeights, UpmixTrainer, upmix_batched
from stages.base import StageContext


def stereo_rows(manifest: Path, artifacts: Path, sample_rate: int) -> list[dict[str, Any]]:
    """prepare's manifest rows that have a stereo clip, checked as read_clip_manifest does, stereo shards too."""
    rows = [r for r in read_clip_manifest(manifest, artifacts, sample_rate, "prepare") if "stereo_shard" in r]
    if not rows:
        raise InputError(f"{manifest}: no stereo clips; the upmixer needs stereo sources in the corpus and "
                         "prepare.keep_stereo: true")
    check_shards(manifest, rows, artifacts, key="stereo_shard")
    return rows


def stereo_clip(reader: ShardReader, row: dict[str, Any]) -> np.ndarray:
    clip = reader.clip({"shard": row["stereo_shard"], "index": row["stereo_index"]})
    if clip.ndim != 2 or clip.shape[0] != 2:
        raise InputError(f"clip {row['clip_id']} in {row['stereo_shard']} is not stereo (shape {clip.shape})")
    return clip


class StereoCropSampler:
    """Batches [B, 2, segment] of random crops of random stereo clips, drawn with torch's global RNG (so a
    restored training state also restores the data order). Crops start inside the clip's content
    (`seconds`); a clip shorter than the segment is zero-padded."""

    def __init__(self, reader: ShardReader, rows: list[dict[str, Any]], segment: int):
        self.reader, self.rows, self.segment = reader, rows, segment

    def batch(self, size: int) -> Tensor:
        out = torch.zeros(size, 2, self.segment)
        for b in range(size):
            row = self.rows[int(torch.randint(len(self.rows), ()))]
            clip = stereo_clip(self.reader, row)
            content = min(clip.shape[1], round(row["seconds"] * row["sample_rate"]))
            start = int(torch.randint(max(1, content - self.segment + 1), ()))
            piece = clip[:, start:start + self.segment]
            out[b, :, :piece.shape[1]] = torch.from_numpy(piece)
        return out


def segment_samples(p: TrainStereoParams, sample_rate: int) -> int:
    segment = int(p.segment_seconds * sample_rate)
    longest = max(p.stft_fft_sizes + p.discriminator.fft_sizes)
    if segment < longest:
        raise ParamsError(f"train_stereo.segment_seconds = {p.segment_seconds} gives {segment} samples, "
                          f"shorter than the largest FFT size {longest}")
    return segment


def log_examples(ctx: StageContext, upmixer: Upmixer, real: Tensor, ids: list[str], sample_rate: int,
                 step: int) -> None:
    """(mono input, real stereo, upmixed stereo) wavs per example clip, to the tracker."""
    mono = split_mid_side(real)[0]
    upmixed = upmix_batched(upmixer, mono, len(mono))
    with tempfile.TemporaryDirectory() as tmp:
        for clip_id, m, r, u in zip(ids, mono[:, 0].cpu().numpy(), real.cpu().numpy(), upmixed.cpu().numpy()):
            sf.write(Path(tmp, f"{clip_id}_mono.wav"), m, sample_rate)
            sf.write(Path(tmp, f"{clip_id}_real_stereo.wav"), r.T, sample_rate)
            sf.write(Path(tmp, f"{clip_id}_upmixed_stereo.wav"), np.clip(u.T, -1, 1), sample_rate)
        ctx.tracker.log_artifact(tmp, subdir=f"upmixes/step-{step:07d}")


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.train_stereo
    sr = ctx.params.shared.sample_rate
    artifacts = ctx.root / "artifacts"
    manifest = ctx.upstream("prepare") / MANIFEST
    rows = stereo_rows(manifest, artifacts, sr)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"][:p.val_clips]
    if not train or not val:
        raise InputError(f"{manifest}: {len(train)} train and {len(val)} val stereo clips; the upmixer needs "
                         "both (stereo sources in both splits, prepare.keep_stereo: true, prepare.val_fraction > 0)")
    device = torch.device("cuda" if p.resources.gpus > 0 else "cpu")

    torch.manual_seed(ctx.params.shared.seed)
    upmixer = Upmixer(p.model).to(device)
    trainer = UpmixTrainer(
        upmixer, MultiScaleSTFTDiscriminator(p.discriminator).to(device), lr=p.lr, betas=p.betas,
        weights=UpmixLossWeights(p.side_weight, p.channel_weight, p.adversarial_weight, p.feature_matching_weight),
        fft_sizes=p.stft_fft_sizes, grad_clip=p.grad_clip, disc_start_step=p.disc_warmup_steps,
    )
    segment = segment_samples(p, sr)
    reader = ShardReader(artifacts)
    sampler = StereoCropSampler(reader, train, segment)
    clips = [stereo_clip(reader, r) for r in val]
    length = min(c.shape[1] for c in clips)
    val_clips = torch.from_numpy(np.stack([c[:, :length] for c in clips])).to(device)
    examples, example_ids = val_clips[:p.examples], [r["clip_id"] for r in val[:p.examples]]

    first_step = resume_latest("train_stereo", trainer, ctx.checkpoint_dir)
    ctx.tracker.set_tags({"train_stereo.parameters_upmixer": str(sum(t.numel() for t in upmixer.parameters())),
                          "train_stereo.resumed_from_step": str(first_step)})

    def val_scores() -> dict[str, float]:
        upmixed = upmix_batched(upmixer, split_mid_side(val_clips)[0], p.batch)
        return stereo_comparison(upmixed, val_clips, p.stft_fft_sizes)

    def validate(step: int) -> None:
        scores = val_scores()
        ctx.tracker.log_metrics({f"val_{k}": v for k, v in scores.items() if k.startswith("upmix_")}, step=step)
        if p.examples:
            log_examples(ctx, upmixer, examples, example_ids, sr, step)

    train_seconds = train_to_end(
        "train_stereo", trainer, lambda: sampler.batch(p.batch).to(device),
        LoopSchedule(p.steps, p.log_every, p.ckpt_every, p.val_every), checkpoint_dir=ctx.checkpoint_dir,
        audio_seconds_per_step=p.batch * segment / sr,
        log_metrics=lambda metrics, step: ctx.tracker.log_metrics(metrics, step=step), validate=validate)

    scores = val_scores()
    ctx.tracker.log_metrics({f"val_{k}": v for k, v in scores.items()}, step=p.steps)
    if p.examples:
        log_examples(ctx, upmixer, examples, example_ids, sr, p.steps)
    save_model(upmixer.cpu().eval(), p.model, ctx.out_dir / MODEL_DIR)
    (ctx.out_dir / INFO_FILE).write_text(json.dumps({"sample_rate": sr}, indent=2) + "\n")
    return {
        **{f"val_{k}": v for k, v in scores.items()},
        "steps": p.steps,
        "steps_this_run": p.steps - first_step,
        "train_seconds_this_run": train_seconds,
        "parameters_upmixer": sum(t.numel() for t in upmixer.parameters()),
        "val_clips": len(val),
        "train_clips": len(train),
    }
