"""The stereo metrics of presto/eval/stereo.py against analytic cases: dual mono, opposite channels, two
orthogonal sources mixed with known gains (a pan law), and the side signal an embedder gets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from presto.eval.stereo import (
    channel_correlation,
    side_embeddings,
    stereo_comparison,
    stereo_metrics,
    stereo_width,
)

N = 4000
FFT_SIZES = [64, 128, 256]


def orthogonal_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sines of whole periods over N samples: <x, y> = 0 and |x|^2 = |y|^2 = N / 2 exactly (in theory;
    float64 here, so to ~1e-12)."""
    n = torch.arange(N, dtype=torch.float64)
    return torch.sin(2 * math.pi * 3 * n / N), torch.sin(2 * math.pi * 5 * n / N)


def mix(a: float, b: float) -> torch.Tensor:
    """[1, 2, N]: source x at gains (a, b) and source y at (b, a): L = a x + b y, R = b x + a y."""
    x, y = orthogonal_pair()
    return torch.stack([a * x + b * y, b * x + a * y])[None]


def panned(gain_left: float, gain_right: float) -> torch.Tensor:
    """[1, 2, N]: one source x at (gain_left, gain_right)."""
    x, _ = orthogonal_pair()
    return torch.stack([gain_left * x, gain_right * x])[None]


def test_dual_mono_correlates_fully_and_has_no_width():
    dual = panned(0.5, 0.5)
    assert channel_correlation(dual).item() == pytest.approx(1.0, abs=1e-12)
    assert stereo_width(dual).item() == 0.0


def test_opposite_channels_anticorrelate_and_width_stays_finite():
    opposite = panned(0.5, -0.5)  # all side, no mid: a huge width, not a division by zero
    assert channel_correlation(opposite).item() == pytest.approx(-1.0, abs=1e-12)
    assert math.isfinite(stereo_width(opposite).item()) and stereo_width(opposite).item() > 1e6


@pytest.mark.parametrize("a, b", [(1.0, 0.0), (0.9, 0.3), (0.6, 0.5), (0.7, 0.7)])
def test_two_orthogonal_sources_give_the_analytic_correlation_and_width(a, b):
    # <L, R> = 2ab N/2, |L|^2 = |R|^2 = (a^2 + b^2) N/2;  S = (a - b)(x - y)/2, M = (a + b)(x + y)/2
    stereo = mix(a, b)
    assert channel_correlation(stereo).item() == pytest.approx(2 * a * b / (a * a + b * b), abs=1e-9)
    assert stereo_width(stereo).item() == pytest.approx(((a - b) / (a + b)) ** 2, abs=1e-9)


@pytest.mark.parametrize("theta", [0.0, math.pi / 8, math.pi / 4, 3 * math.pi / 8])
def test_constant_power_pan_law_gives_a_known_width(theta):
    # gains (cos t, sin t): S / M = (cos t - sin t) / (cos t + sin t) = tan(pi/4 - t)
    stereo = panned(math.cos(theta), math.sin(theta))
    assert stereo_width(stereo).item() == pytest.approx(math.tan(math.pi / 4 - theta) ** 2, abs=1e-9)
    if theta > 0:  # one source in both channels: fully correlated at any pan position
        assert channel_correlation(stereo).item() == pytest.approx(1.0, abs=1e-9)
    else:  # hard left: the silent right channel correlates with nothing
        assert channel_correlation(stereo).item() == 0.0


def test_metrics_of_the_real_stereo_itself_are_perfect():
    real = torch.cat([mix(0.9, 0.3), mix(0.6, 0.5)]).float()
    scores = stereo_metrics(real, real, FFT_SIZES)
    assert scores["side_stft_distance"] == pytest.approx(0.0, abs=1e-6)
    assert scores["channel_stft_distance"] == pytest.approx(0.0, abs=1e-6)
    assert scores["correlation_error"] == scores["width_error"] == 0.0


def test_dual_mono_against_a_known_mix_misses_its_correlation_and_width_exactly():
    a, b = 0.9, 0.3
    real = mix(a, b).float()
    mid = real.mean(1, keepdim=True)
    scores = stereo_comparison(real, real, FFT_SIZES)  # a perfect upmix beside dual mono
    assert scores["dual_mono_correlation"] == pytest.approx(1.0) and scores["dual_mono_width"] == 0.0
    assert scores["dual_mono_correlation_error"] == pytest.approx(1 - 2 * a * b / (a * a + b * b), abs=1e-5)
    assert scores["dual_mono_width_error"] == pytest.approx(((a - b) / (a + b)) ** 2, abs=1e-5)
    assert scores["real_width"] == pytest.approx(((a - b) / (a + b)) ** 2, abs=1e-5)
    assert scores["upmix_side_stft_distance"] == pytest.approx(0.0, abs=1e-6)
    assert scores["upmix_width_error"] == 0.0 < scores["dual_mono_side_stft_distance"]
    dual = torch.cat([mid, mid], 1)
    assert scores["dual_mono_side_stft_distance"] == pytest.approx(
        stereo_metrics(dual, real, FFT_SIZES)["side_stft_distance"])


class Recorder:
    """An embedder whose embedding is the clip's first samples, so the test sees what it was given."""

    def embed(self, audio, sr):
        self.sr = sr
        return np.asarray(audio, dtype=np.float64)[:, :3]


def test_side_embeddings_embed_half_the_channel_difference():
    stereo = np.array([[[0.5, 0.2, -0.1, 0.0], [0.1, 0.2, 0.3, 0.0]]], dtype=np.float32)
    embedder = Recorder()
    out = side_embeddings(embedder, stereo, 8000)
    np.testing.assert_allclose(out, [[0.2, 0.0, -0.2]], atol=1e-7)
    assert embedder.sr == 8000
    with pytest.raises(ValueError, match=r"\[clips, 2, samples\]"):
        side_embeddings(embedder, stereo[:, :1], 8000)
