"""The augment stage and its pieces: pitch really shifts, tempo really stretches, labels follow, lengths hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from presto.config import parse_params
from presto.data.augment import (
    augmented_row,
    following_clips,
    pitch_shift,
    stretch_clip,
    time_stretch,
)
from presto.data.shards import ShardReader, ShardWriter, read_manifest, write_manifest
from stages import augment as augment_stage
from stages.base import StageContext
from recording_tracker import RecordingTracker

REPO = Path(__file__).resolve().parents[1]
SR = 16000
CLIP = 2.0
L = int(SR * CLIP)


def tone(freq: float, seconds: float, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def clicks(period: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    """A 10 ms 1 kHz burst every `period` seconds."""
    x = np.zeros(int(seconds * SR), np.float32)
    burst = tone(1000, 0.01, amp)
    for start in np.arange(0, seconds, period):
        i = int(round(start * SR))
        x[i:i + len(burst)] = burst[: len(x) - i]
    return x


def dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=8 * len(x)))
    return float(np.argmax(spectrum) * SR / (8 * len(x)))


def onset_period(x: np.ndarray) -> float:
    """Median time between rises of the 5 ms envelope through half its maximum."""
    env = np.convolve(np.abs(x), np.ones(80) / 80, mode="same")
    above = env > 0.5 * env.max()
    onsets = np.flatnonzero(above[1:] & ~above[:-1]) + 1
    return float(np.median(np.diff(onsets))) / SR


def make_prepare(root: Path) -> list[dict]:
    """A fake prepare output: a tone track and a click track in train, a tone track in val.

    Clip audio is stored already "normalised" with a per-clip gain, as prepare does, so the seam test
    can see whether augment undoes the gain difference between a clip and its follower.
    """
    out = root / "artifacts" / "prepare"
    rows = []
    tracks = [
        ("tone", "train", tone(440, 6.0, 0.2), {"key": "A major", "bpm": 100.0}, [0.0, -6.0, 0.0]),
        ("clicks", "train", clicks(0.5, 5.2), {"key": "c minor", "bpm": 120.0}, [0.0, 0.0, 0.0]),
        ("held_out", "val", tone(330, 4.0), {"key": "E minor", "bpm": 90.0}, [0.0, 0.0]),
    ]
    with ShardWriter(out, "mono", 4) as writer:
        for name, split, audio, labels, gains in tracks:
            for k, gain_db in enumerate(gains):
                part = audio[k * L:(k + 1) * L]
                clip = np.zeros(L, np.float32)
                clip[: len(part)] = part * 10 ** (gain_db / 20)
                shard, index = writer.add(clip)
                rows.append({"clip_id": f"{name}-{k}", "track_id": name, "path": f"{name}.wav", "split": split,
                             "shard": f"prepare/{shard}", "index": index, "start_s": k * CLIP,
                             "seconds": len(part) / SR, "sample_rate": SR, "gain_db": gain_db,
                             "stereo_shard": "prepare/stereo-00000.safetensors", "stereo_index": 0, **labels})
    write_manifest(out / "manifest.jsonl", rows)
    return rows


def make_params(**augment):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["shared"].update(sample_rate=SR, clip_seconds=CLIP)
    raw["augment"].update(pitch_semitones=[-2, 2], stretch_rates=[0.9, 1.1], chunk_clips=2)
    raw["augment"].update(augment)
    return parse_params(raw)


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    prepare_rows = make_prepare(root)
    ctx = StageContext(name="augment", params=make_params(), root=root, out_dir=root / "artifacts" / "augment",
                       checkpoint_dir=root / "ckpt", fingerprint="test", tracker=RecordingTracker())
    metrics = augment_stage.run(ctx)
    rows = read_manifest(ctx.out_dir / "manifest.jsonl")
    reader = ShardReader(root / "artifacts")
    new = {r["clip_id"]: (r, reader.clip(r)) for r in rows[len(prepare_rows):]}
    return {"prepare": prepare_rows, "rows": rows, "new": new, "metrics": metrics, "root": root}


def test_manifest_keeps_prepare_rows_and_adds_train_augmentations(augmented):
    prepare_rows, rows, new = augmented["prepare"], augmented["rows"], augmented["new"]
    assert rows[: len(prepare_rows)] == prepare_rows
    train = [r["clip_id"] for r in prepare_rows if r["split"] == "train"]
    suffixes = ["pitch-2", "pitch+2", "tempo0.9", "tempo1.1"]
    assert sorted(new) == sorted(f"{c}-{s}" for c in train for s in suffixes)
    for row, audio in new.values():
        assert row["split"] == "train" and row["shard"].startswith("augment/aug-")
        assert "stereo_shard" not in row and "stereo_index" not in row
        assert audio.shape == (L,)
        assert row["track_id"] == row["parent_clip_id"].split("-")[0]
    m = augmented["metrics"]
    assert (m["clips_in"], m["clips_out"], m["clips_total"]) == (len(train), 4 * len(train), len(rows))
    assert m["audio_seconds"] == pytest.approx(4 * len(train) * CLIP)
    assert m["throughput"] > 0 and m["cpu_seconds"] > 0


def test_labels_follow_the_augmentation(augmented):
    parents = {r["clip_id"]: r for r in augmented["prepare"]}
    for row, _ in augmented["new"].values():
        parent = parents[row["parent_clip_id"]]
        aug = row["augmentation"]
        if "pitch_semitones" in aug:
            assert row["bpm"] == parent["bpm"]
            expected = {("A major", 2): "B major", ("A major", -2): "G major",
                        ("c minor", 2): "D minor", ("c minor", -2): "Bb minor"}
            assert row["key"] == expected[(parent["key"], aug["pitch_semitones"])]
        else:
            assert row["key"] == parent["key"]
            assert row["bpm"] == pytest.approx(parent["bpm"] * aug["stretch_rate"])


@pytest.mark.parametrize("k", [-2, 2])
def test_pitch_is_shifted(augmented, k):
    _, audio = augmented["new"][f"tone-0-pitch{k:+d}"]
    assert dominant_hz(audio) == pytest.approx(440 * 2 ** (k / 12), abs=1.0)
    _, held = augmented["new"][f"clicks-0-pitch{k:+d}"]
    assert onset_period(held) == pytest.approx(0.5, abs=0.005)  # tempo kept


@pytest.mark.parametrize("rate", [0.9, 1.1])
def test_tempo_is_stretched_and_pitch_kept(augmented, rate):
    row, audio = augmented["new"][f"clicks-0-tempo{rate:g}"]
    assert onset_period(audio) == pytest.approx(0.5 / rate, abs=0.005)
    assert row["seconds"] == pytest.approx(CLIP)  # slow-down: cropped; speed-up: filled from clicks-1
    _, stretched_tone = augmented["new"][f"tone-0-tempo{rate:g}"]
    assert dominant_hz(stretched_tone) == pytest.approx(440, abs=1.0)


def test_speed_up_reads_into_the_next_clip_at_this_clips_gain(augmented):
    # tone-1 is stored 6 dB quieter than tone-0 (its gain_db is -6): the continuation must be brought back.
    _, audio = augmented["new"]["tone-0-tempo1.1"]
    head, tail = audio[SR // 10: SR // 2], audio[-SR // 3: -SR // 20]
    assert 20 * np.log10(np.std(tail) / np.std(head)) == pytest.approx(0.0, abs=0.3)


def test_speed_up_at_a_tracks_end_pads_with_silence(augmented):
    row, audio = augmented["new"]["tone-2-tempo1.1"]
    audio_samples = int(round(row["seconds"] * SR))
    assert abs(audio_samples - L / 1.1) <= 2
    assert not audio[audio_samples + 1:].any()
    assert np.std(audio[audio_samples - SR // 4: audio_samples - SR // 20]) > 0.05


def test_a_padded_clip_keeps_its_padding_silent(augmented):
    row, audio = augmented["new"]["clicks-2-pitch+2"]
    assert row["seconds"] == pytest.approx(1.2)
    assert not audio[int(1.2 * SR):].any()
    row, audio = augmented["new"]["clicks-2-tempo0.9"]
    assert row["seconds"] == pytest.approx(min(CLIP, 1.2 / 0.9), abs=2 / SR)
    assert not audio[int(round(1.2 / 0.9 * SR)) + 1:].any()


def test_time_stretch_length_and_pitch_shift_length():
    x = tone(440, 2.0)
    for rate in (0.5, 0.9, 1.1, 2.0):
        assert abs(len(time_stretch(x, SR, rate)) - len(x) / rate) <= 2
    assert len(pitch_shift(x, SR, 3)) == len(x)


def test_stretch_clip_uses_the_continuation_only_when_speeding_up():
    x = tone(440, 2.0)
    cont = tone(440, 2.0, amp=0.1)
    slow, slow_audio = stretch_clip(x, len(x), cont, SR, 0.8)
    assert slow.shape == x.shape and slow_audio == len(x)
    assert np.std(slow[-SR // 4:]) == pytest.approx(np.std(x), rel=0.05)  # all from x, none from cont
    fast, fast_audio = stretch_clip(x, len(x), cont, SR, 1.25)
    assert fast_audio == len(x)
    assert np.std(fast[-SR // 5:]) == pytest.approx(np.std(cont), rel=0.1)
    alone, alone_audio = stretch_clip(x, len(x), None, SR, 1.25)
    assert abs(alone_audio - len(x) / 1.25) <= 2 and not alone[alone_audio:].any()


def test_following_clips_handles_overlap_gaps_and_ends():
    def row(cid, track, start, seconds):
        return {"clip_id": cid, "track_id": track, "start_s": start, "seconds": seconds, "sample_rate": 10}

    rows = [row("a0", "a", 0.0, 2.0), row("a1", "a", 2.0, 2.0), row("a2", "a", 4.0, 1.5),
            row("b0", "b", 0.0, 2.0), row("b1", "b", 1.0, 2.0), row("b2", "b", 2.0, 1.2),
            row("c0", "c", 0.0, 2.0), row("c1", "c", 3.0, 2.0)]  # c: a dropped clip leaves a gap
    f = following_clips(list(reversed(rows)))
    assert {k: (v.row["clip_id"], v.offset) for k, v in f.items()} == {
        "a0": ("a1", 0), "a1": ("a2", 0), "b0": ("b1", 10), "b1": ("b2", 10)}


def test_augmented_row_labels():
    parent = {"clip_id": "x-1", "track_id": "x", "split": "train", "shard": "prepare/m.safetensors", "index": 3,
              "stereo_shard": "s", "stereo_index": 1, "key": "F# minor", "bpm": 90.0, "seconds": 2.0, "title": "t"}
    up = augmented_row(parent, {"pitch_semitones": 3}, 2.0)
    assert up["clip_id"] == "x-1-pitch+3" and up["key"] == "A minor" and up["bpm"] == 90.0
    assert up["title"] == "t" and up["parent_clip_id"] == "x-1"
    assert not {"shard", "index", "stereo_shard", "stereo_index"} & set(up)
    fast = augmented_row(parent, {"stretch_rate": 1.1}, 1.8)
    assert fast["clip_id"] == "x-1-tempo1.1" and fast["bpm"] == 99.0 and fast["key"] == "F# minor"
    assert fast["seconds"] == 1.8
    bare = augmented_row({"clip_id": "y", "seconds": 2.0}, {"pitch_semitones": -1}, 2.0)
    assert "key" not in bare and "bpm" not in bare


def test_fractional_semitones_are_refused():
    from presto.errors import ParamsError

    with pytest.raises(ParamsError, match="whole semitones"):
        make_params(pitch_semitones=[0.5])

