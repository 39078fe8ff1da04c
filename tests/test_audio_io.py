"""presto.audio.io against analytic cases (sine levels, gains) and independent references (soundfile, soxr one-shot)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from presto.audio.io import (
    load,
    loudness_gain_db,
    normalise_loudness,
    peak_dbfs,
    probe,
    resample,
    rms_dbfs,
    stream,
    to_mono,
)
from presto.errors import InputError


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


def test_levels_of_a_sine_are_analytic():
    x = sine(440, 1.0, 16000, amp=0.25)
    assert rms_dbfs(x) == pytest.approx(20 * np.log10(0.25 / np.sqrt(2)), abs=1e-3)
    assert peak_dbfs(x) == pytest.approx(20 * np.log10(0.25), abs=1e-3)
    assert rms_dbfs(np.zeros(100)) == -np.inf
    assert rms_dbfs(np.ones(10)) == pytest.approx(0.0)


def test_loudness_gain_reaches_target_or_stops_at_the_ceiling():
    assert loudness_gain_db(-30.0, -20.0, -20.0, -1.0) == pytest.approx(10.0)  # peak ends at -10: free
    assert loudness_gain_db(-30.0, -5.0, -20.0, -1.0) == pytest.approx(4.0)  # peak would reach +5: limited
    with pytest.raises(ValueError, match="silence"):
        loudness_gain_db(-np.inf, -np.inf, -20.0, -1.0)


def test_normalise_loudness_sine_and_impulses():
    quiet = sine(220, 1.0, 16000, amp=0.01)
    y, gain = normalise_loudness(quiet, -20.0, -1.0)
    assert rms_dbfs(y) == pytest.approx(-20.0, abs=1e-3)
    assert gain == pytest.approx(-20.0 - rms_dbfs(quiet), abs=1e-6)
    clicks = np.zeros(16000, np.float32)
    clicks[::4000] = 0.1  # crest factor 36 dB: at -12 dBFS RMS the peaks would reach +24 dBFS
    y, _ = normalise_loudness(clicks, -12.0, -1.0)
    assert peak_dbfs(y) == pytest.approx(-1.0, abs=1e-4)
    assert rms_dbfs(y) < -12.0


def test_to_mono_is_the_channel_mean():
    x = np.stack([np.ones(5), -np.ones(5), 3 * np.ones(5)]).astype(np.float32)
    np.testing.assert_allclose(to_mono(x), np.ones(5))
    with pytest.raises(ValueError, match="channels, n"):
        to_mono(np.ones(5))


def test_resample_keeps_frequency_level_and_duration():
    x = sine(1000, 2.0, 44100, amp=0.5)
    y = resample(x, 44100, 16000)
    assert abs(len(y) - 32000) <= 1
    assert dominant_hz(y, 16000) == pytest.approx(1000, abs=1.0)
    core = slice(1000, -1000)  # away from the filter's edges
    assert rms_dbfs(y[core]) == pytest.approx(rms_dbfs(x), abs=0.05)
    stereo = np.stack([x, 0.5 * x])
    ys = resample(stereo, 44100, 16000)
    assert ys.shape == (2, len(y))
    np.testing.assert_allclose(ys[1], 0.5 * ys[0], atol=1e-6)


def test_stream_matches_one_shot_decode(tmp_path):
    sr = 48000
    x = np.stack([sine(300, 2.3, sr), sine(500, 2.3, sr, 0.2), sine(700, 2.3, sr, 0.1)])
    path = tmp_path / "three.flac"
    sf.write(path, x.T, sr, subtype="PCM_24")
    ref = sf.read(path, dtype="float32", always_2d=True)[0].T
    # Same rate: blocks are the file itself.
    blocks = list(stream(path, sr, mono=False, block_seconds=0.3))
    assert len(blocks) > 5 and all(b.shape[0] == 3 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), ref)
    # Other rate, mono: the streaming resampler agrees with a one-shot resample of the downmix.
    y = np.concatenate(list(stream(path, 16000, mono=True, block_seconds=0.3)), axis=1)[0]
    expected = resample(to_mono(ref), sr, 16000)
    assert abs(len(y) - len(expected)) <= 1
    n = min(len(y), len(expected))
    np.testing.assert_allclose(y[:n], expected[:n], atol=1e-3)
    np.testing.assert_allclose(load(path, 16000), y)


def test_probe_reports_facts(tmp_path):
    path = tmp_path / "u8.wav"
    sf.write(path, sine(440, 1.5, 8000), 8000, subtype="PCM_U8")
    info = probe(path)
    assert (info.sample_rate, info.channels, info.frames, info.subtype) == (8000, 1, 12000, "PCM_U8")
    assert info.seconds == pytest.approx(1.5)


@pytest.mark.parametrize("name, reason", [("empty.wav", "empty"), ("text.wav", "not a readable audio file")])
def test_probe_rejects_non_audio(tmp_path, name, reason):
    path = tmp_path / name
    path.write_bytes(b"" if name == "empty.wav" else b"RIFF? no, just some text\n" * 20)
    with pytest.raises(InputError, match=reason) as err:
        probe(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("fmt, reason", [
    ("WAV", "truncated: the data chunk claims 96000 bytes"), ("AIFF", "truncated: the SSND chunk claims"),
    ("MP3", "truncated: the header promises 3.00 s"), ("FLAC", "decoding failed"), ("OGG", "not a readable"),
])
def test_truncated_files_are_caught(tmp_path, fmt, reason):
    full = tmp_path / f"full.{fmt.lower()}"
    sf.write(full, sine(440, 3.0, 16000), 16000, format=fmt)
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert len(load(full, 16000)) == 48000
    with pytest.raises(InputError, match=reason) as err:
        load(cut, 16000)
    assert str(cut) in str(err.value)


def test_nan_samples_are_caught_with_their_time(tmp_path):
    x = sine(440, 2.0, 16000)
    x[24000] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    with pytest.raises(InputError, match=r"NaN/Inf samples \(first at 1.500 s\)"):
        load(path, 16000)


def test_streaming_a_long_file_keeps_memory_bounded(tmp_path):
    sr, minutes = 8000, 10
    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", sr, 1, subtype="PCM_16") as f:
        for _ in range(minutes):
            f.write(sine(220, 60.0, sr))
    full_output_bytes = minutes * 60 * 16000 * 4  # float32 at 16 kHz
    tracemalloc.start()
    samples = sum(block.shape[1] for block in stream(path, 16000, block_seconds=10.0))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert abs(samples - minutes * 60 * 16000) <= 1
    assert peak < full_output_bytes / 8
