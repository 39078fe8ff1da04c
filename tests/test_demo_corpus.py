"""The demo corpus: choosing works, arranging, rendering (with its guards) and the stage's output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mido
import numpy as np
import psutil
import pytest
import soundfile as sf
import yaml

from presto.audio.midi_render import RenderError, default_soundfont, render_midi, trim_trailing_silence
from presto.config import parse_params
from presto.data import demo_corpus as dc
from presto.data.music import parse_key, transpose_key
from presto.errors import ParamsError
from stages.base import StageContext
from stages import demo_corpus as stage
from recording_tracker import RecordingTracker

ROOT = Path(__file__).resolve().parents[1]
SR = dc.RENDER_SAMPLE_RATE
INSTRUMENTS = ["acoustic_grand_piano", "violin", "cello", "flute", "clarinet"]


def make_params(**demo_corpus):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["demo_corpus"].update({"instruments": INSTRUMENTS, **demo_corpus})
    return parse_params(raw)


def make_ctx(tmp_path: Path, **demo_corpus) -> StageContext:
    return StageContext(name="demo_corpus", params=make_params(**demo_corpus), root=ROOT, out_dir=tmp_path / "out",
                        checkpoint_dir=tmp_path / "ckpt", fingerprint="test", tracker=RecordingTracker())


def job(work: dc.Work, tmp_path: Path, **demo_corpus) -> dc.PieceJob:
    return dc.PieceJob(work, 0, make_params(**demo_corpus).demo_corpus, str(default_soundfont()),
                       str(tmp_path / "corpus"))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_stuck_midi(path: Path) -> None:
    """A note-on that is never switched off: fluidsynth's fast renderer then never stops."""
    midi = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    track.append(mido.Message("program_change", program=19, time=0))
    track.append(mido.Message("note_on", note=60, velocity=100, time=0))
    track.append(mido.MetaMessage("end_of_track", time=480))
    midi.save(str(path))


def render_events(tmp_path: Path, parts, arrangement: dc.Arrangement) -> np.ndarray:
    midi = tmp_path / "events.mid"
    dc.write_midi(parts, arrangement, 30.0, midi)
    return render_midi(midi, default_soundfont(), sample_rate=SR, timeout_s=30, max_bytes=10**8)


# --- the stage, run twice with the same params -------------------------------------------------------

STAGE_PARAMS = dict(sources=["bach", "essenFolksong"], minutes=0.5, max_piece_seconds=12.0)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    runs = []
    for name in ("a", "b"):
        ctx = make_ctx(tmp_path_factory.mktemp(name), **STAGE_PARAMS)
        runs.append((ctx, stage.run(ctx)))
    return runs


def test_stage_writes_a_corpus_with_true_metadata(two_runs):
    ctx, metrics = two_runs[0]
    params = ctx.params.demo_corpus
    corpus = ctx.out_dir / "corpus"
    with open(corpus / "metadata.csv", newline="") as f:
        assert next(csv.reader(f)) == list(dc.METADATA_COLUMNS)
    rows = read_rows(corpus / "metadata.csv")
    assert metrics["pieces"] == len(rows) >= 2 and metrics["skipped"] == 0
    total = sum(float(r["duration_s"]) for r in rows)
    assert metrics["minutes"] == pytest.approx(total / 60) and total >= 30.0
    # The corpus is the shortest prefix of the seeded work order that fills it.
    order = dc.work_order(dc.list_works(params.sources), ctx.params.shared.seed)[:len(rows)]
    assert {r["source"] for r in rows} == {w.ref for w in order}
    seconds = {r["source"]: float(r["duration_s"]) for r in rows}
    assert total - seconds[order[-1].ref] < 30.0
    sources = set()
    for row in rows:
        info = sf.info(str(corpus / row["path"]))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 2, "PCM_16", "FLAC")
        assert info.frames / SR == pytest.approx(float(row["duration_s"]), abs=1e-3)
        assert 1.0 < float(row["duration_s"]) <= params.max_piece_seconds
        assert set(row["instruments"].split(";")) <= set(INSTRUMENTS)
        assert 60 <= int(row["bpm"]) <= 150
        parse_key(row["key"])
        assert row["license"] and row["composer"] in ("Johann Sebastian Bach", "traditional")
        sources.add(row["source"].split("/")[0])
    assert sources == {"bach", "essenFolksong"}  # sources are taken in turn
    assert (ctx.out_dir / "skipped.jsonl").read_text() == ""
    assert any(sub == "examples" for sub, _ in ctx.tracker.artifacts)
    assert ctx.tracker.metrics[-1][1]["pieces"] == len(rows)


