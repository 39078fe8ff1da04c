"""Clips stored in shards (safetensors files of many clips) beside a JSONL manifest.

One file per clip would mean millions of small files on a real corpus; one array per shard keeps reads
sequential and lets DVC hash a few large files. Audio is stored as int16 (what 16-bit audio holds) with a
per-shard layout `audio: [n_clips, n_samples]` (mono) or `[n_clips, 2, n_samples]` (stereo); every clip of
one shard has the same length.

A manifest row is a dict with at least: clip_id, track_id, split, shard, index, sample_rate, seconds.
`shard` is relative to the `artifacts/` folder (e.g. "prepare/mono-00003.safetensors"), so a manifest
may mix clips of several stages' out folders: read with `ShardReader(root / "artifacts")`.
Other keys (key, bpm, title, instruments, captions, ...) travel along untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from presto.errors import InputError

MANIFEST = "manifest.jsonl"
CLIP_KEYS = ("clip_id", "split", "shard", "index", "sample_rate", "seconds")


def to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def to_float(audio: np.ndarray) -> np.ndarray:
    return audio.astype(np.float32) / 32767.0


class ShardWriter:
    """Collects clips of one length and flushes them `shard_clips` at a time.

    Use as a context manager; `add` returns (shard file name, index inside the shard).
    """

    def __init__(self, folder: str | Path, prefix: str, shard_clips: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.shard_clips = shard_clips
        self._buffer: list[np.ndarray] = []
        self._count = 0

    @property
    def _current(self) -> str:
        return f"{self.prefix}-{self._count:05d}.safetensors"

    def add(self, audio: np.ndarray) -> tuple[str, int]:
        if self._buffer and self._buffer[0].shape != audio.shape:
            raise ValueError(f"clip shape {audio.shape} differs from the shard's {self._buffer[0].shape}")
        name, index = self._current, len(self._buffer)
        self._buffer.append(to_int16(np.asarray(audio, dtype=np.float32)))
        if len(self._buffer) >= self.shard_clips:
            self.flush()
        return name, index

    def flush(self) -> None:
        if not self._buffer:
            return
        save_file({"audio": np.stack(self._buffer)}, str(self.folder / self._current))
        self._buffer = []
        self._count += 1

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.flush()


class ShardReader:
    """Reads clips by (shard, index), one clip at a time: a shard is memory-mapped, never loaded whole."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._name: str | None = None
        self._slice: Any = None

    def _open(self, name: str) -> Any:
        if name != self._name:
            handle = safe_open(str(self.folder / name), framework="numpy")
            self._slice, self._name = handle.get_slice("audio"), name
        return self._slice

    def shard(self, name: str) -> np.ndarray:
        """Every clip of one shard, int16."""
        return load_file(str(self.folder / name))["audio"]

    def clip(self, row: dict[str, Any]) -> np.ndarray:
        """float32 audio of one manifest row, [n_samples] or [2, n_samples]."""
        index = row["index"]
        return to_float(self._open(row["shard"])[index:index + 1][0])


def write_manifest(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_clip_manifest(manifest: Path, artifacts: Path, sample_rate: int, made_by: str) -> list[dict[str, Any]]:
    """`made_by`'s manifest, checked before any work starts: present, every row with CLIP_KEYS and at
    `sample_rate`, every shard on disk under `artifacts`."""
    if not manifest.is_file():
        raise InputError(f"{manifest}: {made_by}'s manifest not found; run the {made_by} stage first")
    rows = read_manifest(manifest)
    for line, row in enumerate(rows, 1):
        missing = [k for k in CLIP_KEYS if k not in row]
        if missing:
            raise InputError(f"{manifest}:{line}: row lacks {', '.join(missing)}")
        if row["sample_rate"] != sample_rate:
            raise InputError(f"{manifest}:{line}: clip at {row['sample_rate']} Hz but shared.sample_rate = "
                             f"{sample_rate}; rerun the stages up to {made_by}")
    check_shards(manifest, rows, artifacts)
    return rows


def check_shards(manifest: Path, rows: list[dict[str, Any]], artifacts: Path, key: str = "shard") -> None:
    """Every shard the rows name (under `key`) is a file under `artifacts`."""
    for shard in sorted({r[key] for r in rows}):
        if not (artifacts / shard).is_file():
            raise InputError(f"{manifest}: shard {shard} not found under {artifacts}")


def iter_split(rows: list[dict[str, Any]], split: str) -> Iterator[dict[str, Any]]:
    return (r for r in rows if r["split"] == split)
