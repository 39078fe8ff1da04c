"""From a folder of music files to clips: what the prepare stage does, one file or one decision at a time.

The pieces, in the order the stage uses them:
- `scan_corpus` lists the audio files, never following a path out of the corpus folder;
- `read_metadata` reads the optional CSV/JSONL, checking every row's path and every value;
- `decode_file` (run on Ray workers) streams one file, cuts clips, drops silent ones, normalises loudness
  and fingerprints the recording;
- `group_duplicates` finds copies of one recording (other name, format or sample rate) by fingerprint;
- `assign_splits` splits by recording, so no copy of a training track is ever in val or test.
Everything a user could get wrong lands in a `Reject` with its reason; nothing here stops the corpus.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from presto.audio.io import AudioInfo, loudness_gain_db, peak_dbfs, probe, rms_dbfs, stream, to_mono
from presto.config import Params
from presto.data.music import key_name, parse_key
from presto.data.shards import to_int16
from presto.errors import InputError

AUDIO_EXTENSIONS = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".aifc"})

# Manifest fields that prepare itself writes; a metadata column of the same name would silently
# overwrite them, so such a column is rejected instead.
RESERVED_FIELDS = frozenset({
    "clip_id", "track_id", "path", "split", "shard", "index", "start_s", "seconds", "sample_rate",
    "track_seconds", "gain_db", "source_sample_rate", "source_channels", "stereo_shard", "stereo_index",
    "duplicate_of", "parent_clip_id", "augmentation",
})


@dataclass(frozen=True)
class Reject:
    """One line of the rejects report. kind: "file" (audio not used), "row" (metadata row not used),
    "value" (one metadata value not used; the audio is kept), "column" (a metadata column not used),
    "ignored" (not an audio file)."""

    kind: str
    path: str
    reason: str
    field: str | None = None
    value: Any = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# ---------------------------------------------------------------------------------------------------
# The corpus folder


@dataclass
class CorpusScan:
    audio: list[str]  # paths relative to the corpus folder, posix, sorted
    rejects: list[Reject]  # kind "file" (symlinks out of the corpus) and "ignored"


def _inside(real_root: str, real_path: str) -> bool:
    return real_path == real_root or real_path.startswith(real_root.rstrip(os.sep) + os.sep)


def scan_corpus(corpus: Path, metadata: str | None) -> CorpusScan:
    """Every audio file under `corpus` (by extension). Symlinks are followed only when they stay inside
    the folder; symlinked sub-folders are not walked (they would list files twice or leave the corpus)."""
    real_root = os.path.realpath(corpus)
    meta = PurePosixPath(metadata).as_posix() if metadata else None
    audio: list[str] = []
    rejects: list[Reject] = []
    for folder, dirs, files in os.walk(corpus, followlinks=False):
        dirs.sort()
        for d in dirs:
            full = os.path.join(folder, d)
            if os.path.islink(full):
                rel = Path(full).relative_to(corpus).as_posix()
                rejects.append(Reject("ignored", rel, f"symlinked folder not followed (-> {os.readlink(full)})"))
        for name in sorted(files):
            full = os.path.join(folder, name)
            rel = Path(full).relative_to(corpus).as_posix()
            if rel == meta:
                continue
            if Path(name).suffix.lower() not in AUDIO_EXTENSIONS:
                rejects.append(Reject("ignored", rel, "not an audio file extension "
                                      f"({', '.join(sorted(AUDIO_EXTENSIONS))})"))
                continue
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not _inside(real_root, target):
                    rejects.append(Reject("file", rel, "symlink points outside the corpus folder; not read"))
                    continue
                if not os.path.exists(target):
                    rejects.append(Reject("file", rel, "broken symlink"))
                    continue
            if not os.path.isfile(full):  # opening a named pipe would block the stage forever
                rejects.append(Reject("file", rel, "not a regular file (a pipe, socket or device); not read"))
                continue
            audio.append(rel)
    return CorpusScan(sorted(audio), rejects)


def corpus_relpath(corpus: Path, raw: str) -> str:
    """A metadata path, checked and normalised to the posix path relative to `corpus` the scan uses.
    ValueError (the reason) for absolute paths and paths that leave the folder, by `..` or by symlink."""
    text = raw.strip()
    if not text:
        raise ValueError("empty path")
    if text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
        raise ValueError("absolute path; paths must be relative to the corpus folder")
    norm = os.path.normpath(text)
    if norm == ".." or norm.startswith(".." + os.sep):
        raise ValueError("path leaves the corpus folder")
    if not _inside(os.path.realpath(corpus), os.path.realpath(corpus / norm)):
        raise ValueError("path resolves outside the corpus folder (symlink)")
    return PurePosixPath(norm).as_posix()


# ---------------------------------------------------------------------------------------------------
# Metadata


def _metadata_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row or None, what is wrong with the line or None)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "path" not in [n.strip().lower() for n in reader.fieldnames]:
                    raise InputError(f"{path}: metadata CSV has no 'path' column (columns: {reader.fieldnames})")
                for row in reader:
                    if None in row:
                        yield reader.line_num, None, (f"{len(reader.fieldnames) + len(row[None])} cells, "
                                                      f"the header has {len(reader.fieldnames)}")
                    else:
                        yield reader.line_num, row, None
        elif suffix in (".jsonl", ".ndjson", ".json"):
            with open(path, encoding="utf-8-sig") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        yield line_no, None, f"not valid JSON: {err.msg}"
                        continue
                    if isinstance(row, dict):
                        yield line_no, row, None
                    else:
                        yield line_no, None, f"a JSON {type(row).__name__}, expected an object"
        else:
            raise InputError(f"{path}: prepare.metadata must be a .csv or .jsonl file")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: metadata is not UTF-8 text ({err.reason} at byte {err.start})") from None


def clean_value(name: str, value: Any) -> Any:
    """One metadata value in the manifest's form; ValueError (the reason) when it cannot be true."""
    if name == "bpm":
        try:
            bpm = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError):
            bpm = float("nan")
        if not (np.isfinite(bpm) and bpm > 0):
            raise ValueError("bpm must be a positive number")
        return bpm
    if name == "key":
        if not isinstance(value, str):
            raise ValueError("key must be a name such as 'D minor'")
        pc, mode = parse_key(value)  # ValueError: not a key name
        return key_name(pc, mode)
    if name == "meter":
        m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", str(value))
        if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            raise ValueError("meter must look like '3/4'")
        return f"{int(m.group(1))}/{int(m.group(2))}"
    if name == "instruments":
        items = re.split(r"[;,|]", value) if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("instruments must be a list of names (or one string split by ';')")
        return [i.strip() for i in items if i.strip()]
    return value.strip() if isinstance(value, str) else value


