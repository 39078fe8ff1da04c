"""VAE losses and reconstruction metrics against analytic cases and independent references, and the
multi-scale STFT discriminator (shapes; its update never reaches the generator)."""

from __future__ import annotations

import math

import librosa
import numpy as np
import pytest
import torch

from presto.models.audio_losses import (
    discriminator_adversarial_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    kl_divergence,
    chroma_fft_size,
    chroma_similarity,
    log_mel_l1,
    multi_resolution_stft_loss,
    reconstruction_metrics,
    si_sdr,
    stft_magnitude,
)
from presto.models.discriminators import MultiScaleSTFTDiscriminator, STFTDiscriminatorConfig
from presto.models.vae import AudioVAE, VAEConfig

FFT_SIZES = [128, 256, 512]


def noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_stft_magnitude_of_a_bin_centred_sine():
    # A sine at exactly bin k, amplitude A, Hann window (sum n/2): |X_k| = A/2 * n/2 in interior frames.
    n_fft, k, amp = 256, 10, 0.7
    t = torch.arange(4096, dtype=torch.float64)
    mag = stft_magnitude((amp * torch.sin(2 * math.pi * k * t / n_fft)).view(1, 1, -1), n_fft)
    interior = mag[0, :, 4:-4]
    assert torch.allclose(interior[k], torch.full_like(interior[k], amp * n_fft / 4), rtol=1e-6)
    assert interior[k + 3].max() < 1e-6 * amp * n_fft  # Hann leaks into k +- 1 only


def test_stft_loss_is_zero_for_identical_and_grows_with_noise():
    x = noise(2, 1, 4000)
    assert multi_resolution_stft_loss(x, x, FFT_SIZES).item() == 0.0
    losses = [multi_resolution_stft_loss(x + level * noise(2, 1, 4000, seed=1), x, FFT_SIZES).item()
              for level in (0.01, 0.1, 0.5)]
    assert 0 < losses[0] < losses[1] < losses[2]


def test_stft_loss_of_a_scaled_copy():
    # target = 2 pred: spectral convergence |2S - S| / |2S| = 1/2, log-magnitude L1 = ln 2, at every size.
    x = noise(3, 1, 4000)
    loss = multi_resolution_stft_loss(x, 2 * x, FFT_SIZES)
    assert loss.item() == pytest.approx(0.5 + math.log(2), rel=1e-4)


def test_stft_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differs"):
        multi_resolution_stft_loss(noise(1, 1, 100), noise(1, 1, 200), FFT_SIZES)


def test_kl_of_standard_normal_is_zero():
    assert kl_divergence(torch.zeros(2, 4, 5), torch.ones(2, 4, 5)).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_of_a_known_gaussian():
    mean = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1).expand(2, 3, 4)
    std = torch.tensor([0.3, 1.5, 1.0]).view(1, 3, 1).expand(2, 3, 4)
    closed_form = sum(0.5 * (m**2 + s**2 - 1 - math.log(s**2)) for m, s in [(0.5, 0.3), (-1.0, 1.5), (2.0, 1.0)])
    assert kl_divergence(mean, std).item() == pytest.approx(closed_form, rel=1e-6)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=1).mean()
    assert kl_divergence(mean, std).item() == pytest.approx(reference.item(), rel=1e-6)


def test_hinge_losses_on_known_logits():
    real = [torch.tensor([2.0, 0.5]), torch.tensor([-1.0])]
    fake = [torch.tensor([-2.0, 0.5]), torch.tensor([3.0])]
    # scale 1: relu(1-real) = [0, .5] -> .25; relu(1+fake) = [0, 1.5] -> .75; scale 2: 2 + 4 = 6.
    assert discriminator_adversarial_loss(real, fake).item() == pytest.approx((0.25 + 0.75 + 6.0) / 2)
    # generator: relu(1-fake): [3, .5] -> 1.75; [0] -> 0.
    assert generator_adversarial_loss(fake).item() == pytest.approx(1.75 / 2)
    with pytest.raises(ValueError, match="must match"):
        discriminator_adversarial_loss(real, fake[:1])


def test_feature_matching_on_known_features_and_real_side_detached():
    real = [[torch.zeros(2, 3), torch.ones(4)], [torch.full((5,), 2.0, requires_grad=True)]]
    fake = [[torch.ones(2, 3, requires_grad=True), torch.ones(4, requires_grad=True)],
            [torch.full((5,), -1.0, requires_grad=True)]]
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx((1.0 + 0.0 + 3.0) / 3)
    loss.backward()
    assert real[1][0].grad is None and fake[1][0].grad is not None


def test_si_sdr_closed_form():
    target = noise(2, 8000)
    target = target - target.mean(dim=-1, keepdim=True)
    extra = noise(2, 8000, seed=1)
    # Noise orthogonal to the (zero-mean) target, so the projection of the estimate is exactly a * target.
    extra = extra - extra.mean(dim=-1, keepdim=True)
    extra = extra - (extra * target).sum(-1, keepdim=True) / target.pow(2).sum(-1, keepdim=True) * target
    extra = 0.3 * extra
    a = torch.tensor([[0.5], [2.0]])
    estimate = a * target + extra
    expected = 10 * torch.log10(a.pow(2).squeeze(1) * target.pow(2).sum(-1) / extra.pow(2).sum(-1))
    assert torch.allclose(si_sdr(estimate, target), expected, atol=1e-3)
    # Scale invariance, and a DC offset does not count either.
    assert torch.allclose(si_sdr(7.0 * estimate + 0.2, target), expected, atol=1e-3)
    with pytest.raises(ValueError, match="silent"):
        si_sdr(estimate, torch.zeros_like(target))


