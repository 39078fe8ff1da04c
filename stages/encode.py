"""encode: every clip (training clips with their augmented copies, validation, test) to normalised latents,
and every caption to text embeddings, once, since both the VAE and the text encoder are frozen from here on.

Latents are the posterior *mean* of the VAE (no sampling noise: the diffusion model learns the encoder's
deterministic map, and decoding the mean is the VAE's best reconstruction). Audio is encoded in chunks of
`encode.chunk_seconds` with exact overlap (the VAE's receptive field), so long clips have no seams.

Two passes: the first writes raw latents and measures per-channel mean/std over the *training* latents;
the second rewrites each shard normalised, z_n = (z - mean_c) / std_c * sigma_data, as float16. Captions are
deduplicated and sorted by length before encoding, so a text shard pads little. Layout: presto/data/latents.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from presto.data.latents import (
    LATENT_STATS,
    TEXT_ENCODER,
    ChannelMoments,
    LatentShardWriter,
    LatentStats,
    normalise_shard,
    save_text_shard,
)
from presto.data.shards import MANIFEST, ShardReader, read_clip_manifest, read_manifest, write_manifest
from presto.errors import InputError
from presto.models.checkpoint import load_model
from presto.models.vae import AudioVAE
from presto.text.condition import TextCondition
from presto.text.encoder import load_text_encoder
from presto.training.progress import Progress
from stages.base import StageContext
from stages.train_vae import MODEL, VAE_INFO, mono_clip

CAPTIONS = "captions.jsonl"
# Upstream keys of the stereo copy, meaningless beside latents of the mono clip. The mono clip's own shard
# and index are kept as audio_shard / audio_index, so evaluation can find the original audio.
DROPPED_KEYS = ("stereo_shard", "stereo_index")


def load_vae(folder: Path, sample_rate: int, device: torch.device) -> AudioVAE:
    info_path = folder / VAE_INFO
    if not info_path.is_file():
        raise InputError(f"{info_path}: not found; run the train_vae stage first")
    info = json.loads(info_path.read_text())
    if info["sample_rate"] != sample_rate:
        raise InputError(f"{info_path}: the VAE was trained at {info['sample_rate']} Hz but shared.sample_rate = "
                         f"{sample_rate}; rerun train_vae")
    vae, _ = load_model(folder / MODEL, device=device)
    if not isinstance(vae, AudioVAE):
        raise InputError(f"{folder / MODEL}: holds a {type(vae).__name__}, not an AudioVAE")
    return vae.eval()


def read_captions(path: Path, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """caption's rows by clip_id; every clip must have at least one caption."""
    if not path.is_file():
        raise InputError(f"{path}: captions not found; run the caption stage first")
    by_clip = {r["clip_id"]: r for r in read_manifest(path)}
    for row in rows:
        found = by_clip.get(row["clip_id"])
        if found is None or not found.get("captions"):
            raise InputError(f"{path}: clip {row['clip_id']} has no captions; rerun the caption stage")
    return by_clip


def batches(rows: list[dict[str, Any]], reader: ShardReader, size: int):
    """(rows, audio [B, 1, N]) of up to `size` consecutive clips of equal length."""
    group: list[tuple[dict[str, Any], torch.Tensor]] = []
    for row in rows:
        clip = torch.from_numpy(mono_clip(reader, row))
        if group and (len(group) == size or group[0][1].shape != clip.shape):
            yield [r for r, _ in group], torch.stack([c for _, c in group])[:, None]
            group = []
        group.append((row, clip))
    if group:
        yield [r for r, _ in group], torch.stack([c for _, c in group])[:, None]


@torch.no_grad()
def encode_audio(ctx: StageContext, vae: AudioVAE, rows: list[dict[str, Any]],
                 device: torch.device) -> tuple[list[dict[str, Any]], list[str], LatentStats, Tensor, float]:
    """Pass 1 and 2: latent shards in ctx.out_dir; returns (rows with shard/index/frames, shard names,
    statistics, the mean posterior std per channel over the train latents, audio seconds encoded)."""
    p = ctx.params.encode
    sr = ctx.params.shared.sample_rate
    chunk_frames = max(1, round(p.chunk_seconds * sr / vae.hop_length))
    reader = ShardReader(ctx.root / "artifacts")
    moments = ChannelMoments(vae.config.latent_channels)
    posterior = ChannelMoments(vae.config.latent_channels)  # of the posterior std: only its mean is used
    out_rows: list[dict[str, Any]] = []
    audio_seconds = 0.0
    progress = Progress("encode: audio", len(rows), unit="clip")
    with LatentShardWriter(ctx.out_dir, "latents", p.shard_clips) as writer:
        for group, audio in batches(rows, reader, p.batch):
            mean, std = vae.encode_long(audio.to(device), chunk_frames, mirror_edges=p.mirror_edges)
            mean = mean.float().cpu()
            train = torch.tensor([r["split"] == "train" for r in group])
            if train.any():
                moments.add(mean[train])
                posterior.add(std.float().cpu()[train])
            for row, z in zip(group, mean):
                shard, index = writer.add(z)
                kept = {k: v for k, v in row.items() if k not in ("shard", "index", *DROPPED_KEYS)}
                out_rows.append({**kept, "audio_shard": row["shard"], "audio_index": row["index"],
                                 "shard": shard, "index": index, "frames": z.shape[-1]})
            audio_seconds += audio.shape[0] * audio.shape[-1] / sr
            progress.update(len(out_rows))
        names = writer.names
    if moments.count == 0:
        raise InputError(f"{ctx.upstream('augment') / MANIFEST}: no train clips; the latent statistics are "
                         "measured on the train split")
    mean, std = moments.mean_std()
    stats = LatentStats(mean=mean.tolist(), std=std.tolist(), sigma_data=p.sigma_data, hop_length=vae.hop_length,
                        sample_rate=sr, frames_per_second=sr / vae.hop_length,
                        latent_channels=vae.config.latent_channels)
    for name in names:
        normalise_shard(ctx.out_dir / name, stats)
    return out_rows, names, stats, posterior.mean_std()[0].float(), audio_seconds


