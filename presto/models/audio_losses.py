"""Losses for training the audio VAE, and reconstruction metrics for reporting it.

Training losses (generator side unless named otherwise):
    multi-resolution STFT   mean over FFT sizes of spectral convergence + log-magnitude L1
    KL                      KL(N(mean, std^2) || N(0, 1)), nats per latent frame
    adversarial (hinge)     generator: relu(1 - D(fake)); discriminator: relu(1 - D(real)) + relu(1 + D(fake))
    feature matching        L1 between the discriminator's hidden features on real and on generated audio

Reporting metrics: multi-resolution STFT distance, log-mel L1, SI-SDR (dB), chroma similarity (are the notes
kept: a codec can match the spectral envelope and lose the pitches, which the other three barely see).

Audio is [B, 1, N] (or [B, N]); every STFT uses a Hann window and hop = n_fft / 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import librosa
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor

# Magnitude floor before taking logs: about -100 dB below full scale, far under any audible content.
MAG_FLOOR = 1e-5


def _mono(audio: Tensor) -> Tensor:
    if audio.ndim == 3 and audio.shape[1] == 1:
        return audio.squeeze(1)
    if audio.ndim == 2:
        return audio
    raise ValueError(f"audio must be [batch, 1, samples] or [batch, samples], got shape {tuple(audio.shape)}")


def stft_magnitude(audio: Tensor, n_fft: int) -> Tensor:
    """|STFT| [B, n_fft/2 + 1, frames], floored at MAG_FLOOR (the floor also keeps sqrt's gradient finite)."""
    audio = _mono(audio)
    spec = torch.stft(audio, n_fft, n_fft // 4, window=torch.hann_window(n_fft, device=audio.device,
                                                                          dtype=audio.dtype),
                      return_complex=True)
    return (spec.real.pow(2) + spec.imag.pow(2)).clamp_min(MAG_FLOOR**2).sqrt()


def multi_resolution_stft_loss(pred: Tensor, target: Tensor, fft_sizes: Sequence[int]) -> Tensor:
    """Mean over FFT sizes of

        spectral convergence  ||S_t - S_p||_F / ||S_t||_F   (per clip, then averaged: loud clips do not
                                                             drown quiet ones)
        + log-magnitude L1    mean |ln S_t - ln S_p|

    Zero iff the magnitudes match at every resolution.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if not fft_sizes:
        raise ValueError("fft_sizes is empty: give at least one FFT size")
    total = pred.new_zeros(())
    for n_fft in fft_sizes:
        s_pred, s_true = stft_magnitude(pred, n_fft), stft_magnitude(target, n_fft)
        convergence = torch.linalg.vector_norm(s_true - s_pred, dim=(1, 2)) / torch.linalg.vector_norm(
            s_true, dim=(1, 2)
        )
        log_l1 = (s_true.log() - s_pred.log()).abs().mean()
        total = total + convergence.mean() + log_l1
    return total / len(fft_sizes)


def kl_divergence(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(0, 1)) = 1/2 (mean^2 + std^2 - 1 - ln std^2), summed over the latent channels
    (dim 1) and averaged over batch and frames: nats per latent frame."""
    kl = 0.5 * (mean.pow(2) + std.pow(2) - 1.0 - 2.0 * std.log())
    return kl.sum(dim=1).mean()


def generator_adversarial_loss(fake_logits: Sequence[Tensor]) -> Tensor:
    """Hinge loss, generator side: mean over scales of mean relu(1 - D(fake))."""
    return torch.stack([F.relu(1.0 - logits).mean() for logits in fake_logits]).mean()