def test_log_mel_l1_matches_librosa():
    sr, n_fft, n_mels = 16000, 512, 40
    a, b = noise(1, 1, 8000).double(), noise(1, 1, 8000, seed=1).double() * 0.5

    def librosa_log_mel(x: torch.Tensor) -> np.ndarray:
        mel = librosa.feature.melspectrogram(
            y=x.flatten().numpy(), sr=sr, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels, power=1.0,
            htk=True, norm=None, center=True, pad_mode="reflect",
        )
        return np.log10(np.maximum(mel, 1e-5))

    reference = np.abs(librosa_log_mel(a) - librosa_log_mel(b)).mean()
    assert log_mel_l1(a, b, sr, n_fft, n_mels).item() == pytest.approx(reference, rel=1e-4)
    assert log_mel_l1(a, a, sr, n_fft, n_mels).item() == 0.0


def test_reconstruction_metrics_are_the_functions():
    target = noise(2, 1, 8000)
    pred = target + 0.1 * noise(2, 1, 8000, seed=2)
    metrics = reconstruction_metrics(pred, target, sample_rate=16000, fft_sizes=FFT_SIZES, mel_fft_size=512,
                                     n_mels=40)
    assert metrics == {
        "stft_distance": pytest.approx(multi_resolution_stft_loss(pred, target, FFT_SIZES).item()),
        "mel_l1": pytest.approx(log_mel_l1(pred, target, 16000, 512, 40).item()),
        "si_sdr_db": pytest.approx(si_sdr(pred, target).mean().item()),
        "chroma_similarity": pytest.approx(chroma_similarity(pred, target, 16000).mean().item()),
    }
    assert metrics["si_sdr_db"] == pytest.approx(20.0, abs=0.5)  # noise at -20 dB


def sine(hz: float, seconds: float = 1.0, sr: int = 16000, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * sr)) / sr
    return (amp * torch.sin(2 * torch.pi * hz * t))[None, None]


def test_chroma_fft_size_gives_about_4_hz_bins():
    assert chroma_fft_size(16000) == 4096 and chroma_fft_size(44100) == 8192 and chroma_fft_size(48000) == 16384


def test_chroma_similarity_hears_pitch_classes_not_gain_timbre_or_octave():
    a4, a5, c5 = sine(440.0), sine(880.0), sine(523.25)
    same = lambda x, y: chroma_similarity(x, y, 16000).item()
    assert same(a4, a4) == pytest.approx(1.0, abs=1e-6)
    assert same(0.1 * a4, a4) == pytest.approx(1.0, abs=1e-6)  # gain
    assert same(a5, a4) > 0.95  # octave
    bright = a4 + 0.3 * sine(1320.0) + 0.2 * sine(2200.0)  # harmonics 3 and 5: E and C#, weaker
    assert same(bright, a4) > 0.6
    assert same(c5, a4) < 0.1  # a minor third away: another pitch class
    # Two clips in a batch are scored separately, and a silent target frame is left out.
    batch = torch.cat([a4, c5])
    assert chroma_similarity(batch, torch.cat([a4, a4]), 16000).tolist() == pytest.approx([1.0, same(c5, a4)])
    half = torch.cat([a4[..., :8000], torch.zeros(1, 1, 8000)], dim=-1)
    # Counted, the silent frames would score 0 and pull the mean to about 0.5; only the frames whose window
    # straddles the switch see both notes.
    assert same(half + torch.cat([torch.zeros(1, 1, 8000), c5[..., :8000]], dim=-1), half) > 0.8


def test_chroma_similarity_of_a_clip_shorter_than_the_fft():
    short = sine(440.0, seconds=0.05)
    assert chroma_similarity(short, short, 16000).item() == pytest.approx(1.0, abs=1e-6)


DISC = STFTDiscriminatorConfig(channels=4, fft_sizes=[128, 256], dilations=[1, 2])


def test_discriminator_shapes():
    torch.manual_seed(0)
    disc = MultiScaleSTFTDiscriminator(DISC)
    logits, features = disc(noise(2, 1, 2048))
    assert len(logits) == len(features) == 2
    for n_fft, scale_logits, scale_features in zip(DISC.fft_sizes, logits, features):
        bins, frames = n_fft // 2 + 1, 2048 // (n_fft // 4) + 1
        assert len(scale_features) == len(DISC.dilations) + 2  # input conv, strided convs, last hidden conv
        assert scale_features[0].shape == (2, 4, bins, frames)
        # Each strided layer halves the frequency axis (kernel 3, padding 1, stride 2: ceil(F / 2)).
        expected_bins = bins
        for _ in DISC.dilations:
            expected_bins = -(-expected_bins // 2)
        assert scale_logits.shape == (2, 1, expected_bins, frames)
    with pytest.raises(ValueError, match="mono"):
        disc(noise(2, 2048))


def test_discriminator_update_never_reaches_the_generator():
    torch.manual_seed(0)
    vae = AudioVAE(VAEConfig(channels=4, channel_multipliers=[2, 4], strides=[4, 4], latent_channels=4,
                             dilations=[1, 3], kernel_size=7))
    disc = MultiScaleSTFTDiscriminator(DISC)
    real = noise(2, 1, 2048)
    fake, _, _ = vae(real)
    real_logits, _ = disc(real)
    fake_logits, _ = disc(fake.detach())
    discriminator_adversarial_loss(real_logits, fake_logits).backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in disc.parameters())

    # The generator's turn: its adversarial + feature-matching loss reaches every generator weight.
    disc.zero_grad(set_to_none=True)
    fake_logits, fake_features = disc(fake)
    with torch.no_grad():
        _, real_features = disc(real)
    (generator_adversarial_loss(fake_logits) + feature_matching_loss(real_features, fake_features)).backward()
    assert all(p.grad is not None for p in vae.parameters())
