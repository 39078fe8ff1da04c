"""The demo corpus: real scores from music21's bundled corpus, arranged and rendered to audio.

The repository ships no audio, so the demo pipeline makes its own from public-domain music (Bach chorales,
Essen folk songs, Palestrina, string quartets, ...). Each chosen work gets a General MIDI instrument per
part, a tempo, a transposition and, in stereo, a pan position per part, all drawn from a generator seeded
by (seed, work): a work sounds the same whichever other works are chosen and in whatever order the
workers finish.

A work is named by its path in music21's corpus folder; a tune inside a multi-tune ABC file (the Essen and
O'Neill collections, ...) by `path#X`, X being its ABC reference number.

The MIDI is written from the score's notes by us, not by music21's exporter: that exporter fails on about
one piece in eight (StreamException) and writes grace notes as notes that never end. Here grace notes are
dropped, ties are merged, and every note gets a positive length, so every note-on has its note-off.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf

from presto.audio.io import peak_dbfs, to_mono
from presto.audio.midi_render import RenderError, render_midi, trim_trailing_silence
from presto.config import DemoCorpusParams
from presto.data.music import key_name, transpose_key
from presto.errors import ParamsError

RENDER_SAMPLE_RATE = 44100  # the corpus stands in for a 44.1 kHz licensed corpus; prepare resamples it
SCORE_SUFFIXES = (".mxl", ".musicxml", ".xml", ".krn", ".abc")  # preferred first when a work has several
# Parsing time grows with file size: 3-4 s at 40-60 KB, 18 s (+48 s merging ties) for a 370 KB quartet.
# Multi-tune ABC files are exempt: music21 reads only the tune asked for.
MAX_SCORE_BYTES = 64_000
MAX_PARTS = 15  # MIDI has 16 channels and channel 10 is percussion; one channel per part
DEFAULT_VELOCITY = 90  # most encodings carry dynamics marks, not note velocities
MIN_NOTE_SECONDS = 0.01  # a zero-length note may be written note-off first, i.e. a note that never ends
PEAK_LEVEL = 10.0 ** (-1.0 / 20.0)  # pieces are peak-normalised to -1 dBFS (prepare sets loudness later)
SILENT_DBFS = -80.0  # a render whose peak stays under this holds no music
TAIL_FLOOR_DB = -60.0  # trailing audio this far under the peak is cut ...
TAIL_KEEP_SECONDS = 0.5  # ... keeping this much of it
FADE_SECONDS = 0.5  # a piece cut at max_piece_seconds fades out instead of clicking
MONO_LOSS_LIMIT_DB = 4.5  # an instrument whose mono mix is this much quieter than its stereo is refused
METADATA_COLUMNS = ("path", "title", "composer", "instruments", "key", "bpm", "meter", "source", "license",
                    "duration_s")

# music21's encodings fill the composer field inconsistently ('J.S. Bach', None, or a madrigal's title), so
# folders that hold one composer's (or tradition's) works are named here; other folders use the score's field.
CORPUS_COMPOSERS = {
    "airdsairs": "traditional", "bach": "Johann Sebastian Bach", "beach": "Amy Beach",
    "beethoven": "Ludwig van Beethoven", "chopin": "Frédéric Chopin", "ciconia": "Johannes Ciconia",
    "corelli": "Arcangelo Corelli", "cpebach": "Carl Philipp Emanuel Bach", "essenfolksong": "traditional",
    "handel": "George Frideric Handel", "haydn": "Joseph Haydn", "johnson_j_r": "J. Rosamond Johnson",
    "joplin": "Scott Joplin", "josquin": "Josquin des Prez", "liliuokalani": "Liliʻuokalani",
    "lusitano": "Vicente Lusitano", "miscfolk": "traditional", "monteverdi": "Claudio Monteverdi",
    "mozart": "Wolfgang Amadeus Mozart", "nottingham-dataset": "traditional", "oneills1850": "traditional",
    "palestrina": "Giovanni Pierluigi da Palestrina", "ryansmammoth": "traditional",
    "schoenberg": "Arnold Schoenberg", "schubert": "Franz Schubert", "schumann_clara": "Clara Schumann",
    "schumann_robert": "Robert Schumann", "verdi": "Giuseppe Verdi", "weber": "Carl Maria von Weber",
    "webern": "Anton Webern",
}
# What is true of the rights (music21/corpus/license.txt and essenFolksong/license.txt): the works are out
# of copyright; the encodings are distributed with music21 by their encoders' permission, which may exclude
# commercial use, and the Essen encodings are licensed for non-commercial use only.
LICENSE_ESSEN = ("traditional tune (public domain); Essen Folksong Collection encoding distributed with music21 "
                 "for non-commercial use only")
LICENSE_CORPUS = ("public-domain composition; encoding from the music21 corpus, distributed by the encoder's "
                  "permission (commercial use may be restricted)")


class NoteEvent(NamedTuple):
    start: float  # quarter notes from the start of the part
    end: float
    pitch: int  # MIDI note number
    velocity: int


@dataclass(frozen=True)
class Work:
    path: str  # relative to music21's corpus folder, '/'-separated
    number: int | None  # ABC reference number of a tune in a multi-tune file

    @property
    def ref(self) -> str:
        return self.path if self.number is None else f"{self.path}#{self.number}"

    @property
    def audio_path(self) -> str:
        """Where its audio goes, relative to the corpus folder: one file per work, named after it."""
        stem = self.path.rsplit(".", 1)[0]
        return f"{stem}.flac" if self.number is None else f"{stem}-{self.number}.flac"


@dataclass(frozen=True)
class Arrangement:
    bpm: int  # quarter notes per minute, constant over the piece
    transpose: int  # semitones
    instruments: tuple[str, ...]  # a General MIDI name per part
    pans: tuple[int, ...]  # MIDI CC10 per part: 0 hard left, 64 centre, 127 hard right


@dataclass(frozen=True)
class PieceJob:
    work: Work
    seed: int
    params: DemoCorpusParams
    soundfont: str
    corpus_dir: str  # the FLAC goes to corpus_dir / work.audio_path


@dataclass(frozen=True)
class PieceResult:
    work: Work
    row: dict[str, Any] | None  # a metadata.csv row, or None when the work was skipped
    reason: str | None  # why it was skipped


@functools.cache
def _gm_programs() -> dict[str, int]:
    from pretty_midi.constants import INSTRUMENT_MAP  # the 128 General MIDI names, in program order

    return {re.sub(r"[^a-z0-9]+", "_", gm.lower()).strip("_"): i for i, gm in enumerate(INSTRUMENT_MAP)}


def gm_program(name: str) -> int:
    """General MIDI program number (0-based) of a snake_case instrument name: 'acoustic_guitar_nylon' -> 24."""
    programs = _gm_programs()
    if name not in programs:
        import difflib

        close = difflib.get_close_matches(name, list(programs), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; use General MIDI names in snake_case"
        raise ParamsError(f"params.yaml: demo_corpus.instruments: {name!r} is not a General MIDI instrument{hint}")
    return programs[name]


def check_params(params: DemoCorpusParams, soundfont: str | Path) -> None:
    """What pydantic cannot see: a tempo range holding a whole bpm, and instruments that exist in General
    MIDI and sound right in this soundfont (see `probe_instrument`)."""
    low, high = params.tempo_range
    if math.ceil(low) > math.floor(high):
        raise ParamsError(f"params.yaml: demo_corpus.tempo_range = {list(params.tempo_range)} holds no whole bpm")
    for name in params.instruments:
        gm_program(name)
    for name in params.instruments:
        probe_instrument(name, soundfont, params)


def probe_instrument(name: str, soundfont: str | Path, params: DemoCorpusParams) -> None:
    """Render three notes of one instrument, centred; refuse it if silent or if its channels cancel in mono.

    Some soundfont patches are pseudo-stereo with one channel phase-inverted (TimGM6mb's string_ensemble_1
    keeps 4% of its energy, -14 dB, once mixed to mono). prepare mixes the corpus to mono, where such an
    instrument would all but vanish; uncorrelated channels lose 3 dB, MONO_LOSS_LIMIT_DB allows a little more.
    """
    parts = [[NoteEvent(float(i), i + 1.0, pitch, DEFAULT_VELOCITY) for i, pitch in enumerate((48, 60, 72))]]
    with tempfile.TemporaryDirectory(prefix="presto-probe-") as tmp:
        midi = Path(tmp) / "probe.mid"
        write_midi(parts, Arrangement(bpm=120, transpose=0, instruments=(name,), pans=(64,)), 10.0, midi)
        try:
            left, right = render_midi(midi, soundfont, sample_rate=RENDER_SAMPLE_RATE,
                                      timeout_s=params.render_timeout_s, max_bytes=int(params.max_render_mb * 1e6))
        except RenderError as err:
            raise ParamsError(f"params.yaml: demo_corpus.instruments: {name!r} does not render: {err}") from None
    if peak_dbfs(np.stack([left, right])) < SILENT_DBFS:
        raise ParamsError(f"params.yaml: demo_corpus.instruments: {name!r} renders silence with soundfont "
                          f"{Path(soundfont).name} (the soundfont lacks it?)")
    stereo_energy = float(np.mean(left**2) + np.mean(right**2)) / 2
    mono_db = 10 * np.log10(max(float(np.mean(((left + right) / 2) ** 2)), 1e-20) / stereo_energy)
    if mono_db < -MONO_LOSS_LIMIT_DB:
        raise ParamsError(f"params.yaml: demo_corpus.instruments: {name!r} in soundfont {Path(soundfont).name} "
                          f"has stereo channels that cancel when mixed to mono ({mono_db:.1f} dB); "
                          "choose another instrument")


def corpus_root() -> Path:
    from music21 import common

    return Path(common.getCorpusFilePath())


def list_works(sources: list[str]) -> dict[str, list[Work]]:
    """Works of music21's corpus per source, sorted. A source is a corpus folder ('bach', 'essenFolksong',
    'opus18no1'), a path prefix ('beethoven/opus59no1') or one score without its suffix ('bach/bwv66.6').

    A work stored in several formats counts once; scores over MAX_SCORE_BYTES are left out.
    """
    root = corpus_root()
    scores = sorted((f.relative_to(root).as_posix() for f in root.rglob("*")
                     if f.suffix in SCORE_SUFFIXES and f.is_file()),
                    key=lambda rel: SCORE_SUFFIXES.index("." + rel.rsplit(".", 1)[1]))
    by_stem: dict[str, str] = {}
    for rel in scores:  # preferred formats first, so the first seen of a work is the one kept
        by_stem.setdefault(rel.rsplit(".", 1)[0], rel)
    works: dict[str, list[Work]] = {}
    for source in sources:
        term = source.strip("/").lower()
        matched = sorted(rel for stem, rel in by_stem.items()
                         if stem.lower() == term or rel.lower().startswith(term + "/")
                         or term in rel.lower().split("/")[:-1])
        found = [w for rel in matched for w in _works_in(root / rel, rel)]
        if not found:
            folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
            raise ParamsError(f"params.yaml: demo_corpus.sources: {source!r} matches no score of music21's corpus "
                              f"({root}); folders there: {', '.join(folders)}")
        works[source] = found
    return works


def _works_in(file: Path, rel: str) -> list[Work]:
    if file.suffix == ".abc":
        numbers = sorted({int(x) for x in re.findall(r"^X:\s*(\d+)", file.read_text(encoding="latin-1"), re.M)})
        if numbers:
            return [Work(rel, n) for n in numbers]
    return [Work(rel, None)] if file.stat().st_size <= MAX_SCORE_BYTES else []


def work_order(works: dict[str, list[Work]], seed: int) -> list[Work]:
    """All works in the order they are tried: each source shuffled, then taken in turn, one work from each.

    Taking sources in turn keeps the corpus varied: drawing from the pool would give mostly Essen tunes
    (8,500 of them against 400 Bach chorales).
    """
    rng = np.random.default_rng(seed)
    queues = [[ws[i] for i in rng.permutation(len(ws))] for ws in works.values()]
    order: dict[Work, None] = {}  # a work named by two sources is tried once
    for turn in itertools.zip_longest(*queues):
        order.update((w, None) for w in turn if w is not None)
    return list(order)


def piece_rng(seed: int, work: Work) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{work.ref}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def arrange(n_parts: int, rng: np.random.Generator, params: DemoCorpusParams) -> Arrangement:
    """Tempo, transposition, an instrument per part (all different while the list lasts), pan per part."""
    bpm = int(rng.integers(math.ceil(params.tempo_range[0]), math.floor(params.tempo_range[1]) + 1))
    transpose = int(rng.integers(params.transpose_range[0], params.transpose_range[1] + 1))
    picks = rng.choice(len(params.instruments), size=n_parts, replace=n_parts > len(params.instruments))
    instruments = tuple(params.instruments[i] for i in picks)
    pans = stereo_pans(n_parts, rng) if params.stereo else (64,) * n_parts
    return Arrangement(bpm, transpose, instruments, pans)


def stereo_pans(n_parts: int, rng: np.random.Generator) -> tuple[int, ...]:
    """Parts spread evenly over a stereo width drawn per piece, in shuffled order so that no voice (the
    bass, say) always sits on the same side; a single part sits somewhere between left and right."""
    if n_parts == 1:
        positions = rng.uniform(-0.6, 0.6, size=1)
    else:
        width = rng.uniform(0.4, 1.0)
        positions = rng.permutation(np.linspace(-width, width, n_parts))
    return tuple(int(round(64 + 63 * x)) for x in positions)


def part_notes(part: Any) -> list[NoteEvent]:
    """The pitched notes of a music21 part in quarter notes: grace notes dropped, tied notes merged."""
    from music21 import note

    events: list[NoteEvent] = []
    tied: dict[int, int] = {}  # MIDI pitch -> index in `events` of the note its tie continues
    for element in part.flatten().notes:
        if element.duration.isGrace:
            continue
        start = float(element.offset)
        end = start + float(element.duration.quarterLength)
        if end <= start:
            continue
        members = element.notes if element.isChord else (element,)
        for member in members:
            if not isinstance(member, note.Note):
                continue  # unpitched percussion
            pitch = member.pitch.midi
            tie = member.tie or element.tie
            if tie is not None and tie.type in ("continue", "stop") and pitch in tied:
                i = tied[pitch]
                events[i] = events[i]._replace(end=max(events[i].end, end))
                if tie.type == "stop":
                    del tied[pitch]
                continue
            velocity = member.volume.velocity or element.volume.velocity or DEFAULT_VELOCITY
            events.append(NoteEvent(start, end, pitch, int(velocity)))
            if tie is not None and tie.type == "start":
                tied[pitch] = len(events) - 1
    return events


def write_midi(parts: list[list[NoteEvent]], arrangement: Arrangement, max_seconds: float,
               path: str | Path) -> list[int]:
    """Write the arranged parts as a MIDI file; returns the indices of the parts heard in it.

    Time runs at a constant `bpm` from the first note on (leading rests are dropped); notes starting at or
    after `max_seconds` are left out and notes still sounding then are cut there.
    """
    import pretty_midi

    seconds_per_quarter = 60.0 / arrangement.bpm
    first = min(n.start for notes in parts for n in notes)
    midi = pretty_midi.PrettyMIDI(initial_tempo=float(arrangement.bpm))
    heard = []
    for index, (notes, name, pan) in enumerate(zip(parts, arrangement.instruments, arrangement.pans, strict=True)):
        track = pretty_midi.Instrument(program=gm_program(name), name=name)
        track.control_changes.append(pretty_midi.ControlChange(number=10, value=pan, time=0.0))
        for n in notes:
            start = (n.start - first) * seconds_per_quarter
            end = min((n.end - first) * seconds_per_quarter, max_seconds)
            pitch = n.pitch + arrangement.transpose
            if start >= max_seconds or end - start < MIN_NOTE_SECONDS or not 0 <= pitch <= 127:
                continue
            track.notes.append(pretty_midi.Note(velocity=min(n.velocity, 127), pitch=pitch, start=start, end=end))
        if track.notes:
            heard.append(index)
            midi.instruments.append(track)
    midi.write(str(path))
    return heard


def describe(score: Any, work: Work) -> dict[str, str]:
    """Title, composer, meter and license of a parsed score, from its metadata where that is usable."""
    metadata = score.metadata
    file_name = work.path.rsplit("/", 1)[-1]
    names = [s.strip(' "') for s in (metadata.title, metadata.movementName) if s and s.strip() != file_name]
    # Without a usable title, the work's path below its composer folder: 'opus59no1 movement2'.
    title = ": ".join(dict.fromkeys(names)) or work.audio_path.rsplit(".", 1)[0].split("/", 1)[-1].replace("/", " ")
    folder = work.path.split("/", 1)[0].lower()
    composer = CORPUS_COMPOSERS.get(folder) or metadata.composer or "unknown"
    meter = score.recurse().getElementsByClass("TimeSignature").first()
    license_note = LICENSE_ESSEN if folder == "essenfolksong" else LICENSE_CORPUS
    if metadata.copyright and str(metadata.copyright).strip():
        license_note += f"; encoding {str(metadata.copyright).strip()}"
    return {"title": title, "composer": composer, "meter": meter.ratioString if meter is not None else "",
            "license": license_note}


def render_piece(job: PieceJob) -> PieceResult:
    """Parse, arrange, render and store one work; a work that cannot be used comes back with the reason."""
    from music21 import corpus

    def skip(reason: str) -> PieceResult:
        return PieceResult(job.work, None, reason)

    params = job.params
    try:
        # forceSource: never read or write music21's pickle cache in the shared scratch folder.
        score = corpus.parse(job.work.path, number=job.work.number, forceSource=True)
        score.toSoundingPitch(inPlace=True)  # transposing instruments, ottava lines
        parts = [notes for notes in (part_notes(p) for p in (list(score.parts) or [score])) if notes]
        if not parts:
            return skip("no pitched notes")
        key = score.analyze("key")  # Krumhansl-Schmuckler; encodings often give a key signature without a mode
        about = describe(score, job.work)
    except Exception as err:  # music21 raises many exception types on encodings it cannot read
        return skip(f"score not readable: {type(err).__name__}: {err}")
    if len(parts) > MAX_PARTS:
        return skip(f"{len(parts)} parts, more than the {MAX_PARTS} MIDI channels for melodic instruments")

    arrangement = arrange(len(parts), piece_rng(job.seed, job.work), params)
    with tempfile.TemporaryDirectory(prefix="presto-piece-") as tmp:
        midi = Path(tmp) / "piece.mid"
        heard = write_midi(parts, arrangement, params.max_piece_seconds, midi)
        if not heard:
            return skip("no notes left after arranging")
        try:
            audio = render_midi(midi, job.soundfont, sample_rate=RENDER_SAMPLE_RATE,
                                timeout_s=params.render_timeout_s, max_bytes=int(params.max_render_mb * 1e6))
        except RenderError as err:
            return skip(f"render failed: {err}")
    if peak_dbfs(audio) < SILENT_DBFS:
        return skip(f"silent render (peak {peak_dbfs(audio):.0f} dBFS)")
    audio = finish_audio(audio, stereo=params.stereo, max_seconds=params.max_piece_seconds)

    out = Path(job.corpus_dir) / job.work.audio_path
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), audio.T, RENDER_SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    row = {
        "path": job.work.audio_path,
        "title": about["title"],
        "composer": about["composer"],
        "instruments": ";".join(dict.fromkeys(arrangement.instruments[i] for i in heard)),
        "key": transpose_key(key_name(key.tonic.pitchClass, key.mode), arrangement.transpose),
        "bpm": arrangement.bpm,
        "meter": about["meter"],
        "source": job.work.ref,
        "license": about["license"],
        "duration_s": round(audio.shape[-1] / RENDER_SAMPLE_RATE, 3),
    }
    return PieceResult(job.work, row, None)


def finish_audio(audio: np.ndarray, *, stereo: bool, max_seconds: float) -> np.ndarray:
    """[2, n] synthesiser output -> [channels, n] ready to store: mono if asked, peak-normalised, silent tail
    trimmed, cut at `max_seconds` with a fade-out."""
    if not stereo:
        audio = to_mono(audio)[None]
    audio = audio * (PEAK_LEVEL / np.abs(audio).max())
    audio = trim_trailing_silence(audio, RENDER_SAMPLE_RATE, floor_db=TAIL_FLOOR_DB, keep_seconds=TAIL_KEEP_SECONDS)
    limit = int(max_seconds * RENDER_SAMPLE_RATE)
    if audio.shape[-1] > limit:
        audio = audio[..., :limit].copy()
        fade = min(limit, int(FADE_SECONDS * RENDER_SAMPLE_RATE))
        audio[..., limit - fade:] *= np.linspace(1.0, 0.0, fade, dtype=audio.dtype)
    return audio


def write_metadata(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """metadata.csv, one row per audio file, sorted by path (what prepare reads)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["path"]))


def write_skipped(path: str | Path, results: list[PieceResult]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({"source": r.work.ref, "reason": r.reason}, ensure_ascii=False) + "\n")
