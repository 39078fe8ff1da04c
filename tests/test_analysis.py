"""Audio analysis against signals whose answers are known: click tracks, chords in known keys, levels of
sines, spectra of pure and harmonic-rich tones."""

from __future__ import annotations

import math

import librosa
import numpy as np
import pytest

from presto.data.analysis import (
    MAJOR_PROFILE,
    MINOR_PROFILE,
    MIREX_KEY_SCORE,
    count_onsets,
    describe,
    estimate_key,
    estimate_tempo,
    key_from_profile,
    key_relation,
    pulse_from_onset_envelope,
    tempo_agrees,
)
from presto.data.music import parse_key

SR = 16000


def click_track(bpm: float, seconds: float = 4.0, sr: int = SR, first: float = 0.1) -> np.ndarray:
    """A 10 ms decaying noise burst on every beat."""
    y = np.zeros(int(seconds * sr), np.float32)
    n = int(0.01 * sr)
    burst = np.random.default_rng(0).standard_normal(n) * np.exp(-np.arange(n) / (0.002 * sr))
    for t in np.arange(first, seconds - 0.01, 60.0 / bpm):
        i = int(round(t * sr))
        y[i:i + n] += 0.5 * burst.astype(np.float32)
    return y


def harmonic_tone(midi: float, seconds: float, sr: int = SR, partials: int = 6, amp: float = 0.1) -> np.ndarray:
    """A plucked-string-like note: partials falling off by 0.6 each, a 10 ms attack, an exponential decay."""
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    t = np.arange(int(seconds * sr)) / sr
    y = sum(0.6 ** h * np.sin(2 * np.pi * f0 * (h + 1) * t) for h in range(partials) if f0 * (h + 1) < sr / 2)
    return (amp * y * np.minimum(1.0, t / 0.01) * np.exp(-1.5 * t)).astype(np.float32)


def progression(chords: list[list[int]], seconds_each: float, transpose: int = 0) -> np.ndarray:
    return np.concatenate([sum(harmonic_tone(m + transpose, seconds_each) for m in chord) for chord in chords])


D_MAJOR_CADENCE = [[50, 62, 66, 69], [55, 62, 67, 71], [57, 61, 64, 69], [50, 62, 66, 69]]  # I IV V I
A_MINOR_CADENCE = [[45, 57, 60, 64], [50, 57, 62, 65], [52, 56, 59, 64], [45, 57, 60, 64]]  # i iv V i


def sine(freq: float, seconds: float, amp: float, sr: int = SR) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


# --- tempo ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bpm", [72, 96, 120, 150])
def test_click_track_tempo(bpm):
    assert estimate_tempo(click_track(bpm), SR) == pytest.approx(bpm, rel=0.01)


def test_click_track_tempo_at_cd_rate():
    assert estimate_tempo(click_track(120, sr=44100), 44100) == pytest.approx(120, rel=0.01)


def test_tempo_agrees_with_librosa_on_a_click_track():
    """An independent estimator (librosa's tempogram, coarser lag grid) lands within its own resolution."""
    y = click_track(100, seconds=8.0)
    reference = float(librosa.feature.tempo(y=y, sr=SR)[0])
    assert estimate_tempo(y, SR) == pytest.approx(reference, rel=0.04)


def test_envelope_period_between_frames_is_interpolated():
    """A raised cosine of period 51.3 frames at 100 frames/s is 116.96 bpm: the parabola recovers the
    fraction that whole-frame lags (117.6 or 115.4 bpm) miss."""
    frame_rate, bpm = 100.0, 116.96
    t = np.arange(800) / frame_rate
    envelope = 1 + np.cos(2 * np.pi * bpm / 60 * t)
    tempo, clarity = pulse_from_onset_envelope(envelope, frame_rate)
    assert tempo == pytest.approx(bpm, rel=0.003)
    assert clarity > 0.95  # a cosine repeats itself exactly


def test_octave_ambiguity_resolved_towards_120():
    """Clicks every 0.25 s with accents every 0.5 s: the 120 bpm level is preferred to 240 bpm."""
    y = click_track(240) + click_track(120)
    assert estimate_tempo(y, SR) == pytest.approx(120, rel=0.01)


def test_nothing_starts_no_tempo():
    assert math.isnan(estimate_tempo(np.zeros(4 * SR, np.float32), SR))
    assert math.isnan(estimate_tempo(sine(440, 4.0, 0.3), SR))  # a steady tone has no onsets
    assert math.isnan(estimate_tempo(click_track(120, seconds=0.3), SR))  # too short for one period


def test_pulse_clarity_separates_clicks_from_noise():
    noise = (0.1 * np.random.default_rng(1).standard_normal(4 * SR)).astype(np.float32)
    assert describe(click_track(120), SR)["pulse_clarity"] > 0.8
    assert describe(noise, SR)["pulse_clarity"] < 0.2


# --- key -----------------------------------------------------------------------------------------------

def test_d_major_cadence():
    key, confidence = estimate_key(progression(D_MAJOR_CADENCE, 1.0), SR)
    assert key == "D major" and confidence > 0.8


def test_a_minor_cadence():
    key, confidence = estimate_key(progression(A_MINOR_CADENCE, 1.0), SR)
    assert key == "A minor" and confidence > 0.8


def test_d_major_scale():
    scale = np.concatenate([harmonic_tone(m, 0.5) for m in [62, 64, 66, 67, 69, 71, 73, 74]])
    assert estimate_key(scale, SR)[0] == "D major"