def unusable_column(name: str) -> str | None:
    """Why a metadata column cannot be used (None if it can)."""
    if not name:
        return "unnamed column"
    if name in RESERVED_FIELDS and name != "path":
        return "a manifest field that prepare writes itself"
    return None


def clean_metadata(row: dict[str, Any], path: str, line: int) -> tuple[dict[str, Any], list[Reject]]:
    """The usable fields of one metadata row, and a "value" reject for each value that is not.
    Unusable columns (`unusable_column`) are left out here and reported once per column by read_metadata."""
    fields: dict[str, Any] = {}
    rejects: list[Reject] = []
    for raw_name, value in row.items():
        name = str(raw_name).strip().lower()
        empty = value is None or (isinstance(value, str) and not value.strip())
        if name == "path" or unusable_column(name) or empty:
            continue
        try:
            fields[name] = clean_value(name, value)
        except ValueError as err:
            rejects.append(Reject("value", path, str(err), field=name, value=value, line=line))
    return fields, rejects


def read_metadata(corpus: Path, name: str, audio: list[str]) -> tuple[dict[str, dict[str, Any]], list[Reject]]:
    """Rows of the metadata file keyed by corpus-relative path, and the rejects (rows and values)."""
    path = corpus / name
    if not path.is_file():
        raise InputError(f"prepare.metadata = {name!r}: file not found in the corpus folder ({corpus})")
    known = set(audio)
    first_line: dict[str, int] = {}
    bad_columns: dict[str, int] = {}  # column -> first line it has a value on
    table: dict[str, dict[str, Any]] = {}
    rejects: list[Reject] = []
    for line, row, problem in _metadata_rows(path):
        if row is None:
            rejects.append(Reject("row", name, str(problem), line=line))
            continue
        row = {str(k).strip().lower(): v for k, v in row.items()}
        for column, value in row.items():
            if unusable_column(column) and value not in (None, "") and column not in bad_columns:
                bad_columns[column] = line
        raw = row.get("path")
        if not isinstance(raw, str):
            rejects.append(Reject("row", name, "row has no path", line=line))
            continue
        try:
            rel = corpus_relpath(corpus, raw)
        except ValueError as err:
            rejects.append(Reject("row", raw, f"{err}; not read", line=line))
            continue
        if rel not in known:
            reason = ("points to a missing file" if not os.path.lexists(corpus / rel)
                      else "points to a file the scan does not list (not audio, or under a symlinked folder)")
            rejects.append(Reject("row", raw, reason, line=line))
            continue
        if rel in first_line:
            rejects.append(Reject("row", raw, f"second row for this file (the first is line {first_line[rel]})",
                                  line=line))
            continue
        first_line[rel] = line
        table[rel], bad = clean_metadata(row, rel, line)
        rejects.extend(bad)
    for column, line in bad_columns.items():
        rejects.append(Reject("column", name, f"{unusable_column(column)}; the column is not used",
                              field=column, line=line))
    return table, rejects