def _stack(items: list[tuple[torch.Tensor, torch.Tensor]]) -> TextCondition:
    """Token states [L_i, D] and pooled vectors [D] -> one padded TextCondition."""
    longest = max(1, max(t.shape[0] for t, _ in items))
    tokens = torch.zeros(len(items), longest, items[0][0].shape[1])
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, (t, _) in enumerate(items):
        tokens[i, :t.shape[0]], mask[i, :t.shape[0]] = t, True
    return TextCondition(tokens, mask, torch.stack([pooled for _, pooled in items]))


def encode_text(ctx: StageContext, captions: list[str], device: torch.device) -> tuple[dict[str, list[Any]], int]:
    """Text shards in ctx.out_dir for the unique `captions`; returns ({caption: [shard, index]}, shard count)."""
    p = ctx.params.encode
    encoder = load_text_encoder(p.text_encoder, device=str(device))
    ordered = sorted(set(captions), key=lambda c: (len(c), c))
    refs: dict[str, list[Any]] = {}
    progress = Progress("encode: text", len(ordered), unit="caption")
    shards = 0
    for first in range(0, len(ordered), p.shard_captions):
        shard_texts = ordered[first:first + p.shard_captions]
        items = []
        for i in range(0, len(shard_texts), p.text_batch):
            cond = encoder.encode(shard_texts[i:i + p.text_batch])
            items += [(t[m], pooled) for t, m, pooled in zip(cond.tokens, cond.mask, cond.pooled)]
        name = f"text-{shards:05d}.safetensors"
        save_text_shard(ctx.out_dir / name, _stack(items))
        refs.update({text: [name, i] for i, text in enumerate(shard_texts)})
        shards += 1
        progress.update(first + len(shard_texts))
    return refs, shards


def run(ctx: StageContext) -> dict[str, float]:
    p = ctx.params.encode
    sr = ctx.params.shared.sample_rate
    rows = read_clip_manifest(ctx.upstream("augment") / MANIFEST, ctx.root / "artifacts", sr, "augment")
    captions = read_captions(ctx.upstream("caption") / CAPTIONS, rows)
    device = torch.device("cuda" if p.resources.gpus > 0 else "cpu")
    vae = load_vae(ctx.upstream("train_vae"), sr, device)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    encoded, latent_shards, stats, posterior_std, audio_seconds = encode_audio(ctx, vae, rows, device)
    audio_wall = time.perf_counter() - start
    stats.save(ctx.out_dir / LATENT_STATS)

    start = time.perf_counter()
    all_captions = [c for r in rows for c in captions[r["clip_id"]]["captions"]]
    refs, text_shards = encode_text(ctx, all_captions, device)
    text_wall = time.perf_counter() - start
    (ctx.out_dir / TEXT_ENCODER).write_text(p.text_encoder.model_dump_json(indent=2) + "\n")

    out_rows = []
    for row in encoded:
        clip = captions[row["clip_id"]]
        out_rows.append({**row, "captions": clip["captions"], "caption_refs": [refs[c] for c in clip["captions"]],
                         "analysis": clip.get("analysis", {})})
    write_manifest(ctx.out_dir / MANIFEST, out_rows)

    # A channel whose posterior mean varies less across the corpus than the encoder's own posterior noise
    # carries next to no information (posterior collapse): the decoder was trained to ignore it.
    snr = torch.tensor(stats.std) / posterior_std
    metrics: dict[str, float] = {
        "clips": len(out_rows),
        "clips_train": sum(r["split"] == "train" for r in out_rows),
        "latent_shards": len(latent_shards),
        "latent_channels": stats.latent_channels,
        "frames_per_second": stats.frames_per_second,
        "latent_std_min": min(stats.std),
        "latent_std_max": max(stats.std),
        "latent_snr_min": float(snr.min()),
        "latent_snr_median": float(snr.median()),
        "informative_channels": int((snr > 1).sum()),
        "captions": len(all_captions),
        "captions_unique": len(refs),
        "text_shards": text_shards,
        "audio_seconds": audio_seconds,
        "encode_audio_seconds_per_second": audio_seconds / audio_wall,
        "text_seconds": text_wall,
    }
    ctx.tracker.log_metrics(metrics)
    ctx.tracker.log_artifact(ctx.out_dir / LATENT_STATS)
    return metrics