@pytest.mark.parametrize("shift", [-5, 3, 6])
def test_key_follows_transposition(shift):
    key, _ = estimate_key(progression(D_MAJOR_CADENCE, 1.0, transpose=shift), SR)
    assert parse_key(key) == ((2 + shift) % 12, "major")


def test_profiles_identify_their_own_rotation():
    assert key_from_profile(np.roll(MAJOR_PROFILE, 2)) == ("D major", pytest.approx(1.0))
    assert key_from_profile(np.roll(MINOR_PROFILE, 11)) == ("B minor", pytest.approx(1.0))
    # Affine changes of a profile (gain, offset) do not change a Pearson correlation.
    assert key_from_profile(3 * np.roll(MINOR_PROFILE, 5) + 1) == ("F minor", pytest.approx(1.0))


def test_no_pitch_no_key():
    assert estimate_key(np.zeros(4 * SR, np.float32), SR) == (None, 0.0)
    assert key_from_profile(np.full(12, 0.3)) == (None, 0.0)
    with pytest.raises(ValueError, match="12 bins"):
        key_from_profile(np.ones(11))


@pytest.mark.parametrize("estimate, reference, relation", [
    ("D major", "D major", "exact"),
    ("A major", "D major", "fifth"),
    ("E minor", "A minor", "fifth"),
    ("G major", "D major", "other"),  # MIREX credits only the fifth above
    ("B minor", "D major", "relative"),
    ("F major", "D minor", "relative"),
    ("D minor", "D major", "parallel"),
    ("Eb major", "D major", "other"),
    (None, "D major", "other"),
])
def test_key_relation(estimate, reference, relation):
    assert key_relation(estimate, reference) == relation
    assert relation in MIREX_KEY_SCORE


def test_tempo_agreement_rules():
    assert tempo_agrees(124.8, 120) and not tempo_agrees(125.0, 120)
    assert not tempo_agrees(240, 120) and tempo_agrees(240, 120, octave=True)
    assert tempo_agrees(61, 120, octave=True) and not tempo_agrees(90, 120, octave=True)
    assert not tempo_agrees(None, 120) and not tempo_agrees(float("nan"), 120, octave=True)
    with pytest.raises(ValueError, match="positive"):
        tempo_agrees(120, 0)


# --- levels, brightness, onsets ------------------------------------------------------------------------

def test_levels_of_a_sine():
    d = describe(sine(440, 2.0, 0.5), SR)
    assert d["rms_dbfs"] == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.02)
    assert d["peak_dbfs"] == pytest.approx(20 * math.log10(0.5), abs=0.02)


def test_loud_versus_quiet():
    music = progression(D_MAJOR_CADENCE, 1.0)
    loud, quiet = describe(music, SR), describe(0.02 * music, SR)
    assert loud["rms_dbfs"] - quiet["rms_dbfs"] == pytest.approx(-20 * math.log10(0.02), abs=0.05)
    # Everything else about the clip is level-independent.
    assert (loud["key"], loud["tempo_bpm"]) == (quiet["key"], quiet["tempo_bpm"])
    assert loud["centroid_hz"] == pytest.approx(quiet["centroid_hz"], rel=1e-3)


@pytest.mark.parametrize("sr", [SR, 44100])
def test_centroid_of_a_pure_tone(sr):
    assert describe(sine(1000, 1.0, 0.3, sr=sr), sr)["centroid_hz"] == pytest.approx(1000, rel=0.02)


def test_bright_versus_dark():
    """A 220 Hz sawtooth (partial h at 1/h, up to 30) has its magnitude centroid at 220 * 30 / H_30 =
    1653 Hz; the 220 Hz sine at 220 Hz."""
    t = np.arange(2 * SR) / SR
    dark = sine(220, 2.0, 0.3)
    bright = (0.1 * sum(np.sin(2 * np.pi * 220 * h * t) / h for h in range(1, 31))).astype(np.float32)
    harmonic_number = sum(1 / h for h in range(1, 31))
    assert describe(dark, SR)["centroid_hz"] == pytest.approx(220, rel=0.05)
    assert describe(bright, SR)["centroid_hz"] == pytest.approx(220 * 30 / harmonic_number, rel=0.05)


def test_onsets_counted_on_a_click_track():
    """Clicks at 0.1, 0.6, ..., 3.6 s: 8 notes in 4 s."""
    d = describe(click_track(120), SR)
    assert d["onset_rate_hz"] == pytest.approx(2.0)
    assert d["tempo_bpm"] == pytest.approx(120, rel=0.01)
    assert count_onsets(np.zeros(100), 100.0) == 0


def test_silence_is_described_without_nans():
    d = describe(np.zeros(2 * SR, np.float32), SR)
    assert d == {"tempo_bpm": None, "pulse_clarity": 0.0, "key": None, "key_confidence": 0.0, "rms_dbfs": -120.0,
                 "peak_dbfs": -120.0, "centroid_hz": None, "onset_rate_hz": 0.0}


def test_stereo_is_analysed_as_its_mid_channel():
    mono = progression(D_MAJOR_CADENCE, 1.0)
    stereo = np.stack([mono * 1.5, mono * 0.5])  # mean of the channels is `mono`
    assert describe(stereo, SR) == describe(mono, SR)


@pytest.mark.parametrize("audio, sr, message", [
    (np.zeros((2, 2, 100), np.float32), SR, "shape"),
    (np.array([0.0, np.nan, 0.1], np.float32), SR, "NaN"),
    (np.zeros(0, np.float32), SR, "empty"),
    (np.zeros(100, np.float32), 0, "sample rate"),
])
def test_bad_input_is_named(audio, sr, message):
    with pytest.raises(ValueError, match=message):
        describe(audio, sr)