# ---------------------------------------------------------------------------------------------------
# Cutting clips


@dataclass(frozen=True)
class Clip:
    start: int  # first sample in the file, at the target rate
    audio: np.ndarray  # [channels, clip_samples]; past `content` it is padding (silence)
    content: int  # samples of real audio


class ClipCutter:
    """Cuts a stream of [channels, n] blocks into clips of `clip` samples every `hop` samples.

    A clip that would run past the end is kept, padded with silence, only if at least half of it is
    audio, and only the first such one (later ones would be mostly copies of it when hop < clip).
    """

    def __init__(self, clip: int, hop: int):
        if clip <= 0 or hop <= 0:
            raise ValueError(f"clip ({clip}) and hop ({hop}) must be positive sample counts")
        self.clip, self.hop = clip, hop
        self._buf: np.ndarray | None = None
        self._buf_start = 0  # file position of _buf[:, 0]
        self._next = 0  # file position of the next clip

    def push(self, block: np.ndarray) -> list[Clip]:
        self._buf = block if self._buf is None else np.concatenate([self._buf, block], axis=1)
        clips = []
        while self._next + self.clip <= self._buf_start + self._buf.shape[1]:
            i = self._next - self._buf_start
            clips.append(Clip(self._next, self._buf[:, i:i + self.clip].copy(), self.clip))
            self._next += self.hop
        drop = min(self._next - self._buf_start, self._buf.shape[1])  # samples no clip will use again
        self._buf = self._buf[:, drop:]
        self._buf_start += drop
        return clips

    def finish(self) -> list[Clip]:
        if self._buf is None:
            return []
        i = self._next - self._buf_start
        content = self._buf.shape[1] - i
        if content <= 0 or 2 * content < self.clip:
            return []
        audio = np.zeros((self._buf.shape[0], self.clip), dtype=np.float32)
        audio[:, :content] = self._buf[:, i:]
        return [Clip(self._next, audio, content)]


# ---------------------------------------------------------------------------------------------------
# Fingerprints: is this file a copy of another?


