"""Pitch shift and time stretch of training clips with sox, keeping the labels true.

A shift of k semitones transposes the key by k; a time stretch by rate r (r > 1: faster) multiplies the
tempo by r. sox (through pysox) does both with WSOLA: `pitch` keeps the duration, `tempo` keeps the pitch.

Time stretch changes the length, and a clip must keep its length. Our choice: a slow-down (r < 1) yields
more audio than the clip holds, so it is cropped to the clip's start; a speed-up (r > 1) needs r times the
clip's audio, so it reads on into the clip that follows in the same track when there is one (so no
silence is made up), and otherwise pads the end with silence, as prepare pads a track's last clip. With
r <= 2 at least half of such a clip is audio, prepare's rule for padded clips.
"""

from __future__ import annotations

import logging
import math
import resource
from dataclasses import dataclass
from typing import Any

import numpy as np
import sox

from presto.data.music import transpose_key
from presto.data.shards import ShardReader, to_int16

# pysox warns on every `tempo` call with |r - 1| <= 0.1 that its `stretch` effect would be faster; we keep
# `tempo` (better quality at these rates) and do not want one warning per clip in the logs.
logging.getLogger("sox").setLevel(logging.ERROR)

# sox works in 32-bit integers and clips at full scale, and WSOLA's cross-fades can overshoot a peak a
# little: halving on the way in and doubling on the way out (exact in float) leaves 6 dB of headroom.
_HEADROOM = np.float32(0.5)

# sox's tempo effect works on ~82 ms segments for music; audio past the crop point keeps the end of the
# kept part free of the edge effect at the end of the input.
MARGIN_SECONDS = 0.1


def _sox(tfm: sox.Transformer, audio: np.ndarray, sample_rate: int) -> np.ndarray:
    x = np.ascontiguousarray(audio, dtype=np.float32) * _HEADROOM
    return tfm.build_array(input_array=x, sample_rate_in=sample_rate).astype(np.float32) / _HEADROOM


def pitch_shift(audio: np.ndarray, sample_rate: int, semitones: float) -> np.ndarray:
    """Shift mono audio [n] by `semitones` keeping its duration; the result has exactly n samples."""
    tfm = sox.Transformer()
    tfm.pitch(float(semitones))
    return _fit(_sox(tfm, audio, sample_rate), len(audio))


def time_stretch(audio: np.ndarray, sample_rate: int, rate: float) -> np.ndarray:
    """Play mono audio [n] `rate` times faster keeping its pitch: about n / rate samples."""
    tfm = sox.Transformer()
    tfm.tempo(float(rate), audio_type="m")
    return _sox(tfm, audio, sample_rate)


def _fit(audio: np.ndarray, n: int) -> np.ndarray:
    """Crop or zero-pad to n samples."""
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(audio))] = audio[:n]
    return out


def stretch_clip(audio: np.ndarray, content: int, continuation: np.ndarray | None, sample_rate: int,
                 rate: float) -> tuple[np.ndarray, int]:
    """A clip time-stretched by `rate` at its own length, and how many of its samples are audio.

    `audio` is the clip ([n], its first `content` samples real), `continuation` the audio that follows it
    in the track (None at a track's end). See the module docstring for why this is the fill.
    """
    n = len(audio)
    needed = math.ceil(n * rate) + int(MARGIN_SECONDS * sample_rate)
    source = audio[: min(content, needed)]
    if continuation is not None and needed > content:
        source = np.concatenate([source, continuation[: needed - content]])
    stretched = time_stretch(source, sample_rate, rate)
    return _fit(stretched, n), min(n, len(stretched))


@dataclass(frozen=True)
class Follower:
    """The clip that continues a clip in its track: its row and where, in its samples, the continuation starts."""

    row: dict[str, Any]
    offset: int


