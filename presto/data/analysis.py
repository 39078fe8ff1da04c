"""What a clip's audio says: tempo, key, loudness, brightness, note density.

Used twice: to caption training clips (labels the metadata lacks) and to score generated audio (tempo
error, key accuracy). Every function takes float audio in [-1, 1], mono `[n]` or multichannel `[c, n]`
(channels are averaged), and its sample rate.

Tempo: autocorrelation of a spectral-flux onset envelope, weighted by a log-normal preference around
120 bpm. Key: the Krumhansl–Schmuckler method, i.e. the Pearson correlation of the clip's mean chroma
with the 24 rotations of a major and a minor key profile. The profiles are Albrecht & Shanahan's (2013,
pitch-class counts of a common-practice corpus) rather than Krumhansl & Kessler's probe-tone ratings: on
229 four-second clips of rendered Bach chorales they found the labelled key in 59 % of clips against 42 %,
mostly by confusing the dominant less often (the 3rd partial of every note adds to its fifth's chroma).

librosa's numba gufuncs segfault with numba 0.68 + numpy 2.4 (tuning estimation, which the chroma
functions run unless `tuning` is given, and peak picking, which `onset_detect` runs), so tuning is fixed at
A440 and onsets are picked with scipy.
"""

from __future__ import annotations

import math
import warnings

import librosa
import numpy as np
from scipy.signal import find_peaks

from presto.data.music import key_name, parse_key

ONSET_FRAME_RATE_HZ = 200.0  # onset envelope resolution: one frame is 1 % of a beat at 120 bpm
CHROMA_FRAME_RATE_HZ = 10.0  # a clip-level key needs only a coarse chroma time grid
MIN_BPM, MAX_BPM = 30.0, 300.0
PREFERRED_BPM = 120.0  # where listeners' tapped tempi cluster (Moelants 2002); resolves octave ambiguity
MIN_ONSET_DB = 0.1  # an envelope that never rises this much (mean dB over mel bands) has no onsets
ONSET_MIN_GAP_S = 0.05  # two onsets closer than this are one note
ONSET_PROMINENCE = 0.1  # an onset rises this far (relative to the clip's strongest) above its surroundings
SILENCE_DBFS = -120.0  # floor for levels, below int16's ~-101 dBFS noise floor

# Albrecht & Shanahan (2013) key profiles, index 0 = the tonic.
MAJOR_PROFILE = np.array([0.238, 0.006, 0.111, 0.006, 0.137, 0.094, 0.016, 0.214, 0.009, 0.080, 0.008, 0.081])
MINOR_PROFILE = np.array([0.220, 0.006, 0.104, 0.123, 0.019, 0.103, 0.012, 0.214, 0.062, 0.022, 0.061, 0.052])

# MIREX key-detection credit for each relation of an estimate to the reference.
MIREX_KEY_SCORE = {"exact": 1.0, "fifth": 0.5, "relative": 0.3, "parallel": 0.2, "other": 0.0}


def to_mono(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=0)
    if audio.ndim != 1:
        raise ValueError(f"audio must be [n_samples] or [channels, n_samples], got shape {audio.shape}")
    if audio.size == 0:
        raise ValueError("audio is empty")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio holds NaN or Inf samples")
    return audio


def _check_rate(sr: int) -> None:
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")


def _onset_hop(sr: int) -> int:
    return max(1, round(sr / ONSET_FRAME_RATE_HZ))


def _stft_size(sr: int) -> int:
    # ~50 ms windows: long enough to resolve low partials, short enough to keep onsets sharp.
    return 2 ** round(math.log2(sr * 0.05))


def _power_spectrogram(y: np.ndarray, sr: int) -> np.ndarray:
    return np.abs(librosa.stft(y, n_fft=_stft_size(sr), hop_length=_onset_hop(sr))) ** 2


def _onset_envelope(power: np.ndarray, sr: int) -> np.ndarray:
    """Spectral flux: the mean rise in log-mel energy from one frame to the next.

    Frames whose window reaches past either end of the clip are zeroed: a clip cut from longer audio
    starts and ends abruptly, and that jump is not a note.
    """
    mel = librosa.feature.melspectrogram(S=power, sr=sr, n_mels=64)
    envelope = librosa.onset.onset_strength(S=librosa.power_to_db(mel, ref=np.max), sr=sr)
    edge = math.ceil(_stft_size(sr) / 2 / _onset_hop(sr)) + 1
    envelope[:edge] = 0.0
    envelope[-edge:] = 0.0
    return envelope