class BandEnvelope:
    """A coarse fingerprint of a recording: the energy in a few log-spaced bands, 10 times a second, in dB,
    over its first minute.

    It survives what copies of one recording differ by: codecs (bands are wide), sample rate (bands stop
    at 3 kHz, under the Nyquist frequency of any rate we accept), gain (compared up to an offset) and the
    few milliseconds of encoder delay (frames are 100 ms). A minute tells recordings apart; whole tracks
    would cost the driver gigabytes on a corpus of thousands of hours.
    """

    FRAME_SECONDS = 0.1
    MAX_FRAMES = 600  # one minute
    BANDS = 8
    LOW_HZ, HIGH_HZ = 60.0, 3000.0
    FLOOR_DB = 60.0  # quieter than the loudest band-frame by more than this counts as silence

    def __init__(self, sample_rate: int):
        self.frame = int(round(self.FRAME_SECONDS * sample_rate))
        self.window = np.hanning(self.frame).astype(np.float32)
        freqs = np.fft.rfftfreq(self.frame, 1.0 / sample_rate)
        edges = np.geomspace(self.LOW_HZ, self.HIGH_HZ, self.BANDS + 1)
        # [freq bins, bands] 0/1 matrix: band energy = power spectrum @ membership.
        self.membership = ((freqs[:, None] >= edges[None, :-1]) & (freqs[:, None] < edges[None, 1:])).astype(
            np.float32)
        self._rest = np.zeros(0, dtype=np.float32)
        self._frames: list[np.ndarray] = []
        self._count = 0

    def push(self, mono: np.ndarray) -> None:
        if self._count >= self.MAX_FRAMES:
            return
        x = np.concatenate([self._rest, mono])
        n = min(len(x) // self.frame, self.MAX_FRAMES - self._count)
        if n:
            frames = x[: n * self.frame].reshape(n, self.frame) * self.window
            power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
            self._frames.append((power @ self.membership).astype(np.float32))
            self._count += n
        self._rest = x[n * self.frame:]

    def result(self) -> np.ndarray:
        """[frames, bands] band levels in dB, floored FLOOR_DB under the loudest (float16: 0.1 dB steps are
        plenty against a tolerance of a dB or more, and halve the driver's memory)."""
        energy = np.concatenate(self._frames) if self._frames else np.zeros((0, self.BANDS), np.float32)
        db = 10.0 * np.log10(energy + 1e-20)
        return (np.maximum(db, db.max() - self.FLOOR_DB) if db.size else db).astype(np.float16)


def fingerprint_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in dB of two band envelopes over their common frames, after removing
    the median offset (a copy at another gain is still a copy)."""
    n = min(len(a), len(b))
    if n == 0:
        return float("inf")
    d = a[:n].astype(np.float32) - b[:n].astype(np.float32)
    return float(np.mean(np.abs(d - np.median(d))))


def group_duplicates(fingerprints: dict[str, np.ndarray], seconds: dict[str, float],
                     tolerance_db: float) -> dict[str, str]:
    """Map every path to the first path (sorted) of its group of copies; a path without copies maps to itself.

    Copies have the same length, so only files whose `seconds` agree within 1 % (or 0.2 s, for codec
    padding) are compared: the cost is the number of such pairs, not all pairs.
    """
    paths = sorted(fingerprints, key=lambda p: (seconds[p], p))
    parent = {p: p for p in paths}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for i, a in enumerate(paths):
        for j in range(i + 1, len(paths)):
            b = paths[j]
            if seconds[b] - seconds[a] > max(0.2, 0.01 * seconds[b]):
                break
            if fingerprint_distance(fingerprints[a], fingerprints[b]) <= tolerance_db:
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)
    return {p: root(p) for p in sorted(paths)}


# ---------------------------------------------------------------------------------------------------
# Decoding one file (a Ray task)


@dataclass(frozen=True)
class DecodeSettings:
    sample_rate: int
    clip_seconds: float
    hop_seconds: float
    min_seconds: float
    max_file_seconds: float
    silence_dbfs: float
    loudness_dbfs: float
    peak_dbfs: float
    keep_stereo: bool

    @classmethod
    def from_params(cls, params: Params) -> "DecodeSettings":
        p = params.prepare
        return cls(params.shared.sample_rate, params.shared.clip_seconds, p.hop_seconds, p.min_seconds,
                   p.max_file_seconds, p.silence_dbfs, p.loudness_dbfs, p.peak_dbfs, p.keep_stereo)

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop_seconds * self.sample_rate))


def check_duration(seconds: float, settings: DecodeSettings) -> None:
    if seconds < settings.min_seconds:
        raise InputError(f"too short: {seconds:.2f} s < prepare.min_seconds = {settings.min_seconds:g}")
    if seconds > settings.max_file_seconds:
        raise InputError(f"too long: {seconds:.1f} s > prepare.max_file_seconds = {settings.max_file_seconds:g}")


def inspect_file(path: str | Path, settings: DecodeSettings) -> AudioInfo:
    """Header checks before any decoding: readable, audio, not truncated, of a usable length."""
    info = probe(path)
    try:
        check_duration(info.seconds, settings)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return info


@dataclass(frozen=True)
class DecodeJob:
    path: str  # absolute
    relpath: str  # relative to the corpus folder: the file's name in the manifest and the rejects
    settings: DecodeSettings


@dataclass
class DecodedFile:
    relpath: str
    reason: str | None = None  # why the file is rejected; None when it gave clips
    source_sample_rate: int = 0
    source_channels: int = 0
    seconds: float = 0.0  # decoded length at the target rate
    mono: np.ndarray | None = None  # int16 [clips, samples]
    stereo: np.ndarray | None = None  # int16 [clips, 2, samples], stereo sources with keep_stereo only
    starts: list[int] = field(default_factory=list)  # samples
    contents: list[int] = field(default_factory=list)  # samples of real audio per clip
    gains_db: list[float] = field(default_factory=list)
    silent_clips: int = 0
    fingerprint: np.ndarray | None = None


def decode_file(job: DecodeJob) -> DecodedFile:
    """Stream one file into loudness-normalised clips (int16, to keep what travels back from Ray small)."""
    s = job.settings
    try:
        info = inspect_file(job.path, s)
        stereo = s.keep_stereo and info.channels == 2
        cutter = ClipCutter(s.clip_samples, s.hop_samples)
        envelope = BandEnvelope(s.sample_rate)
        out = DecodedFile(job.relpath, source_sample_rate=info.sample_rate, source_channels=info.channels)
        mono_clips: list[np.ndarray] = []
        stereo_clips: list[np.ndarray] = []
        decoded = 0

        def keep(clip: Clip) -> None:
            # Rows of clip.audio: [mono] or [mono, left, right]; one gain for all keeps them consistent,
            # and the peak over all rows keeps the stereo clip under the ceiling too.
            content = clip.audio[:, :clip.content]
            level = rms_dbfs(content[0])
            if level < s.silence_dbfs:
                out.silent_clips += 1
                return
            gain_db = loudness_gain_db(level, peak_dbfs(content), s.loudness_dbfs, s.peak_dbfs)
            scaled = clip.audio * np.float32(10.0 ** (gain_db / 20.0))
            mono_clips.append(to_int16(scaled[0]))
            if stereo:
                stereo_clips.append(to_int16(scaled[1:]))
            out.starts.append(clip.start)
            out.contents.append(clip.content)
            out.gains_db.append(round(gain_db, 3))

        for block in stream(job.path, s.sample_rate, mono=not stereo):
            mono = to_mono(block) if stereo else block[0]
            decoded += len(mono)
            if decoded > s.max_file_seconds * s.sample_rate:  # the header under-stated the length
                raise InputError(f"too long: over prepare.max_file_seconds = {s.max_file_seconds:g} s once decoded")
            envelope.push(mono)
            for clip in cutter.push(np.concatenate([mono[None], block]) if stereo else block):
                keep(clip)
        for clip in cutter.finish():
            keep(clip)
        out.seconds = decoded / s.sample_rate
        check_duration(out.seconds, s)  # the header may over-state it
        if not out.starts and not out.silent_clips:
            raise InputError(f"no clip: {out.seconds:.2f} s is under half a clip ({s.clip_seconds / 2:g} s)")
        if not out.starts:
            raise InputError(f"silent: all {out.silent_clips} clips are below prepare.silence_dbfs = "
                             f"{s.silence_dbfs:g} dBFS")
        out.mono = np.stack(mono_clips)
        out.stereo = np.stack(stereo_clips) if stereo else None
        out.fingerprint = envelope.result()
        return out
    except InputError as err:
        return DecodedFile(job.relpath, reason=str(err).removeprefix(f"{job.path}: "))
    except Exception as err:  # noqa: BLE001 - one hostile file must not stop a corpus of thousands
        return DecodedFile(job.relpath, reason=f"could not decode: {type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------------------------
# Splits


def assign_splits(group_seconds: dict[str, float], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, str]:
    """Split groups (recordings) into train/val/test by duration, deterministically in `seed`.

    Groups are visited in the order of a seeded hash of their name (so the result does not depend on
    the order files were listed), and a group joins val (then test) while that brings the split's
    duration closer to its share; an empty split with a non-zero share always takes its first group.
    Train always gets at least one group.
    """
    order = sorted(group_seconds, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    total = sum(group_seconds.values())
    targets = {"val": val_fraction * total, "test": test_fraction * total}
    seconds = {"train": 0.0, "val": 0.0, "test": 0.0}
    splits: dict[str, str] = {}
    for i, group in enumerate(order):
        s = group_seconds[group]
        split = "train"
        if not (i == len(order) - 1 and seconds["train"] == 0):
            for name in ("val", "test"):
                if targets[name] > 0 and (seconds[name] == 0 or seconds[name] + s / 2 <= targets[name]):
                    split = name
                    break
        splits[group] = split
        seconds[split] += s
    return splits


def track_id(relpath: str) -> str:
    """A stable id for a file: the same path gives the same id on every run and machine."""
    return hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# The rejects report


def format_rejects(rejects: list[Reject]) -> str:
    """The human-readable rejects.txt: one section per kind, one line per reject."""
    titles = {
        "file": "Audio files not used",
        "row": "Metadata rows not used",
        "value": "Metadata values not used (the audio is kept)",
        "column": "Metadata columns not used",
        "ignored": "Files ignored (not audio)",
    }
    lines = ["prepare rejects: " + ", ".join(f"{sum(r.kind == k for r in rejects)} {k}" for k in titles)]
    for kind, title in titles.items():
        group = [r for r in rejects if r.kind == kind]
        if not group:
            continue
        lines += ["", f"{title} ({len(group)})"]
        for r in sorted(group, key=lambda r: (r.path, r.line or 0)):
            where = r.path + (f" line {r.line}" if r.line is not None else "")
            what = "" if r.field is None else f" {r.field}:" if r.value is None else f" {r.field}={r.value!r}:"
            lines.append(f"  {where}:{what} {r.reason}")
    return "\n".join(lines) + "\n"
