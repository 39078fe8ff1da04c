"""Pictures of audio for people reviewing runs: log-mel spectrograms as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio


def log_mel_db(audio: np.ndarray, sample_rate: int, n_mels: int = 80, top_db: float = 80.0) -> np.ndarray:
    """Power mel spectrogram in dB relative to its peak, floored at -top_db: [n_mels, frames] of mono audio
    [samples]; [channels, n_mels, frames] of [channels, samples], relative to one peak over all channels (so
    the channels' levels compare)."""
    n_fft = 1 << int(np.ceil(np.log2(sample_rate * 0.046)))  # ~46 ms windows at any rate
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels,
                                               f_min=20.0, f_max=sample_rate / 2)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim not in (1, 2):
        raise ValueError(f"audio must be [samples] or [channels, samples], got shape {audio.shape}")
    power = mel(torch.as_tensor(np.atleast_2d(audio))).numpy()
    db = 10.0 * np.log10(np.maximum(power, 1e-10))
    db = np.maximum(db - db.max(), -top_db)
    return db[0] if audio.ndim == 1 else db


def save_spectrograms(items: list[tuple[str, np.ndarray]], sample_rate: int, path: str | Path) -> Path:
    """One PNG with a row per (title, audio): reconstructions or models side by side on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(items), 1, figsize=(8, 1.8 * len(items)), squeeze=False)
    for ax, (title, audio) in zip(axes[:, 0], items):
        seconds = len(audio) / sample_rate
        ax.imshow(log_mel_db(audio, sample_rate), origin="lower", aspect="auto", cmap="magma", vmin=-80, vmax=0,
                  extent=(0, seconds, 0, 1))
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_yticks([])
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
