"""Clip shards round-trip; key labels transpose correctly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from presto.data.music import key_name, parse_key, transpose_key
from presto.data.shards import ShardReader, ShardWriter, check_shards, read_clip_manifest, read_manifest, write_manifest
from presto.errors import InputError


def test_shards_round_trip_within_int16_precision(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    clips = [rng.uniform(-1, 1, 800).astype(np.float32) for _ in range(5)]
    rows = []
    with ShardWriter(tmp_path / "prepare", "mono", shard_clips=2) as writer:
        for i, clip in enumerate(clips):
            shard, index = writer.add(clip)
            rows.append({"clip_id": str(i), "shard": f"prepare/{shard}", "index": index, "split": "train"})
    assert len(list((tmp_path / "prepare").glob("mono-*.safetensors"))) == 3
    write_manifest(tmp_path / "m.jsonl", rows)
    reader = ShardReader(tmp_path)
    for row, clip in zip(read_manifest(tmp_path / "m.jsonl"), clips):
        np.testing.assert_allclose(reader.clip(row), clip, atol=1 / 32767)


def test_shard_refuses_mixed_lengths(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "mono", shard_clips=4)
    writer.add(np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="differs"):
        writer.add(np.zeros(11, np.float32))



def test_clip_manifest_is_checked_before_use(tmp_path: Path) -> None:
    manifest = tmp_path / "augment" / "manifest.jsonl"
    with pytest.raises(InputError, match="augment's manifest not found; run the augment stage first"):
        read_clip_manifest(manifest, tmp_path, 16000, "augment")
    (tmp_path / "augment").mkdir()
    with ShardWriter(tmp_path / "prepare", "mono", shard_clips=4) as writer:
        shard, index = writer.add(np.zeros(10, np.float32))
    row = {"clip_id": "a", "split": "train", "shard": f"prepare/{shard}", "index": index, "sample_rate": 16000,
           "seconds": 1.0}
    write_manifest(manifest, [row, {**row, "clip_id": "b"}])
    assert [r["clip_id"] for r in read_clip_manifest(manifest, tmp_path, 16000, "augment")] == ["a", "b"]
    write_manifest(manifest, [row, {k: v for k, v in row.items() if k != "seconds"}])
    with pytest.raises(InputError, match=r"manifest.jsonl:2: row lacks seconds"):
        read_clip_manifest(manifest, tmp_path, 16000, "augment")
    write_manifest(manifest, [row, {**row, "sample_rate": 22050}])
    with pytest.raises(InputError, match=r":2: clip at 22050 Hz but shared.sample_rate = 16000"):
        read_clip_manifest(manifest, tmp_path, 16000, "augment")
    write_manifest(manifest, [row, {**row, "shard": "prepare/gone.safetensors"}])
    with pytest.raises(InputError, match="shard prepare/gone.safetensors not found"):
        read_clip_manifest(manifest, tmp_path, 16000, "augment")
    with pytest.raises(InputError, match="shard prepare/st.safetensors not found"):
        check_shards(manifest, [{**row, "stereo_shard": "prepare/st.safetensors"}], tmp_path, key="stereo_shard")

@pytest.mark.parametrize(
    ("key", "expected"),
    [("D minor", (2, "minor")), ("f# major", (6, "major")), ("Bb", (10, "major")), ("E-", (3, "major")),
     ("Am", (9, "minor")), ("a", (9, "minor")), ("C", (0, "major")), ("Cb major", (11, "major"))],
)
def test_parse_key(key: str, expected: tuple[int, str]) -> None:
    assert parse_key(key) == expected


def test_transpose_wraps_and_keeps_mode() -> None:
    assert transpose_key("D minor", 2) == "E minor"
    assert transpose_key("B major", 2) == "C# major"
    assert transpose_key("C major", -2) == "Bb major"
    assert transpose_key(key_name(7, "minor"), 12) == "G minor"
    with pytest.raises(ValueError, match="whole semitones"):
        transpose_key("C major", 0.5)
    with pytest.raises(ValueError, match="not a key"):
        parse_key("H# dorian")
