from pathlib import Path

import numpy as np

from presto.audio.plots import log_mel_db, save_spectrograms


def test_log_mel_peaks_at_the_tone_band() -> None:
    sr = 16000
    t = np.arange(sr) / sr
    low = log_mel_db(np.sin(2 * np.pi * 200 * t), sr)
    high = log_mel_db(np.sin(2 * np.pi * 4000 * t), sr)
    assert low.max() == 0 and low.min() >= -80
    assert low.mean(1).argmax() < high.mean(1).argmax()


def test_png_written(tmp_path: Path) -> None:
    sr = 8000
    audio = np.random.default_rng(0).normal(0, 0.1, sr).astype(np.float32)
    path = save_spectrograms([("a", audio), ("b", audio * 0.5)], sr, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_log_mel_of_stereo_shares_one_peak() -> None:
    sr = 16000
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 440 * t)
    db = log_mel_db(np.stack([tone, 0.1 * tone]), sr)  # the right channel 20 dB down
    assert db.shape[0] == 2 and db.shape[1:] == log_mel_db(tone, sr).shape
    assert db[0].max() == 0 and abs(db[1].max() + 20.0) < 0.01