def count_onsets(envelope: np.ndarray, frame_rate: float) -> int:
    """Peaks of the onset envelope that stand out by ONSET_PROMINENCE of the clip's strongest peak."""
    top = float(np.max(envelope, initial=0.0))
    if top < MIN_ONSET_DB:
        return 0
    peaks, _ = find_peaks(envelope / top, prominence=ONSET_PROMINENCE,
                          distance=max(1, round(ONSET_MIN_GAP_S * frame_rate)))
    return len(peaks)


def pulse_from_onset_envelope(envelope: np.ndarray, frame_rate: float) -> tuple[float, float]:
    """(beat rate in bpm, pulse clarity) of an onset envelope; (NaN, 0.0) when nothing pulses.

    The autocorrelation at lag k is averaged over its n - k overlapping frames, so that long periods are
    not penalised for overlapping less. Among periods allowed by [MIN_BPM, MAX_BPM] (and at most half the
    clip, so that a period repeats at least once) the score is autocorrelation times a one-octave-wide
    log-normal weight around PREFERRED_BPM; the peak is refined by a parabola through its neighbours.
    Pulse clarity is the autocorrelation at the chosen period over that at lag 0: 1 for an envelope that
    repeats exactly, 0.1-0.2 for noise.
    """
    env = np.asarray(envelope, dtype=np.float64)
    n = env.size
    lo = math.ceil(60.0 * frame_rate / MAX_BPM)
    hi = min(math.floor(60.0 * frame_rate / MIN_BPM), n // 2)
    if hi - lo < 2 or env.max(initial=0.0) < MIN_ONSET_DB:
        return float("nan"), 0.0
    env = env - env.mean()
    spectrum = np.fft.rfft(env, 2 * n)  # zero-padded: a linear, not circular, autocorrelation
    acf = np.fft.irfft(np.abs(spectrum) ** 2)[:n] / (n - np.arange(n))
    lags = np.arange(lo - 1, hi + 2)  # one extra lag each side for the parabola
    bpm = 60.0 * frame_rate / np.maximum(lags, 1)
    score = acf[lags] * np.exp(-0.5 * np.log2(bpm / PREFERRED_BPM) ** 2)
    k = 1 + int(np.argmax(score[1:-1]))
    if score[k] <= 0:
        return float("nan"), 0.0
    left, mid, right = score[k - 1], score[k], score[k + 1]
    curvature = left - 2 * mid + right
    shift = 0.5 * (left - right) / curvature if curvature < 0 else 0.0
    return float(60.0 * frame_rate / (lags[k] + shift)), float(acf[lags[k]] / acf[0])


def estimate_tempo(audio: np.ndarray, sr: int) -> float:
    """Tempo in bpm, NaN for audio in which nothing starts (silence, a steady tone)."""
    _check_rate(sr)
    y = to_mono(audio)
    envelope = _onset_envelope(_power_spectrogram(y, sr), sr)
    return pulse_from_onset_envelope(envelope, sr / _onset_hop(sr))[0]


def chroma_profile(audio: np.ndarray, sr: int) -> np.ndarray:
    """The clip's mean 12-bin chroma (index 0 = C), from a constant-Q transform tuned to A440."""
    _check_rate(sr)
    y = to_mono(audio)
    # The CQT halves the rate once per octave, so its hop must divide by 2^(octaves - 1) = 64.
    hop = max(64, 64 * round(sr / CHROMA_FRAME_RATE_HZ / 64))
    n_octaves = min(7, int(math.log2(sr / 2 / librosa.note_to_hz("C1"))))
    with warnings.catch_warnings():
        # In a clip shorter than ~2 s the lowest octave's filters outlast the clip; those bins come out
        # smeared, which a clip-level key tolerates.
        warnings.filterwarnings("ignore", message=r"n_fft=\d+ is too large for input signal")
        chroma = librosa.feature.chroma_cqt(y=y, sr=sr, hop_length=hop, tuning=0.0, n_octaves=n_octaves)
    return chroma.mean(axis=1)


def _pitch_class_profile(profile: np.ndarray) -> np.ndarray:
    profile = np.asarray(profile, dtype=np.float64)
    if profile.shape != (12,):
        raise ValueError(f"a pitch-class profile has 12 bins, got shape {profile.shape}")
    return profile


def key_correlations(profile: np.ndarray) -> dict[str, float]:
    """Pearson correlation of a 12-bin pitch-class profile with each of the 24 major and minor keys."""
    profile = _pitch_class_profile(profile)
    out = {}
    for mode, template in (("major", MAJOR_PROFILE), ("minor", MINOR_PROFILE)):
        for tonic in range(12):
            out[key_name(tonic, mode)] = float(np.corrcoef(profile, np.roll(template, tonic))[0, 1])
    return out


def key_from_profile(profile: np.ndarray) -> tuple[str | None, float]:
    """The best-correlated key and its correlation; (None, 0.0) for a flat profile (no pitch at all)."""
    profile = _pitch_class_profile(profile)
    if np.ptp(profile) <= 1e-9 * max(1.0, float(np.abs(profile).max())):
        return None, 0.0
    correlations = key_correlations(profile)
    best = max(correlations, key=correlations.__getitem__)
    return best, correlations[best]


def estimate_key(audio: np.ndarray, sr: int) -> tuple[str | None, float]:
    """(key name as presto.data.music.key_name spells it, confidence), or (None, 0.0) without pitch.

    The confidence is the Pearson correlation of the clip's chroma with the winning key profile: 0.8-0.96
    on 4 s clips of rendered chorales, but white noise also reaches 0.3-0.8, so on its own it separates
    tonal from atonal audio only roughly.
    """
    return key_from_profile(chroma_profile(audio, sr))


def level_dbfs(amplitude: float) -> float:
    """20 log10 of an amplitude relative to full scale, floored at SILENCE_DBFS."""
    return max(SILENCE_DBFS, 20.0 * math.log10(max(amplitude, 1e-12)))


def spectral_centroid(power: np.ndarray, sr: int) -> float:
    """Centroid (Hz) of the clip's long-term magnitude spectrum: loud frames count more than quiet ones,
    so the noise in pauses does not make a dark piece look bright. NaN for silence."""
    magnitude = np.sqrt(power).sum(axis=1)
    total = magnitude.sum()
    if total <= 0:
        return float("nan")
    freqs = librosa.fft_frequencies(sr=sr, n_fft=2 * (power.shape[0] - 1))
    return float((freqs * magnitude).sum() / total)


def describe(audio: np.ndarray, sr: int) -> dict[str, float | str | None]:
    """Everything a caption or a score may use, with one STFT shared by the tempo and timbre measures.

    tempo_bpm (None when nothing starts) and pulse_clarity (see pulse_from_onset_envelope); key and
    key_confidence (see estimate_key); rms_dbfs and peak_dbfs (levels relative to full scale);
    centroid_hz (brightness; None for silence); onset_rate_hz (note onsets per second: how busy it is).
    Values are rounded and NaN-free, ready for JSON.
    """
    _check_rate(sr)
    y = to_mono(audio)
    power = _power_spectrogram(y, sr)
    envelope = _onset_envelope(power, sr)
    frame_rate = sr / _onset_hop(sr)
    tempo, clarity = pulse_from_onset_envelope(envelope, frame_rate)
    key, confidence = estimate_key(y, sr)
    rms = float(np.sqrt(np.mean(y.astype(np.float64) ** 2)))
    centroid = spectral_centroid(power, sr)
    return {
        "tempo_bpm": None if math.isnan(tempo) else round(tempo, 2),
        "pulse_clarity": round(clarity, 4),
        "key": key,
        "key_confidence": round(confidence, 4),
        "rms_dbfs": round(level_dbfs(rms), 2),
        "peak_dbfs": round(level_dbfs(float(np.abs(y).max())), 2),
        "centroid_hz": None if math.isnan(centroid) else round(centroid, 1),
        "onset_rate_hz": round(count_onsets(envelope, frame_rate) / (y.size / sr), 3),
    }


def tempo_agrees(estimate: float | None, reference: float, *, tolerance: float = 0.04,
                 octave: bool = False) -> bool:
    """Whether an estimated tempo is within `tolerance` (relative) of the reference, or with `octave`,
    of half or double it too (the MIREX tempo conventions)."""
    if reference <= 0:
        raise ValueError(f"reference tempo must be positive, got {reference}")
    if estimate is None or not math.isfinite(estimate):
        return False
    targets = (reference, 2 * reference, reference / 2) if octave else (reference,)
    return any(abs(estimate - t) <= tolerance * t for t in targets)


def key_relation(estimate: str | None, reference: str) -> str:
    """How an estimated key relates to the reference, in MIREX's categories: 'exact', 'fifth' (same mode,
    tonic a fifth above), 'relative' (C major <-> A minor), 'parallel' (C major <-> C minor) or 'other'."""
    if estimate is None:
        return "other"
    est_pc, est_mode = parse_key(estimate)
    ref_pc, ref_mode = parse_key(reference)
    up = (est_pc - ref_pc) % 12
    if est_mode == ref_mode:
        return {0: "exact", 7: "fifth"}.get(up, "other")
    if up == 0:
        return "parallel"
    # The relative minor sits 3 semitones below its major.
    relative = (ref_mode == "major" and up == 9) or (ref_mode == "minor" and up == 3)
    return "relative" if relative else "other"
