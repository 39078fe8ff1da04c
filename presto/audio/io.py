"""Reading audio files and the level arithmetic every stage shares.

Files are decoded with soundfile (libsndfile: wav, flac, ogg, mp3, aiff, ...) in blocks, so an hour of
96 kHz 6-channel audio never sits in memory at once; resampling is soxr's streaming resampler.
Levels are in dBFS with full scale = a square wave of amplitude 1, so a full-scale sine reads -3.01 dBFS.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from presto.errors import InputError

# A header may promise more audio than the file holds (a copy cut short). Decoders recover what is there,
# so compare: fewer than this fraction of the promised frames means the file is truncated. The slack
# covers encoders whose frame count is an estimate (mp3 without an exact Xing header).
TRUNCATION_TOLERANCE = 0.99

# libsndfile's header log says "data : 96000 (should be 47978)" when a WAV/AIFF data chunk claims more
# bytes than the file has. Sizes 0 and 0xFFFFFFFF mean "unknown" (streaming writers) and are fine.
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_SIZES = {0, 0xFFFFFFFF}


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def probe(path: str | Path) -> AudioInfo:
    """Header facts of an audio file; InputError naming the file when it is empty, not audio or truncated."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror}") from None
    if size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise InputError(f"{path}: not a readable audio file: {_sndfile_message(err)}") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise InputError(f"{path}: header has sample rate {info.samplerate} and {info.channels} channels")
    for chunk, claimed, actual in _SHORT_CHUNK.findall(info.extra_info):
        if int(claimed) not in _UNKNOWN_SIZES and int(claimed) > int(actual):
            raise InputError(
                f"{path}: truncated: the {chunk} chunk claims {int(claimed)} bytes, the file holds {int(actual)}"
            )
    return AudioInfo(str(path), info.samplerate, info.channels, info.frames, info.format, info.subtype)


def _sndfile_message(err: Exception) -> str:
    # libsndfile prefixes its messages with "Error opening '<path>': "; the path is already in ours.
    text = str(err).strip()
    return text.split("': ", 1)[1] if "': " in text else text


def to_mono(audio: np.ndarray) -> np.ndarray:
    """[channels, n] -> [n]: the mean of all channels (for 5.1 this includes LFE, a small bass lift)."""
    if audio.ndim != 2:
        raise ValueError(f"to_mono expects [channels, n], got shape {audio.shape}")
    return audio.mean(axis=0, dtype=np.float32)


def resample(audio: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample [n] or [channels, n] float audio (soxr, high quality)."""
    if orig_rate == target_rate:
        return np.asarray(audio, dtype=np.float32)
    x = np.asarray(audio, dtype=np.float32)
    return soxr.resample(x.T, orig_rate, target_rate, quality="HQ").T.astype(np.float32, copy=False)


def stream(path: str | Path, sample_rate: int, *, mono: bool = True,
           block_seconds: float = 10.0) -> Iterator[np.ndarray]:
    """Decode a file block by block as float32 [channels, n] at `sample_rate` (channels = 1 when `mono`).

    Raises InputError naming the file if it holds NaN/Inf samples, fails to decode part-way, or decodes
    to fewer frames than its header promises. Blocks are `block_seconds` of *source* audio, so memory
    stays bounded whatever the file's length, rate or channel count.
    """
    info = probe(path)
    channels = 1 if mono else info.channels
    resampler = (None if info.sample_rate == sample_rate
                 else soxr.ResampleStream(info.sample_rate, sample_rate, channels, dtype="float32", quality="HQ"))
    block = max(1, int(block_seconds * info.sample_rate))
    frames_read = 0
    try:
        with sf.SoundFile(str(path)) as f:
            while True:
                raw = f.read(block, dtype="float32", always_2d=True)  # [n, channels]
                last = len(raw) < block
                if not np.isfinite(raw).all():
                    bad = frames_read + int(np.argmax(~np.isfinite(raw).all(axis=1)))
                    raise InputError(f"{path}: contains NaN/Inf samples (first at {bad / info.sample_rate:.3f} s)")
                frames_read += len(raw)
                x = raw.T
                if mono:
                    x = to_mono(x)[None]
                if resampler is not None:
                    x = resampler.resample_chunk(np.ascontiguousarray(x.T), last=last).T
                if x.shape[1]:
                    yield np.ascontiguousarray(x, dtype=np.float32)
                if last:
                    break
    except (sf.LibsndfileError, RuntimeError) as err:
        at = frames_read / info.sample_rate
        raise InputError(f"{path}: decoding failed at {at:.2f} s: {_sndfile_message(err)}") from None
    if frames_read < TRUNCATION_TOLERANCE * info.frames:
        raise InputError(f"{path}: truncated: the header promises {info.seconds:.2f} s, "
                         f"only {frames_read / info.sample_rate:.2f} s decode")


def load(path: str | Path, sample_rate: int, *, mono: bool = True) -> np.ndarray:
    """A whole file as float32 [n] (mono) or [channels, n] at `sample_rate`. For short files only."""
    blocks = list(stream(path, sample_rate, mono=mono))
    channels = 1 if mono else probe(path).channels
    audio = np.concatenate(blocks, axis=1) if blocks else np.zeros((channels, 0), np.float32)
    return audio[0] if mono else audio


def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level over all samples, in dBFS (-inf for digital silence)."""
    ms = float(np.mean(np.square(audio, dtype=np.float64))) if audio.size else 0.0
    return 10.0 * np.log10(ms) if ms > 0 else -np.inf


def peak_dbfs(audio: np.ndarray) -> float:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else -np.inf


def loudness_gain_db(rms_db: float, peak_db: float, target_dbfs: float, ceiling_dbfs: float) -> float:
    """The gain that brings a signal's RMS to `target_dbfs`, lowered where needed so that its peak stays at or
    under `ceiling_dbfs` (a limiter by gain only: the waveform's shape, hence its timbre, is untouched;
    very peaky material ends up quieter than the target instead of distorted)."""
    if not np.isfinite(rms_db):
        raise ValueError("cannot normalise digital silence (RMS is -inf dBFS)")
    return min(target_dbfs - rms_db, ceiling_dbfs - peak_db)


def normalise_loudness(audio: np.ndarray, target_dbfs: float, ceiling_dbfs: float) -> tuple[np.ndarray, float]:
    """(audio scaled to `target_dbfs` RMS with its peak at most `ceiling_dbfs`, the gain applied in dB)."""
    gain_db = loudness_gain_db(rms_dbfs(audio), peak_dbfs(audio), target_dbfs, ceiling_dbfs)
    return (audio * np.float32(10.0 ** (gain_db / 20.0))).astype(np.float32), gain_db