def test_stage_is_deterministic(two_runs):
    (ctx_a, metrics_a), (ctx_b, metrics_b) = two_runs
    assert metrics_a == metrics_b
    meta_a = (ctx_a.out_dir / "corpus" / "metadata.csv").read_text()
    assert meta_a == (ctx_b.out_dir / "corpus" / "metadata.csv").read_text()
    files_a = sorted(p.relative_to(ctx_a.out_dir) for p in ctx_a.out_dir.rglob("*.flac"))
    files_b = sorted(p.relative_to(ctx_b.out_dir) for p in ctx_b.out_dir.rglob("*.flac"))
    assert files_a == files_b and len(files_a) == len(read_rows(ctx_a.out_dir / "corpus" / "metadata.csv"))
    for rel in files_a:
        assert (ctx_a.out_dir / rel).read_bytes() == (ctx_b.out_dir / rel).read_bytes()


def test_stereo_pieces_differ_between_channels(two_runs):
    ctx, _ = two_runs[0]
    for row in read_rows(ctx.out_dir / "corpus" / "metadata.csv"):
        audio, _ = sf.read(str(ctx.out_dir / "corpus" / row["path"]))
        left, right = audio[:, 0], audio[:, 1]
        level_db = 10 * np.log10(np.mean(left**2) / np.mean(right**2))
        assert np.abs(left - right).max() > 0.05 or abs(level_db) > 1.0, row["path"]


def test_stage_reports_skipped_works(tmp_path, monkeypatch):
    params = make_params(sources=["bach"], minutes=0.3, max_piece_seconds=10.0)
    refused = dc.work_order(dc.list_works(["bach"]), params.shared.seed)[0]
    real = stage.render_piece
    monkeypatch.setattr(stage, "render_piece", lambda j: dc.PieceResult(j.work, None, "test: refused")
                        if j.work == refused else real(j))
    ctx = make_ctx(tmp_path, sources=["bach"], minutes=0.3, max_piece_seconds=10.0)
    metrics = stage.run(ctx)
    skipped = [json.loads(line) for line in (ctx.out_dir / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"source": refused.ref, "reason": "test: refused"}] and metrics["skipped"] == 1
    rows = read_rows(ctx.out_dir / "corpus" / "metadata.csv")
    assert refused.ref not in {r["source"] for r in rows} and not (ctx.out_dir / "corpus" / refused.audio_path).exists()
    assert (None, ["skipped.jsonl"]) in ctx.tracker.artifacts


def test_stage_refuses_sources_too_small_for_minutes(tmp_path):
    with pytest.raises(ParamsError, match=r"demo_corpus.minutes = 1.*only 0\.\d minutes"):
        stage.run(make_ctx(tmp_path, sources=["bach/bwv66.6"], minutes=1.0))


# --- one piece: labels checked against what is known of the score ------------------------------------

def test_piece_key_and_bpm_follow_the_arrangement(tmp_path):
    # BWV 66.6 is in F# minor and lasts 36 quarter notes.
    result = dc.render_piece(job(dc.Work("bach/bwv66.6.mxl", None), tmp_path, tempo_range=[90, 90],
                                 transpose_range=[2, 2]))
    row = result.row
    assert result.reason is None and row is not None
    assert row["key"] == transpose_key("F# minor", 2) == "Ab minor"
    assert row["bpm"] == 90 and row["meter"] == "4/4" and row["composer"] == "Johann Sebastian Bach"
    assert len(row["instruments"].split(";")) == 4  # four voices, four different instruments
    assert 36 * 60 / 90 <= row["duration_s"] <= 36 * 60 / 90 + 3.0  # + release tail, trimmed
    assert (tmp_path / "corpus" / "bach" / "bwv66.6.flac").is_file() and row["path"] == "bach/bwv66.6.flac"


