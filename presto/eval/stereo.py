"""Stereo metrics: an upmix (stereo made from a mono downmix) against the real stereo it came from.

Stereo is [B, 2, N] (left, right); mid M = (L + R) / 2, side S = (L - R) / 2 (presto.models.upmixer).

    channel_correlation   <L, R> / (|L| |R|) per clip: 1 for dual mono, -1 for opposite channels, 0 for
                          independent ones
    stereo_width          E[S^2] / E[M^2] per clip: 0 for dual mono, 1 for independent equal channels; a
                          source panned with gains (g_L, g_R) has width ((g_L - g_R) / (g_L + g_R))^2
    stereo_metrics        MR-STFT distance of the side signals and of each channel, and the errors of
                          correlation and width against the real clips'
    stereo_comparison     stereo_metrics of the upmix and of dual mono (side = 0), the baseline that keeps
                          the numbers meaningful, beside the real clips' own correlation and width
    side_embeddings       the side signals through an audio embedder, for a FAD of the side channel
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from presto.models.audio_losses import multi_resolution_stft_loss
from presto.models.upmixer import join_mid_side, split_mid_side

# Keeps correlation and width finite on a silent clip (energies are means of squares of audio in [-1, 1]).
ENERGY_FLOOR = 1e-12


def channel_correlation(stereo: Tensor) -> Tensor:
    """Per clip [B]: the zero-lag inter-channel correlation <L, R> / (|L| |R|); 1 for dual mono."""
    left, right = stereo[:, 0], stereo[:, 1]
    energy = (left.pow(2).sum(-1) * right.pow(2).sum(-1)).clamp_min(ENERGY_FLOOR)
    return (left * right).sum(-1) / energy.sqrt()


def stereo_width(stereo: Tensor) -> Tensor:
    """Per clip [B]: side/mid energy ratio E[S^2] / E[M^2]; 0 for dual mono, 1 for uncorrelated equal channels."""
    mid, side = split_mid_side(stereo)
    return side.pow(2).mean((1, 2)) / mid.pow(2).mean((1, 2)).clamp_min(ENERGY_FLOOR)


@torch.no_grad()
def stereo_metrics(pred: Tensor, real: Tensor, fft_sizes: Sequence[int]) -> dict[str, float]:
    """Upmixed `pred` against `real` stereo [B, 2, N] (same mid): side_stft_distance (MR-STFT distance of the
    side signals), channel_stft_distance (of L and R, averaged), correlation and width (clip means) and their
    mean absolute errors against the real clips'. Every number is a mean over clips."""
    side_pred, side_real = split_mid_side(pred)[1], split_mid_side(real)[1]
    channels = [multi_resolution_stft_loss(pred[:, c:c + 1], real[:, c:c + 1], fft_sizes) for c in (0, 1)]
    corr_pred, corr_real = channel_correlation(pred), channel_correlation(real)
    width_pred, width_real = stereo_width(pred), stereo_width(real)
    return {
        "side_stft_distance": multi_resolution_stft_loss(side_pred, side_real, fft_sizes).item(),
        "channel_stft_distance": (sum(channels) / 2).item(),
        "correlation": corr_pred.mean().item(),
        "correlation_error": (corr_pred - corr_real).abs().mean().item(),
        "width": width_pred.mean().item(),
        "width_error": (width_pred - width_real).abs().mean().item(),
    }


def stereo_comparison(upmixed: Tensor, real: Tensor, fft_sizes: Sequence[int]) -> dict[str, float]:
    """stereo_metrics of `upmixed` (keys `upmix_*`) and of dual mono (keys `dual_mono_*`) against `real`
    stereo [B, 2, N], both made from the real clips' downmix; plus the real clips' own correlation and width
    (`real_*`)."""
    mid = split_mid_side(real)[0]
    ours = stereo_metrics(upmixed, real, fft_sizes)
    dual = stereo_metrics(join_mid_side(mid, torch.zeros_like(mid)), real, fft_sizes)
    return {**{f"upmix_{k}": v for k, v in ours.items()}, **{f"dual_mono_{k}": v for k, v in dual.items()},
            "real_correlation": channel_correlation(real).mean().item(),
            "real_width": stereo_width(real).mean().item()}


def side_embeddings(embedder, stereo: np.ndarray, sample_rate: int) -> np.ndarray:
    """Embeddings [B, D] of the side signals (L - R) / 2 of stereo clips [B, 2, N] (an AudioEmbedder of
    presto.eval.embedders): FAD between two such sets compares stereo images, not the music in the mid."""
    stereo = np.asarray(stereo, dtype=np.float32)
    if stereo.ndim != 3 or stereo.shape[1] != 2:
        raise ValueError(f"stereo audio must be [clips, 2, samples], got shape {stereo.shape}")
    side = split_mid_side(torch.from_numpy(stereo))[1][:, 0]
    return embedder.embed(side.numpy(), sample_rate)
