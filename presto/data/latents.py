"""The latent store written by the encode stage, and the dataset that training reads from it.

Folder layout (every name relative to the folder, so it can be moved as a whole):

    latents-00000.safetensors   {"latents": float16 [N, C, T]}, normalised (see LatentStats)
    text-00000.safetensors      {"tokens": float16 [M, L, D] zero-padded to the shard's longest caption,
                                 "mask": bool [M, L] (True on real tokens), "pooled": float16 [M, D]}
    latent_stats.json           LatentStats
    text_encoder.json           the TextEncoderConfig that made the text embeddings
    manifest.jsonl              one row per clip: clip_id, split, shard, index, frames, captions,
                                caption_refs [[text shard, index], ...] (one per caption), metadata

Normalisation: z_n = (z - mean_c) / std_c * sigma_data, with per-channel mean and std measured on the
training split, so every channel of the training latents has mean 0 and std sigma_data, the scale EDM's
preconditioning assumes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from presto.data.shards import MANIFEST, read_manifest
from presto.errors import InputError
from presto.text.condition import TextCondition

LATENT_STATS = "latent_stats.json"
TEXT_ENCODER = "text_encoder.json"
# A channel whose std is below this is constant for all practical purposes; dividing by its true std would
# turn float rounding into a full-scale signal.
MIN_CHANNEL_STD = 1e-6


@dataclass(frozen=True)
class LatentStats:
    """Per-channel statistics of the training latents and the facts needed to turn latents back into audio."""

    mean: list[float]  # [C]
    std: list[float]  # [C]
    sigma_data: float
    hop_length: int  # audio samples per latent frame
    sample_rate: int
    frames_per_second: float
    latent_channels: int

    def _channel(self, values: list[float], like: Tensor) -> Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]

    def normalise(self, z: Tensor) -> Tensor:
        """VAE latents [..., C, T] -> z_n = (z - mean_c) / std_c * sigma_data."""
        return (z - self._channel(self.mean, z)) / self._channel(self.std, z) * self.sigma_data

    def denormalise(self, z_n: Tensor) -> Tensor:
        """Inverse of `normalise`: z = z_n / sigma_data * std_c + mean_c, ready for the VAE decoder."""
        return z_n / self.sigma_data * self._channel(self.std, z_n) + self._channel(self.mean, z_n)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LatentStats":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: latent statistics not found; run the encode stage first")
        raw = json.loads(path.read_text())
        missing = [k for k in cls.__dataclass_fields__ if k not in raw]
        if missing:
            raise InputError(f"{path}: lacks {', '.join(missing)}")
        stats = cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        if not len(stats.mean) == len(stats.std) == stats.latent_channels:
            raise InputError(f"{path}: mean has {len(stats.mean)} and std {len(stats.std)} entries, "
                             f"latent_channels is {stats.latent_channels}")
        return stats


class ChannelMoments:
    """Running per-channel mean and (population) std of latents [N, C, T], over clips and frames.

    Sums are kept in float64, so a corpus of millions of frames loses no precision to the running total.
    """

    def __init__(self, channels: int):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)

    def add(self, z: Tensor) -> None:
        if z.ndim != 3 or z.shape[1] != self.sum.shape[0]:
            raise ValueError(f"latents must be [N, {self.sum.shape[0]}, T], got shape {tuple(z.shape)}")
        z = z.detach().to(torch.float64)
        self.count += z.shape[0] * z.shape[2]
        self.sum += z.sum(dim=(0, 2)).cpu()
        self.sum_sq += z.pow(2).sum(dim=(0, 2)).cpu()

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """(mean [C], std [C]); std floored at MIN_CHANNEL_STD."""
        if self.count == 0:
            raise ValueError("no latents were added: nothing to measure")
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean.pow(2)).clamp_min(0.0)
        return mean, var.sqrt().clamp_min(MIN_CHANNEL_STD)


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


class LatentShardWriter:
    """Writes latents [C, T] `shard_clips` to a file as {"latents": [N, C, T]} in the dtype given.

    A clip whose shape differs from the current shard's starts a new shard (clips of one shard are stacked).
    `add` returns (shard file name, index inside it). Use as a context manager.
    """

    def __init__(self, folder: str | Path, prefix: str, shard_clips: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix, self.shard_clips = prefix, shard_clips
        self.names: list[str] = []
        self._buffer: list[Tensor] = []

    def add(self, z: Tensor) -> tuple[str, int]:
        if self._buffer and self._buffer[0].shape != z.shape:
            self.flush()
        name = f"{self.prefix}-{len(self.names):05d}.safetensors"
        index = len(self._buffer)
        self._buffer.append(z.detach().cpu())
        if len(self._buffer) >= self.shard_clips:
            self.flush()
        return name, index

    def flush(self) -> None:
        if not self._buffer:
            return
        name = f"{self.prefix}-{len(self.names):05d}.safetensors"
        _save_atomic({"latents": torch.stack(self._buffer).contiguous()}, self.folder / name)
        self.names.append(name)
        self._buffer = []

    def __enter__(self) -> "LatentShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.flush()


def normalise_shard(path: str | Path, stats: LatentStats) -> None:
    """Rewrite a shard of raw latents in place as normalised float16."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        raw = f.get_tensor("latents").to(torch.float32)
    _save_atomic({"latents": stats.normalise(raw).to(torch.float16).contiguous()}, path)