def test_mono_when_not_stereo(tmp_path):
    result = dc.render_piece(job(dc.Work("bach/bwv66.6.mxl", None), tmp_path, stereo=False))
    assert sf.info(str(tmp_path / "corpus" / result.row["path"])).channels == 1


def test_unreadable_score_is_skipped_with_reason(tmp_path):
    result = dc.render_piece(job(dc.Work("bach/no_such_chorale.mxl", None), tmp_path))
    assert result.row is None and result.reason.startswith("score not readable")


@pytest.mark.parametrize("bpm, transpose", [(120, 3), (60, -5)])
def test_rendered_pitch_and_length(tmp_path, bpm, transpose):
    # A4 for two quarter notes: sounds at 440 * 2^(t/12) Hz for 2 * 60 / bpm seconds.
    audio = render_events(tmp_path, [[dc.NoteEvent(0.0, 2.0, 69, 100)]],
                          dc.Arrangement(bpm, transpose, ("flute",), (64,))).mean(axis=0)
    seconds = 2 * 60 / bpm
    segment = audio[int(0.2 * SR):int((seconds - 0.2) * SR)]
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(len(segment)), 8 * len(segment)))
    # Harmonic product spectrum: the fundamental is where the 1st, 2nd and 3rd harmonics line up (a flute's
    # low notes have a louder 2nd harmonic than fundamental).
    n = len(spectrum) // 3
    product = spectrum[:n] * spectrum[: 2 * n : 2] * spectrum[: 3 * n : 3]
    f0 = np.fft.rfftfreq(8 * len(segment), 1 / SR)[np.argmax(product)]
    assert f0 == pytest.approx(440 * 2 ** (transpose / 12), rel=0.02)  # within a third of a semitone
    frames = np.sqrt(np.mean(audio[: len(audio) // 441 * 441].reshape(-1, 441) ** 2, axis=1))  # 10 ms
    loud = np.flatnonzero(frames > 0.1 * frames.max())
    assert loud[0] * 0.01 < 0.05 and (loud[-1] + 1) * 0.01 == pytest.approx(seconds, abs=0.15)


def test_pan_moves_a_part_between_channels(tmp_path):
    for pan, louder in ((0, 0), (127, 1)):
        left, right = render_events(tmp_path, [[dc.NoteEvent(0.0, 2.0, 60, 100)]],
                                    dc.Arrangement(120, 0, ("acoustic_grand_piano",), (pan,)))
        energy = (np.mean(left**2), np.mean(right**2))
        assert 10 * np.log10(energy[louder] / energy[1 - louder]) > 20


# --- the renderer's guards -----------------------------------------------------------------------------

def _no_fluidsynth_left():
    return not [p for p in psutil.Process().children(recursive=True) if "fluidsynth" in p.name()]


@pytest.mark.timeout(60)
def test_stuck_note_is_killed_by_the_time_limit(tmp_path):
    write_stuck_midi(tmp_path / "stuck.mid")
    with pytest.raises(RenderError, match="time limit"):
        render_midi(tmp_path / "stuck.mid", default_soundfont(), sample_rate=SR, timeout_s=0.5, max_bytes=10**9)
    assert _no_fluidsynth_left()


@pytest.mark.timeout(60)
def test_stuck_note_is_killed_by_the_size_limit(tmp_path):
    write_stuck_midi(tmp_path / "stuck.mid")
    with pytest.raises(RenderError, match="MB limit"):
        render_midi(tmp_path / "stuck.mid", default_soundfont(), sample_rate=SR, timeout_s=60, max_bytes=2_000_000)
    assert _no_fluidsynth_left()


@pytest.mark.timeout(60)
def test_stuck_render_is_reported_as_a_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "write_midi", lambda parts, arrangement, max_seconds, path:
                        write_stuck_midi(Path(path)) or [0])
    result = dc.render_piece(job(dc.Work("bach/bwv66.6.mxl", None), tmp_path, render_timeout_s=1.0,
                                 max_render_mb=1000))
    assert result.row is None and "render failed" in result.reason and "killed" in result.reason
    assert not (tmp_path / "corpus" / "bach" / "bwv66.6.flac").exists()


def test_silent_render_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "render_midi", lambda *args, **kwargs: np.zeros((2, SR), np.float32))
    result = dc.render_piece(job(dc.Work("bach/bwv66.6.mxl", None), tmp_path))
    assert result.row is None and result.reason.startswith("silent render")


def test_trim_trailing_silence():
    rate = 1000
    tone = np.sin(2 * np.pi * 50 * np.arange(rate) / rate)
    audio = np.stack([np.concatenate([tone, 1e-4 * np.ones(2 * rate)]), np.zeros(3 * rate)])  # -80 dB tail
    trimmed = trim_trailing_silence(audio, rate, floor_db=-60.0, keep_seconds=0.25)
    last_loud = np.flatnonzero(np.abs(tone) > 1e-3)[-1]
    assert trimmed.shape == (2, last_loud + 1 + 250)
    assert trim_trailing_silence(np.zeros((2, 100)), rate, floor_db=-60.0, keep_seconds=0.25).shape == (2, 0)
    with pytest.raises(ValueError, match="floor_db"):
        trim_trailing_silence(audio, rate, floor_db=6.0, keep_seconds=0.0)


def test_finish_audio_cuts_with_a_fade():
    audio = np.full((2, 3 * SR), 0.5, dtype=np.float32)
    out = dc.finish_audio(audio, stereo=True, max_seconds=2.0)
    assert out.shape == (2, 2 * SR) and out[:, 0] == pytest.approx(dc.PEAK_LEVEL) and out[:, -1] == pytest.approx(0)
    mono = dc.finish_audio(audio, stereo=False, max_seconds=10.0)
    assert mono.shape[0] == 1 and np.abs(mono).max() == pytest.approx(dc.PEAK_LEVEL)


# --- choosing and arranging ------------------------------------------------------------------------------

def test_part_notes_drop_grace_notes_and_merge_ties():
    from music21 import chord, note, stream, tie

    first, second = note.Note("C4", quarterLength=1), note.Note("C4", quarterLength=2)
    first.tie, second.tie = tie.Tie("start"), tie.Tie("stop")
    soft = note.Note("A4", quarterLength=0.5)
    soft.volume.velocity = 64
    part = stream.Part()
    part.append([first, second, note.Note("D4").getGrace(), chord.Chord(["E4", "G4"], quarterLength=1),
                 note.Rest(quarterLength=1), soft])
    assert dc.part_notes(part) == [(0.0, 3.0, 60, dc.DEFAULT_VELOCITY), (3.0, 4.0, 64, dc.DEFAULT_VELOCITY),
                                   (3.0, 4.0, 67, dc.DEFAULT_VELOCITY), (5.0, 5.5, 69, 64)]


def test_write_midi_times_transposition_and_cut(tmp_path):
    import pretty_midi

    parts = [[dc.NoteEvent(1.0, 2.0, 60, 80), dc.NoteEvent(2.0, 9.0, 62, 80), dc.NoteEvent(9.0, 10.0, 64, 80)],
             [dc.NoteEvent(12.0, 13.0, 70, 80)]]
    heard = dc.write_midi(parts, dc.Arrangement(120, -2, ("flute", "cello"), (10, 100)), 3.0, tmp_path / "x.mid")
    midi = pretty_midi.PrettyMIDI(str(tmp_path / "x.mid"))
    assert heard == [0] and len(midi.instruments) == 1  # the second part starts after the cut
    track = midi.instruments[0]
    assert track.program == 73 and [c.value for c in track.control_changes if c.number == 10] == [10]
    # Leading rest dropped; 0.5 s per quarter; the long note cut at 3 s; the last one starts past it.
    assert [n.pitch for n in track.notes] == [58, 60]
    assert [t for n in track.notes for t in (n.start, n.end)] == pytest.approx([0.0, 0.5, 0.5, 3.0], abs=1e-3)


def test_gm_program_names():
    # General MIDI program numbers, 0-based.
    assert [dc.gm_program(n) for n in ("acoustic_grand_piano", "acoustic_guitar_nylon", "violin",
                                       "string_ensemble_1", "flute", "gunshot")] == [0, 24, 40, 48, 73, 127]
    with pytest.raises(ParamsError, match=r"demo_corpus.instruments: 'violinn'.*violin"):
        dc.gm_program("violinn")


def test_check_params_refuses_bad_instruments_and_tempi():
    sf2 = default_soundfont()
    with pytest.raises(ParamsError, match="string_ensemble_1.*cancel"):
        dc.check_params(make_params(instruments=["string_ensemble_1"]).demo_corpus, sf2)
    with pytest.raises(ParamsError, match="tempo_range.*whole bpm"):
        dc.check_params(make_params(tempo_range=[100.2, 100.8]).demo_corpus, sf2)
    dc.check_params(make_params(instruments=["flute", "string_ensemble_2"]).demo_corpus, sf2)


def test_list_works():
    works = dc.list_works(["bach", "essenFolksong/altdeu10", "beethoven"])
    bach = works["bach"]
    assert bach == sorted(bach, key=lambda w: w.path) and all(w.path.startswith("bach/") for w in bach)
    assert all(w.path.endswith(dc.SCORE_SUFFIXES) for w in bach)  # no roman-numeral analyses (.rntxt)
    stems = [w.path.rsplit(".", 1)[0] for w in bach]
    assert len(stems) == len(set(stems)) > 300  # a work in two formats counts once
    tunes = works["essenFolksong/altdeu10"]
    abc = (dc.corpus_root() / "essenFolksong" / "altdeu10.abc").read_text(encoding="latin-1")
    tune_count = sum(line.startswith("X:") for line in abc.splitlines())  # one X: (reference number) per tune
    assert [w.number for w in tunes] == list(range(1, tune_count + 1))
    beethoven = {w.path for w in works["beethoven"]}
    assert "beethoven/opus133.mxl" not in beethoven  # too large to parse quickly
    assert "beethoven/opus18no1/movement3.mxl" in beethoven and "beethoven/opus18no1/movement3.krn" not in beethoven
    with pytest.raises(ParamsError, match=r"demo_corpus.sources: 'no_such_composer'"):
        dc.list_works(["no_such_composer"])


def test_work_order_is_seeded_and_takes_sources_in_turn():
    works = dc.list_works(["bach", "essenFolksong", "joplin"])
    order = dc.work_order(works, seed=0)
    assert order == dc.work_order(works, seed=0) != dc.work_order(works, seed=1)
    assert [w.path.split("/")[0] for w in order[:6]] == ["bach", "essenFolksong", "joplin", "bach", "essenFolksong",
                                                         "bach"]
    assert len(order) == len(set(order)) == sum(len(ws) for ws in works.values())


def test_arrange():
    params = make_params().demo_corpus
    work = dc.Work("bach/bwv66.6.mxl", None)
    a = dc.arrange(4, dc.piece_rng(0, work), params)
    assert a == dc.arrange(4, dc.piece_rng(0, work), params)  # same seed and work, same arrangement
    assert 60 <= a.bpm <= 150 and -4 <= a.transpose <= 4 and isinstance(a.bpm, int)
    assert len(set(a.instruments)) == 4 and set(a.instruments) <= set(INSTRUMENTS)
    assert len(a.pans) == 4 and min(a.pans) < 64 < max(a.pans) and all(0 <= p <= 127 for p in a.pans)
    assert len(dc.arrange(7, dc.piece_rng(0, work), params).instruments) == 7  # more parts than instruments
    mono = make_params(stereo=False).demo_corpus
    assert dc.arrange(4, dc.piece_rng(0, work), mono).pans == (64,) * 4
    arrangements = {dc.arrange(4, dc.piece_rng(seed, work), params) for seed in range(8)}
    assert len({a.pans for a in arrangements}) > 1 and len({a.bpm for a in arrangements}) > 1