def following_clips(rows: list[dict[str, Any]]) -> dict[str, Follower]:
    """For each clip whose track goes on in another clip, that clip (and the offset into it).

    A clip ends at start + seconds; the follower is the clip of the same track that holds audio at that
    instant (with hop == clip, the next one at offset 0; with hop < clip, an overlapping one). A gap
    (a silent clip dropped by prepare, hop > clip) means no follower: the continuation is not there.
    """
    by_track: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_track.setdefault(row["track_id"], []).append(row)
    followers: dict[str, Follower] = {}
    for clips in by_track.values():
        clips.sort(key=lambda r: r["start_s"])
        for i, row in enumerate(clips):
            sr = row["sample_rate"]
            end = round(row["start_s"] * sr) + round(row["seconds"] * sr)
            for later in clips[i + 1:]:
                start = round(later["start_s"] * sr)
                if start > end:
                    break
                if end < start + round(later["seconds"] * sr):
                    followers[row["clip_id"]] = Follower(later, end - start)
                    break
    return followers


def augmented_row(parent: dict[str, Any], augmentation: dict[str, float], seconds: float) -> dict[str, Any]:
    """The manifest row of an augmented clip: the parent's, with true labels and no shard yet.

    Stereo references are dropped: the stereo clips are not augmented.
    """
    row = {k: v for k, v in parent.items() if k not in ("shard", "index", "stereo_shard", "stereo_index")}
    row.update(parent_clip_id=parent["clip_id"], augmentation=augmentation, seconds=round(seconds, 6),
               split="train")
    if "pitch_semitones" in augmentation:
        k = augmentation["pitch_semitones"]
        row["clip_id"] = f"{parent['clip_id']}-pitch{k:+d}"
        if parent.get("key"):
            row["key"] = transpose_key(parent["key"], k)
    else:
        r = augmentation["stretch_rate"]
        row["clip_id"] = f"{parent['clip_id']}-tempo{r:g}"
        if parent.get("bpm") is not None:
            row["bpm"] = round(parent["bpm"] * r, 3)
    return row


@dataclass(frozen=True)
class AugmentTask:
    """One Ray task: a chunk of training clips (with their followers) and what to do to each."""

    artifacts: str  # the artifacts/ folder the manifest's shard paths are relative to
    clips: list[tuple[dict[str, Any], Follower | None]]
    pitch_semitones: tuple[int, ...]
    stretch_rates: tuple[float, ...]


@dataclass
class AugmentResult:
    rows: list[dict[str, Any]]  # without shard/index: the stage writes the audio
    audio: np.ndarray  # int16 [clips, samples]
    audio_seconds: float  # of augmented audio produced
    cpu_seconds: float  # this process and the sox processes it ran


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (sox runs in a subprocess)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def augment_chunk(task: AugmentTask) -> AugmentResult:
    """Every augmentation of every clip of the chunk."""
    cpu0 = cpu_seconds()
    reader = ShardReader(task.artifacts)
    rows: list[dict[str, Any]] = []
    audio: list[np.ndarray] = []
    for parent, follower in task.clips:
        clip = reader.clip(parent)
        sr = parent["sample_rate"]
        content = round(parent["seconds"] * sr)
        for k in task.pitch_semitones:
            shifted = pitch_shift(clip, sr, k)
            shifted[content:] = 0.0  # the padding of a track's last clip stays silence
            rows.append(augmented_row(parent, {"pitch_semitones": k}, parent["seconds"]))
            audio.append(shifted)
        continuation = None
        if follower is not None:
            # Clips are loudness-normalised one by one: bring the follower to this clip's gain so that
            # the seam has no level jump.
            gain = 10.0 ** ((parent["gain_db"] - follower.row["gain_db"]) / 20.0)
            nxt = reader.clip(follower.row)[follower.offset: round(follower.row["seconds"] * sr)]
            continuation = (nxt * np.float32(gain)).astype(np.float32)
        for r in task.stretch_rates:
            stretched, audio_samples = stretch_clip(clip, content, continuation, sr, r)
            rows.append(augmented_row(parent, {"stretch_rate": r}, audio_samples / sr))
            audio.append(stretched)
    # WSOLA can push a peak past full scale (the follower's gain too); scale such a clip down rather
    # than let the int16 conversion clip it.
    fitted = [to_int16(x / max(1.0, float(np.max(np.abs(x))))) for x in audio]
    seconds = sum(len(x) for x in audio) / task.clips[0][0]["sample_rate"] if audio else 0.0
    stacked = np.stack(fitted) if fitted else np.zeros((0, 0), np.int16)
    return AugmentResult(rows, stacked, seconds, cpu_seconds() - cpu0)