def save_text_shard(path: str | Path, cond: TextCondition) -> None:
    """One text shard: tokens and pooled vectors as float16, the mask as bool."""
    _save_atomic({"tokens": cond.tokens.to(torch.float16).contiguous(), "mask": cond.mask.to(torch.bool).contiguous(),
                  "pooled": cond.pooled.to(torch.float16).contiguous()}, Path(path))


class LatentDataset(Dataset):
    """Items (latents [C, T] float32, TextCondition [1, L, D] of one of the clip's captions).

    `split` keeps one split's clips (None: all). `caption` picks which caption an item carries: "random"
    draws one with torch's global RNG at every access (DataLoader workers are seeded apart), "first" always
    takes the first (for deterministic validation). The token states keep only the caption's real tokens;
    `collate_latents` pads them to a batch. Shards are memory-mapped and read one item at a time.
    """

    def __init__(self, folder: str | Path, split: str | None, caption: Literal["random", "first"] = "random"):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise InputError(f"{manifest}: latent manifest not found; run the encode stage first")
        if caption not in ("random", "first"):
            raise ValueError(f"caption = {caption!r} must be 'random' or 'first'")
        self.caption = caption
        self.stats = LatentStats.load(self.folder / LATENT_STATS)
        self.rows = [r for r in read_manifest(manifest) if split is None or r["split"] == split]
        if not self.rows:
            raise InputError(f"{manifest}: no clips in split {split!r}")
        for row in self.rows:
            if not row.get("caption_refs"):
                raise InputError(f"{manifest}: clip {row['clip_id']} has no caption_refs")
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles do not travel to worker processes; each worker reopens its own.
        return {**self.__dict__, "_handles": {}}

    def _read(self, shard: str, key: str, index: int) -> Tensor:
        if shard not in self._handles:
            path = self.folder / shard
            if not path.is_file():
                raise InputError(f"{path}: shard not found (listed in {self.folder / MANIFEST})")
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard].get_slice(key)[index:index + 1][0]

    def __len__(self) -> int:
        return len(self.rows)

    def text(self, shard: str, index: int) -> TextCondition:
        """The stored embedding of one caption, trimmed to its real tokens, as a batch of one."""
        mask = self._read(shard, "mask", index)
        length = int(mask.sum())
        tokens = self._read(shard, "tokens", index)[:length].float()
        pooled = self._read(shard, "pooled", index).float()
        return TextCondition(tokens[None], mask[:length][None], pooled[None])

    def __getitem__(self, i: int) -> tuple[Tensor, TextCondition]:
        row = self.rows[i]
        latents = self._read(row["shard"], "latents", row["index"]).float()
        refs = row["caption_refs"]
        k = int(torch.randint(len(refs), ())) if self.caption == "random" else 0
        shard, index = refs[k]
        return latents, self.text(shard, index)


def check_latents_fit(encode_dir: Path, *, sigma_data: float, latent_channels: int, text_dim: int, model: str,
                      fix: str) -> LatentStats:
    """encode's latents and text embeddings fit a model (`model` names it in messages, `fix` says what to do):
    checked in seconds, before any training starts."""
    stats = LatentStats.load(encode_dir / LATENT_STATS)
    if abs(stats.sigma_data - sigma_data) > 1e-9:
        raise InputError(f"{encode_dir / LATENT_STATS}: latents normalised to sigma_data {stats.sigma_data}, but "
                         f"sigma_data = {sigma_data} for {model}; {fix}")
    if stats.latent_channels != latent_channels:
        raise InputError(f"{encode_dir / LATENT_STATS}: {stats.latent_channels} latent channels, but "
                         f"latent_channels = {latent_channels} for {model}; {fix}")
    _, cond = LatentDataset(encode_dir, "train", caption="first")[0]
    if cond.tokens.shape[-1] != text_dim:
        raise InputError(f"{encode_dir}: text embeddings are {cond.tokens.shape[-1]}-d, but text_dim = {text_dim} "
                         f"for {model}; {fix}")
    return stats


def collate_latents(items: list[tuple[Tensor, TextCondition]]) -> tuple[Tensor, TextCondition]:
    """Stack latents [B, C, T] and pad token states to the longest caption of the batch (mask False there)."""
    lengths = {tuple(z.shape) for z, _ in items}
    if len(lengths) > 1:
        raise ValueError(f"latents of one batch must share a shape, got {sorted(lengths)}")
    longest = max(c.tokens.shape[1] for _, c in items)
    dim = items[0][1].tokens.shape[2]
    tokens = torch.zeros(len(items), longest, dim)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for b, (_, c) in enumerate(items):
        n = c.tokens.shape[1]
        tokens[b, :n] = c.tokens[0]
        mask[b, :n] = c.mask[0]
    pooled = torch.cat([c.pooled for _, c in items])
    return torch.stack([z for z, _ in items]), TextCondition(tokens, mask, pooled)
