"""The audio VAE: shapes and hop, Snake, chunked long-audio processing, a short overfit, weights on disk,
and the EMA of weights."""

from __future__ import annotations

import math

import pytest
import torch

from presto.errors import InputError
from presto.models.audio_losses import multi_resolution_stft_loss
from presto.models.checkpoint import load_model, save_model
from presto.models.ema import EMA
from presto.models.vae import AudioVAE, Snake, VAEConfig

TINY = dict(channels=4, channel_multipliers=[2, 4, 8], strides=[2, 4, 4], latent_channels=8,
            dilations=[1, 3, 9], kernel_size=7)
PAPER = dict(channels=128, channel_multipliers=[1, 2, 4, 8, 16], strides=[2, 4, 4, 8, 8], latent_channels=64,
             dilations=[1, 3, 9], kernel_size=7)


def tiny_vae(seed: int = 0, **changes) -> AudioVAE:
    torch.manual_seed(seed)
    return AudioVAE(VAEConfig(**{**TINY, **changes})).eval()


def test_shapes_and_hop():
    vae = tiny_vae()
    assert vae.hop_length == 32
    audio = torch.randn(3, 1, 32 * 20)
    mean, std = vae.encode(audio)
    assert mean.shape == std.shape == (3, 8, 20)
    assert (std > 0).all()
    assert vae.decode(mean).shape == (3, 1, 640)
    recon, mean2, _ = vae(audio)
    assert recon.shape == audio.shape and torch.equal(mean, mean2)


def test_odd_stride_keeps_lengths_exact():
    vae = tiny_vae(strides=[3, 2, 5])
    assert vae.hop_length == 30
    mean, _ = vae.encode(torch.randn(1, 1, 30 * 7))
    assert mean.shape[-1] == 7
    assert vae.decode(mean).shape[-1] == 210


def test_paper_profile_hop_and_frame_rate():
    with torch.device("meta"):  # the paper-size network, without allocating its weights
        vae = AudioVAE(VAEConfig(**PAPER))
    assert vae.hop_length == 2048
    assert 44100 / vae.hop_length == pytest.approx(21.53, abs=0.01)
    z = torch.empty(1, 64, 5, device="meta")
    assert vae.decode(z).shape == (1, 1, 5 * 2048)


def test_bad_inputs_are_named():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="multiple of hop_length 32"):
        vae.encode(torch.randn(1, 1, 100))
    with pytest.raises(ValueError, match="mono"):
        vae.encode(torch.randn(1, 2, 64))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="chunk_frames"):
        vae.decode_long(torch.randn(1, 8, 4), 0, 2)
    with pytest.raises(ValueError, match="no latent frames"):
        vae.encode_long(torch.randn(1, 1, 0), 4)


def test_config_rejects_mismatched_stages():
    with pytest.raises(ValueError, match="one multiplier per stride"):
        VAEConfig(**{**TINY, "channel_multipliers": [2, 4]})
    with pytest.raises(ValueError, match="odd"):
        VAEConfig(**{**TINY, "kernel_size": 6})
    with pytest.raises(ValueError, match="strides"):
        VAEConfig(**{**TINY, "strides": [1, 4, 4]})
    with pytest.raises(ValueError, match="extra"):
        VAEConfig(**TINY, latent_size=3)


def test_snake_matches_formula_and_gradient():
    snake = Snake(3).double()
    with torch.no_grad():
        snake.log_alpha.copy_(torch.tensor([-1.0, 0.0, 1.5], dtype=torch.float64).view(1, 3, 1))
    x = torch.linspace(-4, 4, 50, dtype=torch.float64).repeat(2, 3, 1)
    alpha = torch.tensor([math.exp(-1.0), 1.0, math.exp(1.5)], dtype=torch.float64).view(1, 3, 1)
    assert torch.allclose(snake(x), x + torch.sin(alpha * x) ** 2 / alpha)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(snake, (x,))