def discriminator_adversarial_loss(real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> Tensor:
    """Hinge loss, discriminator side: mean over scales of mean relu(1 - D(real)) + mean relu(1 + D(fake)).

    Call it on logits of *detached* generated audio, so that its backward reaches the discriminator only.
    """
    if len(real_logits) != len(fake_logits):
        raise ValueError(f"{len(real_logits)} real and {len(fake_logits)} fake scales: they must match")
    return torch.stack(
        [F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean() for real, fake in zip(real_logits, fake_logits)]
    ).mean()


def feature_matching_loss(real_features: Sequence[Sequence[Tensor]],
                          fake_features: Sequence[Sequence[Tensor]]) -> Tensor:
    """Mean over scales and layers of mean |F_real - F_fake|; real features are targets (detached)."""
    pairs = [
        (real, fake)
        for real_scale, fake_scale in zip(real_features, fake_features, strict=True)
        for real, fake in zip(real_scale, fake_scale, strict=True)
    ]
    return torch.stack([(real.detach() - fake).abs().mean() for real, fake in pairs]).mean()


def log_mel_l1(pred: Tensor, target: Tensor, sample_rate: int, n_fft: int, n_mels: int) -> Tensor:
    """Mean |log10 M_t - log10 M_p| of mel magnitude spectrograms (HTK mel scale, unnormalised filters,
    hop n_fft / 4, magnitudes floored at MAG_FLOOR)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels, power=1.0
    ).to(device=pred.device, dtype=pred.dtype)
    m_pred, m_true = mel(_mono(pred)), mel(_mono(target))
    return (m_true.clamp_min(MAG_FLOOR).log10() - m_pred.clamp_min(MAG_FLOOR).log10()).abs().mean()


def si_sdr(pred: Tensor, target: Tensor) -> Tensor:
    """Scale-invariant SDR in dB, one value per clip [B].

    With zero-mean signals, the target is scaled to its projection s' = (<p, t> / ||t||^2) t and
    SI-SDR = 10 log10(||s'||^2 / ||p - s'||^2): gain changes do not count, everything else does.
    """
    pred, target = _mono(pred), _mono(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    pred = pred - pred.mean(dim=-1, keepdim=True)
    target = target - target.mean(dim=-1, keepdim=True)
    energy = target.pow(2).sum(dim=-1, keepdim=True)
    if (energy == 0).any():
        raise ValueError("si_sdr: a target clip is constant (silent); SI-SDR is undefined for it")
    projection = (pred * target).sum(dim=-1, keepdim=True) / energy * target
    residual = pred - projection
    return 10.0 * torch.log10(projection.pow(2).sum(dim=-1) / residual.pow(2).sum(dim=-1))


def chroma_fft_size(sample_rate: int) -> int:
    """The power of two nearest sample_rate / 4: bins of about 4 Hz, which separate semitones down to C2."""
    return 2 ** round(math.log2(sample_rate / 4))


def chroma_similarity(pred: Tensor, target: Tensor, sample_rate: int) -> Tensor:
    """Per clip [B]: the mean over frames of the cosine between the 12-bin chroma vectors of pred and target.

    chroma = C |STFT|^2 with C librosa's chroma filterbank (A440 tuning), n_fft = chroma_fft_size, hop n_fft / 4.
    1 when the pitch classes sound in the same proportions; insensitive to gain, timbre and octave.
    Frames where the target is silent (chroma energy 1e-8 of its loudest frame or less) are left out; clips
    shorter than half the FFT are zero-padded to it.
    """
    pred, target = _mono(pred), _mono(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    n_fft = chroma_fft_size(sample_rate)
    if target.shape[-1] <= n_fft // 2:  # too short for the STFT's reflect padding: zeros stand in
        pred, target = (F.pad(x, (0, n_fft - x.shape[-1])) for x in (pred, target))
    filters = torch.from_numpy(librosa.filters.chroma(sr=sample_rate, n_fft=n_fft)).to(pred)

    def chroma(audio: Tensor) -> Tensor:
        window = torch.hann_window(n_fft, device=audio.device, dtype=audio.dtype)
        spec = torch.stft(audio, n_fft, n_fft // 4, window=window, return_complex=True).abs().pow(2)
        return torch.einsum("cf,bft->bct", filters, spec)

    c_pred, c_true = chroma(pred), chroma(target)
    energy = c_true.norm(dim=1)  # [B, frames]
    voiced = energy > 1e-8 * energy.amax(dim=1, keepdim=True).clamp_min(torch.finfo(energy.dtype).tiny)
    cosine = F.cosine_similarity(c_pred, c_true, dim=1, eps=1e-12)
    return (cosine * voiced).sum(dim=1) / voiced.sum(dim=1).clamp_min(1)


@torch.no_grad()
def reconstruction_metrics(pred: Tensor, target: Tensor, *, sample_rate: int, fft_sizes: Sequence[int],
                           mel_fft_size: int, n_mels: int) -> dict[str, float]:
    """Batch means of the reporting metrics: stft_distance, mel_l1 (lower is better), si_sdr_db and
    chroma_similarity (higher)."""
    return {
        "stft_distance": multi_resolution_stft_loss(pred, target, fft_sizes).item(),
        "mel_l1": log_mel_l1(pred, target, sample_rate, mel_fft_size, n_mels).item(),
        "si_sdr_db": si_sdr(pred, target).mean().item(),
        "chroma_similarity": chroma_similarity(pred, target, sample_rate).mean().item(),
    }
