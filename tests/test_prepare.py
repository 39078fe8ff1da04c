"""The prepare stage on a hostile corpus, and its pieces (cutter, splits, paths, metadata, fingerprints)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import yaml

from presto.audio.io import peak_dbfs, rms_dbfs
from presto.config import parse_params
from presto.data.prepare import (
    BandEnvelope,
    ClipCutter,
    Reject,
    assign_splits,
    clean_metadata,
    clean_value,
    corpus_relpath,
    fingerprint_distance,
    format_rejects,
    group_duplicates,
)
from presto.data.shards import ShardReader, read_manifest
from stages import prepare as prepare_stage
from stages.base import StageContext
from recording_tracker import RecordingTracker

REPO = Path(__file__).resolve().parents[1]
SR = 16000  # shared.sample_rate in these tests
CLIP = 2.0  # shared.clip_seconds


def make_params(corpus: Path, **prepare):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["shared"].update(sample_rate=SR, clip_seconds=CLIP)
    raw["prepare"].update(corpus_dir=str(corpus), metadata="metadata.csv", hop_seconds=CLIP, min_seconds=1.0,
                          max_file_seconds=30, silence_dbfs=-45.0, loudness_dbfs=-20.0, peak_dbfs=-1.0,
                          val_fraction=0.2, test_fraction=0.2, shard_clips=8, keep_stereo=True)
    raw["prepare"].update(prepare)
    return parse_params(raw)


def context(root: Path, params, name="prepare") -> StageContext:
    return StageContext(name=name, params=params, root=root, out_dir=root / "artifacts" / name,
                        checkpoint_dir=root / "ckpt", fingerprint="test", tracker=RecordingTracker())


def music(seed: int, seconds: float, sr: int) -> np.ndarray:
    """A melody of decaying harmonic notes: different seeds sound different (unlike two sines)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros(n, np.float32)
    pos = 0
    while pos < n:
        length = int(sr * 0.25 * rng.integers(1, 4))
        f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
        t = np.arange(min(length, n - pos)) / sr
        note = sum(0.6 ** h * np.sin(2 * np.pi * f0 * (h + 1) * t) for h in range(4)) * np.exp(-t * rng.uniform(1, 6))
        out[pos:pos + len(t)] += 0.25 * note
        pos += length
    return out


def at_rate(x: np.ndarray, sr: int) -> np.ndarray:
    return soxr.resample(x, SR, sr) if sr != SR else x


# The good files: name -> (seconds of audio the manifest must hold, clips). Clips are 2 s with a 2 s hop;
# a tail of >= 1 s is padded into a clip, a shorter one is dropped.
GOOD = {
    "a.wav": (7.5, 4),  # 44.1 kHz, 16 bit
    "sub/b_stereo.flac": (5.2, 3),  # 48 kHz stereo
    "c_6ch.wav": (4.0, 2),  # 22.05 kHz, 6 channels, 4.3 s: the 0.3 s tail is dropped
    "d_8k.wav": (6.0, 3),  # 8 kHz
    "e_96k.wav": (3.1, 2),  # 96 kHz, 24 bit
    "f_u8.wav": (4.0, 2),  # 8 bit unsigned
    "g.mp3": (5.5, 3),
    "h.ogg": (4.0, 2),  # 32 kHz, 4.6 s
    "i.aiff": (3.4, 2),
    "Copy of A.flac": (7.5, 4),  # a.wav at 22.05 kHz, 6 dB quieter
    "dups/a.ogg": (7.5, 4),  # a.wav again, lossy
    "link_in.wav": (6.0, 3),  # a symlink to d_8k.wav, inside the corpus
    "partly_silent.wav": (4.0, 2),  # 2 s of silence, then 4 s of music: the silent clip is dropped
}
# Copies of one recording; the manifest names the first path (sorted) of a group in `duplicate_of`.
DUPLICATES = [{"a.wav", "Copy of A.flac", "dups/a.ogg"}, {"d_8k.wav", "link_in.wav"}]
BAD = {
    "empty.wav": "empty file",
    "truncated.wav": "truncated",
    "truncated.flac": "decoding failed",
    "notes.wav": "not a readable audio file",
    "nan.wav": "NaN/Inf samples",
    "short.wav": "too short",
    "silent.wav": "silent",
    "quiet.wav": "silent",
    "too_long.wav": "too long",
    "link_out.wav": "symlink points outside",
    "pipe.wav": "not a regular file",
}
BAD_ROWS = {
    "../outside/outside.wav": "leaves the corpus folder",
    "missing.wav": "missing file",
    "/etc/passwd": "absolute path",
    "link_out.wav": "outside the corpus folder",
    "readme.txt": "not audio",
}
BAD_VALUES = {("sub/b_stereo.flac", "bpm"): "fast", ("c_6ch.wav", "bpm"): "-90", ("d_8k.wav", "key"): "H# major",
              ("e_96k.wav", "meter"): "3/0"}


