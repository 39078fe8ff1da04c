"""Captions: varied, dropout as asked, metadata first and winning, deterministic, robust to any text; and
the caption stage end to end on clips whose tempo and key are known."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from presto.config import load_params
from presto.data.caption import (
    FALLBACK_CAPTION,
    MAX_CAPTION_CHARS,
    MAX_FIELD_CHARS,
    clean_text,
    clip_attributes,
    join_words,
    make_captions,
    metadata_bpm,
    metadata_key,
    text_values,
)
from presto.data.shards import ShardWriter, read_manifest, write_manifest
from presto.errors import InputError
from stages import caption as caption_stage
from stages.base import StageContext
from recording_tracker import RecordingTracker

REPO = Path(__file__).resolve().parents[1]
SR = 16000

ROW = {"clip_id": "bach-0001-3", "track_id": "bach-0001", "split": "train", "title": "Chorale 12",
       "composer": "J. S. Bach", "instruments": "acoustic_grand_piano;violin;cello", "key": "d",
       "bpm": 96.0, "meter": "3/4", "genre": "baroque", "mood": "solemn"}
# Analysis that disagrees with the metadata where both speak, so a test can tell which one a caption used.
ANALYSIS = {"tempo_bpm": 120.0, "pulse_clarity": 0.9, "key": "C major", "key_confidence": 0.9,
            "rms_dbfs": -20.0, "peak_dbfs": -3.0, "centroid_hz": 2500.0, "onset_rate_hz": 1.0}


def captions(row=ROW, analysis=ANALYSIS, per_clip=4, dropout=0.3, seed=0):
    return make_captions(row, analysis, per_clip=per_clip, attribute_dropout=dropout, seed=seed)


# --- captions --------------------------------------------------------------------------------------------

def test_captions_vary_in_content_and_order():
    out = captions(per_clip=8)
    assert len(out) == len(set(out)) == 8
    # With no dropout every caption holds both phrases; their order still changes between captions.
    full = captions(per_clip=8, dropout=0.0)
    assert all("96 bpm" in c and "D minor" in c for c in full)
    assert len({c.index("96 bpm") < c.index("D minor") for c in full}) == 2


def test_no_dropout_says_everything():
    for caption in captions(per_clip=6, dropout=0.0):
        for phrase in ["baroque", "solemn", "acoustic grand piano", "violin", "cello", "J. S. Bach", "3/4",
                       "D minor", "96 bpm", "bright", "calm"]:
            assert phrase in caption, (phrase, caption)
        assert "Chorale 12" not in caption  # titles name a track, they do not describe it


def test_full_dropout_still_keeps_one_attribute():
    attributes = clip_attributes(ROW, ANALYSIS)
    for caption in captions(per_clip=10, dropout=1.0):
        said = [a.name for a in attributes if any(v in caption for v in a.values)]
        assert len(said) == 1, caption


def test_dropout_rate_is_the_asked_one():
    """Each attribute is kept with probability 1 - p (plus a small share from the at-least-one rule)."""
    rows = [{**ROW, "clip_id": f"clip-{i}"} for i in range(300)]
    kept = [("96 bpm" in c) for r in rows for c in captions(row=r, dropout=0.6)]
    assert np.mean(kept) == pytest.approx(0.4, abs=0.04)


def test_metadata_caption_comes_first_and_verbatim():
    row = {**ROW, "caption": "Slow chorale for strings"}
    out = captions(row=row, per_clip=4)
    assert out[0] == "Slow chorale for strings" and len(out) == 4
    assert "Slow chorale for strings" not in out[1:]
    assert captions(row=row, per_clip=1) == ["Slow chorale for strings"]


def test_bpm_phrase_from_metadata_wins_over_estimate():
    out = captions(per_clip=10, dropout=0.0)
    assert all(re.search(r"\b96 bpm\b", c) for c in out)
    assert not any("120" in c for c in out)


def test_estimated_tempo_and_key_used_only_without_metadata():
    bare = {"clip_id": "x"}
    out = captions(row=bare, per_clip=4, dropout=0.0)
    assert all("120 bpm" in c and "C major" in c for c in out)
    unclear = {**ANALYSIS, "pulse_clarity": 0.1}  # a tempo guessed from no clear pulse is not said
    assert not any("bpm" in c for c in captions(row=bare, analysis=unclear, per_clip=4, dropout=0.0))
    # Augmented labels are fractional; the caption rounds.
    assert "106 bpm" in captions(row={**bare, "bpm": 105.6}, dropout=0.0)[0]


@pytest.mark.parametrize("bad", ["fast", -3, 0, 1e6, float("nan"), True, None, [120]])
def test_unusable_bpm_falls_back_to_the_estimate(bad):
    row = {"clip_id": "x", "bpm": bad}
    assert metadata_bpm(row) is None
    assert "120 bpm" in captions(row=row, dropout=0.0)[0]


def test_keys_are_normalised_or_kept_as_written():
    assert metadata_key({"key": "d"}) == "D minor" and metadata_key({"key": "f# major"}) == "F# major"
    assert metadata_key({"key": "D dorian"}) is None
    # Not a major/minor key, but still a true thing to say.
    assert "D dorian" in captions(row={"clip_id": "x", "key": "D dorian"}, dropout=0.0)[0]


def test_deterministic_in_seed_and_clip_id():
    assert captions() == captions()
    assert captions() == captions(row=dict(reversed(list(ROW.items()))))
    assert captions(seed=1) != captions(seed=0)
    assert captions(row={**ROW, "clip_id": "other"}) != captions()


def test_descriptor_words_follow_the_analysis():
    def said(**analysis):
        return captions(row={"clip_id": "x"}, analysis=analysis, per_clip=1, dropout=0.0)[0]

    assert "dark" in said(centroid_hz=400.0) and "bright" in said(centroid_hz=3000.0)
    assert said(centroid_hz=1000.0) == FALLBACK_CAPTION  # an ordinary clip gets no word
    assert "energetic" in said(onset_rate_hz=14.0) and "calm" in said(onset_rate_hz=1.0)
    assert "loud" in said(rms_dbfs=-8.0) and "quiet" in said(rms_dbfs=-50.0)


def test_nothing_known_gives_the_fallback():
    assert captions(row={"clip_id": "x"}, analysis={}, per_clip=3) == [FALLBACK_CAPTION] * 3


HOSTILE = {
    "clip_id": "evil",
    "genre": '<script>alert("x")</script>',
    "mood": "dreamy 🎹🌙 \u200d{0} {} %s",
    "composer": "Ren\u00e9e \"Q\" O'Brien\r\n\x00\x1b[31m",
    "instruments": ["piano", "", None, 7, {"nested": 1}, "x" * 100_000],
    "meter": float("nan"),
    "caption": "A\n\n caption   with\ttabs " + "long " * 100_000,
}


def test_hostile_metadata_stays_text():
    out = captions(row=HOSTILE, per_clip=6, dropout=0.0)
    assert out[0].startswith("A caption with tabs long long")
    assert all(len(c) <= MAX_CAPTION_CHARS for c in out)
    for c in out:
        assert not any(ch in c for ch in "\n\r\t\x00\x1b")
    assert any('<script>alert("x")</script>' in c for c in out[1:])  # markup is text, not stripped
    assert any("dreamy 🎹🌙 \u200d{0} {} %s" in c for c in out[1:])  # braces are not format fields
    assert any("Renée \"Q\" O'Brien [31m" in c for c in out[1:])
    assert all("nested" not in c for c in out)
    json.dumps(out, ensure_ascii=False)  # writable as JSON


def test_clean_text_and_list_values():
    assert clean_text(" a\n\tb  c ") == "a b c"
    assert clean_text("\x00\x01 ") is None and clean_text(None) is None and clean_text(float("inf")) is None
    assert clean_text(3.0) == "3" and clean_text(False) is None
    assert len(clean_text("y" * 10_000)) == MAX_FIELD_CHARS
    assert text_values("piano; violin;;piano") == ("piano", "violin")
    assert text_values(["cello", "cello ", 5]) == ("cello", "5")
    assert len(text_values(";".join(f"i{k}" for k in range(50)))) == 8
    assert join_words(["a"]) == "a" and join_words(["a", "b"]) == "a and b"
    assert join_words(["a", "b", "c"]) == "a, b and c"


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="per_clip"):
        captions(per_clip=0)
    with pytest.raises(ValueError, match="attribute_dropout"):
        captions(dropout=1.5)


# --- the stage -------------------------------------------------------------------------------------------

def chord_pulse(seconds: float = 4.0) -> np.ndarray:
    """D major chords (I IV V I, two beats each) struck every 0.5 s: 120 bpm in D major."""
    chords = [[50, 62, 66, 69], [55, 62, 67, 71], [57, 61, 64, 69], [50, 62, 66, 69]]
    t = np.arange(int(0.5 * SR)) / SR
    beats = []
    for beat in range(int(seconds / 0.5)):
        chord = chords[(beat // 2) % 4]
        f = 440.0 * 2 ** ((np.array(chord)[:, None] - 69) / 12)
        notes = sum(0.6 ** h * np.sin(2 * np.pi * f * (h + 1) * t) for h in range(5)).sum(axis=0)
        beats.append(0.05 * notes * np.exp(-6 * t))
    return np.concatenate(beats).astype(np.float32)


def make_augment(root: Path, rows_meta: list[dict], sample_rate: int = SR) -> None:
    artifacts = root / "artifacts"
    rows = []
    with ShardWriter(artifacts / "prepare", "mono", 2) as writer:
        for k, meta in enumerate(rows_meta):
            shard, index = writer.add(chord_pulse())
            rows.append({"clip_id": f"c{k}", "track_id": f"t{k}", "split": "train" if k else "val",
                         "shard": f"prepare/{shard}", "index": index, "seconds": 4.0,
                         "sample_rate": sample_rate, **meta})
    (artifacts / "augment").mkdir(parents=True)
    write_manifest(artifacts / "augment" / "manifest.jsonl", rows)


# Every clip sounds like 120 bpm in D major; the labels say otherwise in known ways.
LABELS = [
    {"bpm": 120.0, "key": "D major"},  # both agree
    {"bpm": 60.0, "key": "G major"},  # tempo an octave off; the estimate is a fifth above the label
    {"bpm": 96.0, "key": "B minor", "caption": "Hymn for organ"},  # tempo wrong; relative key
    {"instruments": ["organ"]},  # no labels
]


def context(root: Path) -> StageContext:
    return StageContext(name="caption", params=load_params(REPO / "params.yaml"), root=root,
                        out_dir=root / "out", checkpoint_dir=root / "ckpt", fingerprint="test",
                        tracker=RecordingTracker())


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    make_augment(root, LABELS)
    ctx = context(root)
    return ctx, caption_stage.run(ctx)


def test_stage_writes_one_row_per_clip(staged):
    ctx, metrics = staged
    rows = read_manifest(ctx.out_dir / "captions.jsonl")
    per_clip = ctx.params.caption.per_clip
    assert [r["clip_id"] for r in rows] == ["c0", "c1", "c2", "c3"]
    assert [r["split"] for r in rows] == ["val", "train", "train", "train"]
    assert all(len(r["captions"]) == per_clip for r in rows)
    assert rows[2]["captions"][0] == "Hymn for organ"
    for r in rows:
        assert r["analysis"]["key"] == "D major"
        assert r["analysis"]["tempo_bpm"] == pytest.approx(120, rel=0.02)
        assert set(r["analysis"]) >= {"tempo_bpm", "key", "key_confidence", "rms_dbfs", "centroid_hz"}
    assert metrics["clips"] == 4 and metrics["captions"] == 4 * per_clip
    assert metrics["captions_from_metadata"] == 1


def test_stage_agreement_metrics(staged):
    ctx, metrics = staged
    assert metrics["tempo_labelled"] == 3 and metrics["key_labelled"] == 3
    assert metrics["tempo_agreement"] == pytest.approx(1 / 3)
    assert metrics["tempo_agreement_octave"] == pytest.approx(2 / 3)
    assert metrics["key_agreement"] == pytest.approx(1 / 3)
    assert metrics["key_agreement_relative"] == pytest.approx(1.0)
    assert metrics["key_mirex_score"] == pytest.approx((1.0 + 0.5 + 0.3) / 3)
    assert ctx.tracker.metrics == [(None, metrics)]
    report = ctx.tracker.texts["label_disagreements.tsv"]
    assert "c2\ttempo\t96" in report and "c1" not in report  # an octave off is not reported
    assert "Hymn for organ" in ctx.tracker.texts["captions_sample.txt"]


def test_stage_is_deterministic(staged, tmp_path):
    ctx, _ = staged
    make_augment(tmp_path, LABELS)
    again = context(tmp_path)
    caption_stage.run(again)
    assert (again.out_dir / "captions.jsonl").read_bytes() == (ctx.out_dir / "captions.jsonl").read_bytes()


def test_agreement_left_out_without_labels():
    metrics = caption_stage.agreement_metrics([{"clip_id": "x"}], [{"tempo_bpm": 120.0, "key": "C major"}])
    assert metrics == {"tempo_labelled": 0, "key_labelled": 0}


def test_stage_names_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="run the augment stage"):
        caption_stage.run(context(tmp_path))
    make_augment(tmp_path, LABELS[:1], sample_rate=22050)
    with pytest.raises(InputError, match="22050 Hz but shared.sample_rate = 16000"):
        caption_stage.run(context(tmp_path))


def test_stage_names_a_missing_shard(tmp_path):
    make_augment(tmp_path, LABELS[:1])
    (tmp_path / "artifacts" / "prepare" / "mono-00000.safetensors").unlink()
    with pytest.raises(InputError, match="shard prepare/mono-00000.safetensors not found"):
        caption_stage.run(context(tmp_path))