def test_snake_is_finite_when_alpha_underflows():
    snake = Snake(1)
    with torch.no_grad():
        snake.log_alpha.fill_(-200.0)  # exp underflows to 0 in float32
    x = torch.linspace(-3, 3, 11).view(1, 1, -1).requires_grad_(True)
    y = snake(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(snake.log_alpha.grad).all()
    assert torch.allclose(y, x, atol=1e-6)  # alpha -> 0: snake(x) -> x


def _boundary_jumps(signal: torch.Tensor, boundaries: list[int]) -> torch.Tensor:
    """First difference across each chunk boundary."""
    return torch.stack([signal[..., b] - signal[..., b - 1] for b in boundaries], dim=-1)


def test_context_frames_bounds_the_receptive_field():
    """Perturb one latent frame (or one frame's audio): nothing beyond context_frames away may change."""
    vae = tiny_vae()
    hop, ctx = vae.hop_length, vae.context_frames
    assert ctx == 20  # decoder: 3*32 + (8+39)*8 + (8+39)*2 + (4+39) + 3 = 612 samples -> 20 frames
    z = torch.zeros(1, 8, 2 * ctx + 11, requires_grad=True)
    vae.decode(z)[..., 30 * hop:31 * hop].abs().sum().backward()
    reach = z.grad.abs().sum(dim=1)[0].nonzero().flatten()
    assert reach.min() >= 30 - ctx and reach.max() <= 30 + ctx
    audio = torch.zeros(1, 1, hop * (2 * ctx + 11), requires_grad=True)
    vae.encode(audio)[0][..., 30].abs().sum().backward()
    reach = audio.grad[0, 0].nonzero().flatten()
    assert reach.min() >= (30 - ctx) * hop and reach.max() < (31 + ctx) * hop
    with torch.device("meta"):
        assert AudioVAE(VAEConfig(**PAPER)).context_frames == 11


@torch.no_grad()
def test_chunked_encode_matches_whole():
    vae = tiny_vae()
    audio = torch.randn(2, 1, 32 * 50 + 7)  # not a whole number of frames: encode_long pads
    padded = torch.nn.functional.pad(audio, (0, 32 - 7))
    mean, std = vae.encode(padded)
    mean_c, std_c = vae.encode_long(audio, chunk_frames=9)  # context_frames of overlap
    assert mean_c.shape == mean.shape == (2, 8, 51)
    assert torch.allclose(mean_c, mean, atol=1e-5) and torch.allclose(std_c, std, atol=1e-5)
    # Without context the chunk edges see zero padding instead of audio: the test above can fail.
    mean_0, _ = vae.encode_long(audio, chunk_frames=9, overlap_frames=0)
    assert (mean_0 - mean).abs().max() > 1e-2


def mirrored(audio: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """numpy's reflect padding (it mirrors back and forth when the pad exceeds the signal): the reference."""
    import numpy as np

    return torch.from_numpy(np.pad(audio.numpy(), [(0, 0), (0, 0), (left, right)], mode="reflect"))


@torch.no_grad()
def test_mirror_edges_encodes_the_mirrored_signal_and_drops_the_margin():
    vae = tiny_vae()
    hop, ctx = vae.hop_length, vae.context_frames
    audio = torch.randn(2, 1, 32 * 40 + 5)
    expected_mean, expected_std = vae.encode(mirrored(audio, ctx * hop, ctx * hop + 32 - 5))
    mean, std = vae.encode_long(audio, chunk_frames=7, mirror_edges=True)
    assert mean.shape == (2, 8, 41)
    torch.testing.assert_close(mean, expected_mean[..., ctx:ctx + 41], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, expected_std[..., ctx:ctx + 41], atol=1e-5, rtol=1e-5)
    # Interior frames, out of reach of either boundary, do not depend on how the edges are treated.
    plain, _ = vae.encode_long(audio, chunk_frames=7)
    torch.testing.assert_close(mean[..., ctx:-ctx - 1], plain[..., ctx:-ctx - 1], atol=1e-5, rtol=1e-5)
    assert (mean[..., 0] - plain[..., 0]).abs().max() > 1e-3


@torch.no_grad()
def test_mirror_edges_of_a_clip_shorter_than_the_margin():
    vae = tiny_vae()
    hop, ctx = vae.hop_length, vae.context_frames
    audio = torch.randn(1, 1, 3 * hop)  # shorter than context_frames * hop: mirrored back and forth
    assert 3 < ctx
    expected, _ = vae.encode(mirrored(audio, ctx * hop, ctx * hop))
    mean, _ = vae.encode_long(audio, chunk_frames=2, mirror_edges=True)
    torch.testing.assert_close(mean, expected[..., ctx:ctx + 3], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_chunked_decode_matches_whole_without_seams():
    vae = tiny_vae()
    z = torch.randn(2, 8, 60)
    whole = vae.decode(z)
    chunk = 11
    boundaries = [a * vae.hop_length for a in range(chunk, 60, chunk)]
    chunked = vae.decode_long(z, chunk_frames=chunk)  # context_frames of overlap
    assert chunked.shape == whole.shape
    scale = whole.abs().max()
    assert (chunked - whole).abs().max() < 1e-5 * scale
    # No seam: the step across every chunk boundary is the whole-signal step.
    assert torch.allclose(_boundary_jumps(chunked, boundaries), _boundary_jumps(whole, boundaries),
                          atol=1e-5 * scale)
    # With no overlap the chunk edges decode against zero padding: the seam check above can fail.
    seamed = vae.decode_long(z, chunk_frames=chunk, overlap_frames=0)
    assert (_boundary_jumps(seamed, boundaries) - _boundary_jumps(whole, boundaries)).abs().max() > 1e-2 * scale


def test_short_overfit_lowers_stft_loss():
    sr, n = 16000, 8000  # 0.5 s
    t = torch.arange(n) / sr
    clip = (0.3 * torch.sin(2 * math.pi * 220 * t) + 0.2 * torch.sin(2 * math.pi * 330 * t)
            + 0.1 * torch.sin(2 * math.pi * 880 * t)).view(1, 1, n)
    torch.manual_seed(0)
    vae = AudioVAE(VAEConfig(channels=4, channel_multipliers=[1, 2, 4], strides=[4, 4, 4], latent_channels=8,
                             dilations=[1, 3, 9], kernel_size=7))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    fft_sizes = [256, 512, 1024]
    losses = []
    for _ in range(24):
        recon, mean, std = vae(clip)
        loss = multi_resolution_stft_loss(recon, clip, fft_sizes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3


def test_weights_round_trip_through_checkpoint(tmp_path):
    vae = tiny_vae(seed=3)
    save_model(vae, vae.config, tmp_path / "vae")
    loaded, cfg = load_model(tmp_path / "vae")
    assert isinstance(loaded, AudioVAE) and cfg == vae.config
    audio = torch.randn(1, 1, 32 * 8)
    with torch.no_grad():
        assert torch.equal(loaded.encode(audio)[0], vae.encode(audio)[0])


def test_ema_follows_its_recurrence(tmp_path):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    decay = 0.9
    ema = EMA(model, decay)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.bias.fill_(-2.0)
    for _ in range(5):
        ema.update(model)
    # A constant target p from s0: s_k = p + decay^k (s0 - p).
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 3.0 + decay**5 * (1.0 - 3.0)))
    assert torch.allclose(ema.shadow["bias"], torch.full((2,), -2.0 + decay**5 * (0.0 + 2.0)))

    ema.save(tmp_path / "ema.safetensors")
    restored = EMA(torch.nn.Linear(3, 2), decay)
    restored.load(tmp_path / "ema.safetensors")
    target = torch.nn.Linear(3, 2)
    restored.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"]) and torch.equal(target.bias, ema.shadow["bias"])
    with pytest.raises(ValueError, match="does not fit"):
        EMA(torch.nn.Linear(3, 2, bias=False), decay).load(tmp_path / "ema.safetensors")
    with pytest.raises(InputError, match="not found"):
        restored.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0)


def test_ema_copies_buffers():
    model = torch.nn.BatchNorm1d(2)
    ema = EMA(model, 0.99)
    model.train()
    model(torch.randn(8, 2) + 5.0)
    ema.update(model)
    assert torch.equal(ema.shadow["running_mean"], model.running_mean)
    assert ema.shadow["num_batches_tracked"] == 1


@torch.no_grad()
def test_posterior_std_is_the_shifted_softplus_and_starts_below_the_means_spread():
    from presto.models.vae import MIN_STD, STD_SHIFT

    vae = tiny_vae()
    audio = 0.3 * torch.randn(2, 1, 32 * 40)
    mean, std = vae.encode(audio)
    raw_mean, pre_scale = vae.encoder(audio).chunk(2, dim=1)
    torch.testing.assert_close(mean, raw_mean)
    torch.testing.assert_close(std, torch.nn.functional.softplus(pre_scale + STD_SHIFT) + MIN_STD)
    # What the shift is for: a fresh encoder's latents are not drowned by the posterior's noise.
    assert std.mean() < mean.std(dim=(0, 2)).mean()