def build_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "dups").mkdir()
    outside = root / "outside"
    outside.mkdir()
    sf.write(outside / "outside.wav", music(99, 3.0, SR), SR)

    a = music(1, 7.5, SR)
    sf.write(corpus / "a.wav", at_rate(a, 44100), 44100, subtype="PCM_16")
    b = music(2, 5.2, SR)
    sf.write(corpus / "sub/b_stereo.flac", np.stack([at_rate(b, 48000), at_rate(0.5 * b[::-1], 48000)], 1), 48000)
    c = music(3, 4.3, SR)
    sf.write(corpus / "c_6ch.wav", np.stack([at_rate(c * (k + 1) / 6, 22050) for k in range(6)], 1), 22050)
    sf.write(corpus / "d_8k.wav", at_rate(music(4, 6.0, SR), 8000), 8000)
    sf.write(corpus / "e_96k.wav", at_rate(music(5, 3.1, SR), 96000), 96000, subtype="PCM_24")
    sf.write(corpus / "f_u8.wav", music(6, 4.0, SR), SR, subtype="PCM_U8")
    sf.write(corpus / "g.mp3", at_rate(music(7, 5.5, SR), 44100), 44100, format="MP3")
    sf.write(corpus / "h.ogg", at_rate(music(8, 4.6, SR), 32000), 32000, format="OGG")
    sf.write(corpus / "i.aiff", music(9, 3.4, SR), SR, format="AIFF")
    sf.write(corpus / "Copy of A.flac", at_rate(0.5 * a, 22050), 22050)
    sf.write(corpus / "dups/a.ogg", at_rate(a, 48000), 48000, format="OGG")
    os.symlink(corpus / "d_8k.wav", corpus / "link_in.wav")
    sf.write(corpus / "partly_silent.wav", np.concatenate([np.zeros(2 * SR, np.float32), music(10, 4.0, SR)]), SR)

    (corpus / "empty.wav").write_bytes(b"")
    sf.write(corpus / "full.wav", music(11, 6.0, SR), SR)
    data = (corpus / "full.wav").read_bytes()
    (corpus / "truncated.wav").write_bytes(data[: len(data) // 2])
    (corpus / "full.wav").unlink()
    sf.write(root / "full.flac", music(12, 6.0, SR), SR)
    data = (root / "full.flac").read_bytes()
    (corpus / "truncated.flac").write_bytes(data[: len(data) // 2])
    (corpus / "notes.wav").write_text("these are my notes, not audio\n" * 50)
    nan = music(13, 3.0, SR)
    nan[SR:SR + 100] = np.nan
    sf.write(corpus / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(corpus / "short.wav", music(14, 0.5, SR), SR)
    sf.write(corpus / "silent.wav", np.zeros(5 * SR, np.float32), SR)
    sf.write(corpus / "quiet.wav", 1e-3 * np.random.default_rng(0).standard_normal(4 * SR), SR)  # -60 dBFS
    sf.write(corpus / "too_long.wav", np.tile(at_rate(music(15, 1.0, SR), 8000), 31), 8000)
    os.symlink(outside / "outside.wav", corpus / "link_out.wav")
    os.mkfifo(corpus / "pipe.wav")
    (corpus / "readme.txt").write_text("about this corpus\n")
    (corpus / "sub/.DS_Store").write_bytes(b"\0\1\2")

    # `seconds` (a piece's length) collides with the manifest's own `seconds` (a clip's audio).
    header = "path,title,composer,instruments,key,bpm,meter,genre,mood,license,rating,seconds\n"
    lines = [
        'a.wav,Alpha,Anon,"piano;violin",D minor,120,3/4,folk,calm,CC-BY,5,7.5',
        "sub/b_stereo.flac,Beta,Anon,flute,Bb major,fast,4/4,,,CC-BY,,5.2",
        "c_6ch.wav,Gamma,,,E minor,-90,,,,,,",
        "d_8k.wav,Delta,,,H# major,100,,,,,,",
        "e_96k.wav,Epsilon,,,,,3/0,,,,,",
        "../outside/outside.wav,Outside,,,,,,,,,,",
        "missing.wav,Missing,,,,,,,,,,",
        "/etc/passwd,Passwords,,,,,,,,,,",
        "link_out.wav,Link,,,,,,,,,,",
        "a.wav,Alpha again,,,,,,,,,,",
        "readme.txt,Readme,,,,,,,,,,",
        "notes.wav,Notes,,,C major,,,,,,,",
    ]
    (corpus / "metadata.csv").write_text(header + "\n".join(lines) + "\n")
    return corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Run the stage once on the hostile corpus, recording every file soundfile opens."""
    root = tmp_path_factory.mktemp("prepare")
    corpus = build_corpus(root)
    opened: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        real_info, real_file = sf.info, sf.SoundFile

        def info(path, *a, **k):
            opened.append(os.path.realpath(path))
            return real_info(path, *a, **k)

        def soundfile(path, *a, **k):
            opened.append(os.path.realpath(path))
            return real_file(path, *a, **k)

        mp.setattr(sf, "info", info)
        mp.setattr(sf, "SoundFile", soundfile)
        ctx = context(root, make_params(corpus))
        metrics = prepare_stage.run(ctx)
    out = ctx.out_dir
    return {
        "root": root, "corpus": corpus, "ctx": ctx, "metrics": metrics, "opened": opened,
        "rows": read_manifest(out / "manifest.jsonl"),
        "rejects": read_manifest(out / "rejects.jsonl"),
        "text": (out / "rejects.txt").read_text(),
    }


def test_every_bad_file_is_named_with_its_reason(prepared):
    files = {r["path"]: r["reason"] for r in prepared["rejects"] if r["kind"] == "file"}
    assert set(files) == set(BAD)
    for path, reason in BAD.items():
        assert reason in files[path], (path, files[path])
        assert path in prepared["text"]
    ignored = {r["path"] for r in prepared["rejects"] if r["kind"] == "ignored"}
    assert ignored == {"readme.txt", "sub/.DS_Store"}


def test_bad_metadata_rows_and_values_are_reported(prepared):
    rows = {r["path"]: r["reason"] for r in prepared["rejects"] if r["kind"] == "row"}
    for path, reason in BAD_ROWS.items():
        assert reason in rows[path], (path, rows[path])
    assert "second row" in rows["a.wav"]
    values = {(r["path"], r["field"]): r["value"] for r in prepared["rejects"] if r["kind"] == "value"}
    assert values == BAD_VALUES
    columns = [(r["path"], r["field"], r["line"]) for r in prepared["rejects"] if r["kind"] == "column"]
    assert columns == [("metadata.csv", "seconds", 2)]
    assert "bpm='fast'" in prepared["text"]
    assert "metadata.csv line 2: seconds: a manifest field that prepare writes itself" in prepared["text"]


def test_files_outside_the_corpus_are_never_read(prepared):
    outside = os.path.realpath(prepared["root"] / "outside" / "outside.wav")
    assert prepared["opened"], "the recorder saw no file: the patch did not take"
    assert outside not in prepared["opened"]
    assert all("outside" not in r["path"] for r in prepared["rows"])


def test_no_good_file_is_lost_and_durations_match(prepared):
    rows = prepared["rows"]
    assert {r["path"] for r in rows} == set(GOOD)
    for path, (seconds, clips) in GOOD.items():
        mine = [r for r in rows if r["path"] == path]
        assert len(mine) == clips, path
        tolerance = 0.06 if path.endswith((".mp3", ".ogg")) else 1e-3  # codec padding
        assert sum(r["seconds"] for r in mine) == pytest.approx(seconds, abs=tolerance), path
        assert len({r["track_id"] for r in mine}) == 1
    total = sum(r["seconds"] for r in rows)
    assert prepared["metrics"]["hours"] * 3600 == pytest.approx(total)
    m = prepared["metrics"]
    assert (m["files_total"], m["files_ok"], m["files_rejected"]) == (len(GOOD) + len(BAD), len(GOOD), len(BAD))
    assert m["clips_silent"] == 1 and m["files_duplicate"] == sum(len(g) - 1 for g in DUPLICATES)
    assert m["clips_train"] + m["clips_val"] + m["clips_test"] == len(rows)


def test_manifest_rows_carry_what_downstream_needs(prepared):
    rows = prepared["rows"]
    for r in rows:
        for key in ("clip_id", "track_id", "path", "split", "shard", "index", "start_s", "seconds", "sample_rate"):
            assert key in r
        assert r["shard"].startswith("prepare/mono-") and r["sample_rate"] == SR
    assert len({r["clip_id"] for r in rows}) == len(rows)
    a = [r for r in rows if r["path"] == "a.wav"]
    assert [r["start_s"] for r in a] == [0.0, 2.0, 4.0, 6.0]
    assert a[0]["key"] == "D minor" and a[0]["bpm"] == 120.0 and a[0]["meter"] == "3/4"
    assert a[0]["instruments"] == ["piano", "violin"] and a[0]["rating"] == "5" and a[0]["title"] == "Alpha"
    b = next(r for r in rows if r["path"] == "sub/b_stereo.flac")
    assert b["key"] == "Bb major" and "bpm" not in b
    d = next(r for r in rows if r["path"] == "d_8k.wav")
    assert "key" not in d and d["bpm"] == 100.0
    assert next(r for r in rows if r["path"] == "partly_silent.wav")["start_s"] == 2.0


def test_splits_are_by_recording_and_copies_never_leak(prepared):
    rows = prepared["rows"]
    split_of_path: dict[str, set[str]] = {}
    for r in rows:
        split_of_path.setdefault(r["path"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_path.values())
    for group in DUPLICATES:
        assert len(set.union(*(split_of_path[p] for p in group))) == 1
        first = min(group)
        assert all(r["duplicate_of"] == first for r in rows if r["path"] in group - {first})
    copies = set.union(*DUPLICATES) - {min(g) for g in DUPLICATES}
    assert all("duplicate_of" not in r for r in rows if r["path"] not in copies)
    assert {s for v in split_of_path.values() for s in v} == {"train", "val", "test"}


def test_clips_are_normalised_and_never_clip(prepared):
    reader = ShardReader(prepared["root"] / "artifacts")
    for r in prepared["rows"]:
        audio = reader.clip(r)[: round(r["seconds"] * SR)]
        peak = peak_dbfs(audio)
        assert peak <= -1.0 + 0.01
        level = rms_dbfs(audio)
        assert level == pytest.approx(-20.0, abs=0.05) or (peak > -1.1 and level < -20.0), r["clip_id"]


def test_stereo_clips_share_the_cut_and_the_gain(prepared):
    reader = ShardReader(prepared["root"] / "artifacts")
    stereo_rows = [r for r in prepared["rows"] if "stereo_shard" in r]
    assert {r["path"] for r in stereo_rows} == {"sub/b_stereo.flac"}
    for r in stereo_rows:
        assert r["stereo_shard"].startswith("prepare/stereo-")
        stereo = reader.clip({"shard": r["stereo_shard"], "index": r["stereo_index"]})
        mono = reader.clip(r)
        assert stereo.shape == (2, len(mono))
        np.testing.assert_allclose(stereo.mean(axis=0), mono, atol=2 / 32767)
        assert peak_dbfs(stereo) <= -1.0 + 0.01


def test_the_rejects_report_is_logged(prepared):
    assert {"rejects.txt", "rejects.jsonl"} <= set(prepared["ctx"].tracker.artifact_files())


def test_the_stage_is_deterministic(prepared, tmp_path):
    ctx = context(tmp_path, make_params(prepared["corpus"]))
    prepare_stage.run(ctx)
    again = read_manifest(ctx.out_dir / "manifest.jsonl")
    assert [(r["clip_id"], r["split"], r["shard"], r["index"]) for r in again] == \
        [(r["clip_id"], r["split"], r["shard"], r["index"]) for r in prepared["rows"]]


def test_a_corpus_without_usable_audio_is_an_input_error(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "x.wav").write_text("not audio")
    from presto.errors import InputError

    with pytest.raises(InputError, match="(?s)no usable audio.*x.wav: not a readable audio file"):
        prepare_stage.run(context(tmp_path, make_params(corpus, metadata=None)))


# ---------------------------------------------------------------------------------------------------
# The pieces


@pytest.mark.parametrize("clip, hop, n", [(100, 100, 1050), (100, 100, 1030), (100, 40, 1000), (100, 170, 1000),
                                          (100, 100, 40)])
def test_clip_cutter_matches_a_direct_cut_for_any_blocking(clip, hop, n):
    x = np.arange(n, dtype=np.float32)[None] + 1
    expected = []
    for start in range(0, n, hop):
        content = min(clip, n - start)
        if content < clip:
            if 2 * content >= clip:
                expected.append((start, content))
            break
        expected.append((start, content))
    for block in (7, 64, 1000):
        cutter = ClipCutter(clip, hop)
        clips = [c for i in range(0, n, block) for c in cutter.push(x[:, i:i + block])] + cutter.finish()
        assert [(c.start, c.content) for c in clips] == expected
        for c in clips:
            np.testing.assert_array_equal(c.audio[0, :c.content], x[0, c.start:c.start + c.content])
            assert c.audio.shape == (1, clip) and not c.audio[0, c.content:].any()


def test_assign_splits_hits_fractions_and_is_deterministic():
    groups = {f"track{i:03d}": 60.0 + i for i in range(200)}
    splits = assign_splits(groups, 0.1, 0.2, seed=3)
    total = sum(groups.values())
    share = {s: sum(v for g, v in groups.items() if splits[g] == s) / total for s in ("train", "val", "test")}
    assert share["val"] == pytest.approx(0.1, abs=0.01) and share["test"] == pytest.approx(0.2, abs=0.01)
    assert assign_splits(dict(reversed(list(groups.items()))), 0.1, 0.2, seed=3) == splits
    assert assign_splits(groups, 0.1, 0.2, seed=4) != splits
    assert set(assign_splits({"only": 10.0}, 0.1, 0.1, seed=0).values()) == {"train"}
    assert "train" in assign_splits({"x": 1.0, "y": 1.0}, 0.5, 0.4, seed=0).values()
    assert set(assign_splits(groups, 0.0, 0.0, seed=0).values()) == {"train"}


def test_corpus_relpath_refuses_to_leave_the_folder(tmp_path):
    corpus = tmp_path / "c"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "x.wav").write_bytes(b"")
    (tmp_path / "secret.wav").write_bytes(b"")
    os.symlink(tmp_path, corpus / "up")
    assert corpus_relpath(corpus, "./sub//x.wav") == "sub/x.wav"
    assert corpus_relpath(corpus, "sub/../sub/x.wav") == "sub/x.wav"
    assert corpus_relpath(corpus, "up/c/sub/x.wav") == "up/c/sub/x.wav"  # a detour that stays inside
    for bad, reason in [("../x.wav", "leaves"), ("sub/../../x.wav", "leaves"), ("/etc/passwd", "absolute"),
                        ("C:\\x.wav", "absolute"), ("up/secret.wav", "outside"), ("  ", "empty")]:
        with pytest.raises(ValueError, match=reason):
            corpus_relpath(corpus, bad)


def test_metadata_values_are_cleaned_or_rejected():
    assert clean_value("bpm", "96.5") == 96.5 and clean_value("bpm", 120) == 120.0
    for bad in ("fast", "-5", "0", "nan", "inf", True, None):
        with pytest.raises(ValueError, match="bpm"):
            clean_value("bpm", bad)
    assert clean_value("key", "f# min") == "F# minor" and clean_value("key", "Bb") == "Bb major"
    with pytest.raises(ValueError):
        clean_value("key", "H major")
    assert clean_value("meter", " 6 / 8 ") == "6/8"
    assert clean_value("instruments", "piano | cello") == ["piano", "cello"]
    assert clean_value("instruments", ["harp"]) == ["harp"]
    fields, rejects = clean_metadata({"path": "x.wav", "Title": " T ", "split": "test", "bpm": "", "mood": "dark",
                                      "meter": "waltz"}, "x.wav", 3)
    assert fields == {"title": "T", "mood": "dark"}  # `split` is prepare's: never taken from metadata
    assert [(r.kind, r.field, r.value, r.line) for r in rejects] == [("value", "meter", "waltz", 3)]


def test_jsonl_metadata_is_read_like_csv(tmp_path):
    from presto.data.prepare import read_metadata

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "x.wav").write_bytes(b"")
    (corpus / "meta.jsonl").write_text(
        json.dumps({"path": "x.wav", "bpm": 90, "instruments": ["oud"], "extra": {"a": 1}}) + "\n"
        + "not json\n" + json.dumps(["a list"]) + "\n")
    table, rejects = read_metadata(corpus, "meta.jsonl", ["x.wav"])
    assert table == {"x.wav": {"bpm": 90.0, "instruments": ["oud"], "extra": {"a": 1}}}
    assert [(r.kind, r.line) for r in rejects] == [("row", 2), ("row", 3)]


def test_band_envelope_puts_a_tone_in_its_band_and_ignores_gain():
    sr = 16000
    t = np.arange(sr * 2) / sr
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    env = BandEnvelope(sr)
    for i in range(0, len(tone), 3333):  # blocks that do not align with frames
        env.push(tone[i:i + 3333])
    fp = env.result()
    edges = np.geomspace(BandEnvelope.LOW_HZ, BandEnvelope.HIGH_HZ, BandEnvelope.BANDS + 1)
    band = int(np.searchsorted(edges, 1000)) - 1
    assert fp.shape == (20, BandEnvelope.BANDS)
    assert (fp.argmax(axis=1) == band).all()
    quieter = BandEnvelope(sr)
    quieter.push(0.1 * tone)
    assert fingerprint_distance(fp, quieter.result()) == pytest.approx(0.0, abs=0.05)  # float16 steps
    long = BandEnvelope(sr)
    for _ in range(35):  # 70 s: only the first minute is kept
        long.push(tone)
    assert long.result().shape == (BandEnvelope.MAX_FRAMES, BandEnvelope.BANDS)


def test_group_duplicates_links_copies_only():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 10, (100, 8)), rng.normal(0, 10, (100, 8))
    fps = {"a": a, "a_loud": a + 6.0, "a_noisy": a + rng.normal(0, 0.3, a.shape), "b": b,
           "a_longer": a}  # same first frames, 20 % longer: another recording (an extended mix)
    seconds = {"a": 10.0, "a_loud": 10.05, "a_noisy": 9.98, "b": 10.0, "a_longer": 12.0}
    groups = group_duplicates(fps, seconds, tolerance_db=1.5)
    assert groups == {"a": "a", "a_loud": "a", "a_noisy": "a", "b": "b", "a_longer": "a_longer"}
    assert group_duplicates(fps, seconds, tolerance_db=100.0)["b"] == "a"  # the tolerance is what decides


def test_format_rejects_lists_every_kind():
    text = format_rejects([
        Reject("file", "x.wav", "empty file (0 bytes)"),
        Reject("value", "y.wav", "bpm must be a positive number", field="bpm", value="fast", line=4),
    ])
    assert "x.wav: empty file (0 bytes)" in text
    assert "y.wav line 4: bpm='fast': bpm must be a positive number" in text
    assert text.startswith("prepare rejects: 1 file, 0 row, 1 value, 0 column, 0 ignored")


def test_without_keep_stereo_stereo_sources_are_only_downmixed(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    x = music(20, 4.0, SR)
    sf.write(corpus / "st.wav", np.stack([x, -0.5 * x], 1), SR, subtype="FLOAT")
    ctx = context(tmp_path, make_params(corpus, metadata=None, keep_stereo=False, val_fraction=0.0,
                                        test_fraction=0.0))
    metrics = prepare_stage.run(ctx)
    rows = read_manifest(ctx.out_dir / "manifest.jsonl")
    assert len(rows) == 2 and metrics["clips_train"] == 2
    assert all("stereo_shard" not in r and r["source_channels"] == 2 for r in rows)
    assert not list(ctx.out_dir.glob("stereo-*"))
    mono = ShardReader(tmp_path / "artifacts").clip(rows[0])
    gain = 10 ** (rows[0]["gain_db"] / 20)
    np.testing.assert_allclose(mono, 0.25 * x[: 2 * SR] * gain, atol=2 / 32767)


def test_a_file_under_half_a_clip_gives_no_clip(tmp_path):
    from presto.data.prepare import DecodeJob, DecodeSettings, decode_file

    path = tmp_path / "brief.wav"
    sf.write(path, music(21, 0.8, SR), SR)
    settings = DecodeSettings(SR, CLIP, CLIP, 0.5, 30.0, -45.0, -20.0, -1.0, True)
    result = decode_file(DecodeJob(str(path), "brief.wav", settings))
    assert result.reason == "no clip: 0.80 s is under half a clip (1 s)"
    ok = decode_file(DecodeJob(str(path), "brief.wav", DecodeSettings(SR, 1.5, 1.5, 0.5, 30.0, -45.0, -20.0,
                                                                        -1.0, True)))
    assert ok.reason is None and ok.contents == [int(0.8 * SR)] and ok.mono.shape == (1, int(1.5 * SR))
