"""The mono-to-stereo upmixer: the downmix is the input, shapes, the training step's generator/discriminator
split, learning a panned mix well beyond dual mono (presto/eval/stereo.py's metrics; their analytic cases are in
test_stereo_metrics.py), and loading for generation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from presto.errors import InputError
from presto.eval.stereo import stereo_comparison
from presto.models.checkpoint import save_model
from presto.models.discriminators import MultiScaleSTFTDiscriminator, STFTDiscriminatorConfig
from presto.models.upmixer import (
    INFO_FILE,
    MODEL_DIR,
    Upmixer,
    UpmixerConfig,
    join_mid_side,
    load_upmixer,
    split_mid_side,
    upmix,
)
from presto.training.upmix_trainer import UpmixLossWeights, UpmixTrainer, upmix_batched

SR = 16000
TINY_UPMIXER = UpmixerConfig(channels=4, channel_multipliers=[2, 4], strides=[4, 4], dilations=[1, 3],
                             kernel_size=7)  # hop 16
TINY_DISC = STFTDiscriminatorConfig(channels=4, fft_sizes=[64, 128], dilations=[1, 2])
FFT_SIZES = [64, 128, 256]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def panned(n: int, samples: int, seed: int = 0) -> torch.Tensor:
    """Stereo [n, 2, samples]: a low tone panned left and a high tone panned right, at random pitches and
    levels. Its side signal is a fixed filter of its mid (low band +, high band -), so it can be learnt."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / SR
    clips = []
    for _ in range(n):
        low_f = 110.0 * 2 ** (torch.randint(0, 12, (), generator=g) / 12)
        high_f = 1760.0 * 2 ** (torch.randint(0, 12, (), generator=g) / 12)
        a, b = 0.1 + 0.2 * torch.rand(2, generator=g)
        low, high = a * torch.sin(2 * math.pi * low_f * t), b * torch.sin(2 * math.pi * high_f * t)
        clips.append(torch.stack([0.9 * low + 0.3 * high, 0.3 * low + 0.9 * high]))
    return torch.stack(clips)


def trainer(disc_start_step: int = 0, lr: float = 1e-3, seed: int = 0) -> UpmixTrainer:
    torch.manual_seed(seed)
    return UpmixTrainer(Upmixer(TINY_UPMIXER), MultiScaleSTFTDiscriminator(TINY_DISC), lr=lr, betas=(0.8, 0.99),
                        weights=UpmixLossWeights(1.0, 1.0, 0.1, 1.0), fft_sizes=FFT_SIZES, grad_clip=1e3,
                        disc_start_step=disc_start_step)


# --- the model ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("samples", [1024, 1000, 37])
def test_stereo_shapes_and_the_downmix_is_the_input(samples):
    torch.manual_seed(0)
    model = Upmixer(TINY_UPMIXER)
    mono = 0.5 * torch.randn(3, 1, samples)
    assert model(mono).shape == (3, 1, samples)  # lengths that are no multiple of the hop are cropped back
    stereo = model.stereo(mono)
    assert stereo.shape == (3, 2, samples)
    # By construction, up to one float32 rounding of (m + s) and (m - s).
    torch.testing.assert_close((stereo[:, 0] + stereo[:, 1]) / 2, mono[:, 0], rtol=0, atol=1e-6)
    assert (stereo[:, 0] - stereo[:, 1]).abs().max() > 0  # and it is not dual mono


def test_mid_side_round_trip():
    stereo = torch.randn(2, 2, 100)
    mid, side = split_mid_side(stereo)
    torch.testing.assert_close(join_mid_side(mid, side), stereo)


def test_upmixer_refuses_stereo_input():
    with pytest.raises(ValueError, match=r"\[batch, 1, samples\]"):
        Upmixer(TINY_UPMIXER)(torch.zeros(1, 2, 64))


def test_config_is_checked():
    with pytest.raises(ValueError, match="one multiplier per stride"):
        UpmixerConfig(channels=4, channel_multipliers=[2], strides=[4, 4], dilations=[1], kernel_size=7)


# --- training ----------------------------------------------------------------------------------------------

def test_discriminator_step_leaves_the_generator_alone():
    t = trainer()
    stereo = panned(2, 1024)
    _, side_hat = t.generator_step(stereo)
    assert all(p.grad is None for p in t.discriminator.parameters())  # G's adversarial terms read D frozen
    grads = {n: p.grad.clone() for n, p in t.upmixer.named_parameters()}
    weights = {n: p.detach().clone() for n, p in t.upmixer.named_parameters()}
    t.discriminator_step(split_mid_side(stereo)[1], side_hat)
    for n, p in t.upmixer.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), weights[n]), n
    assert all(p.grad is not None for p in t.discriminator.parameters())


def test_adversarial_terms_start_after_the_warm_up_and_no_step_is_lost():
    t = trainer(disc_start_step=2)
    stereo = panned(2, 1024)
    logs = [t.train_step(stereo) for _ in range(4)]
    assert "adv_g" not in logs[1] and "loss_d" not in logs[1]
    assert {"adv_g", "feature_matching", "loss_d"} <= logs[2].keys()
    last = logs[3]
    expected = last["side_stft"] + last["channel_stft"] + 0.1 * last["adv_g"] + last["feature_matching"]
    assert last["loss_g"] == pytest.approx(expected, rel=1e-5)
    assert {int(s["step"]) for s in t.opt_g.state.values()} == {4}
    assert {int(s["step"]) for s in t.opt_d.state.values()} == {2}


def test_non_finite_input_is_refused():
    stereo = panned(1, 1024)
    stereo[0, 1, 5] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf"):
        trainer().train_step(stereo)


def test_learns_a_panned_mix_far_beyond_dual_mono():
    t = trainer(disc_start_step=10_000, lr=3e-3)
    train = panned(8, 2048, seed=1)
    for _ in range(120):
        t.train_step(train)
    real = panned(4, 2048, seed=2)
    scores = stereo_comparison(upmix_batched(t.upmixer, split_mid_side(real)[0], 4), real, FFT_SIZES)
    # Measured 0.30 (the log-magnitude term keeps it from 0: the real side of two pure tones is ~silent
    # between them, and any leakage there costs ln of the magnitude floor); width and correlation ~0.1.
    assert scores["upmix_side_stft_distance"] < 0.4 * scores["dual_mono_side_stft_distance"]
    assert scores["upmix_width_error"] < 0.3 * scores["dual_mono_width_error"]
    assert scores["upmix_correlation_error"] < 0.3 * scores["dual_mono_correlation_error"]


# --- loading and upmixing for generation -------------------------------------------------------------------

def test_load_and_upmix(tmp_path):
    model = Upmixer(TINY_UPMIXER).eval()
    save_model(model, TINY_UPMIXER, tmp_path / MODEL_DIR)
    (tmp_path / INFO_FILE).write_text(json.dumps({"sample_rate": SR}))
    loaded = load_upmixer(tmp_path, sample_rate=SR)
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 1000)).astype(np.float32)
    stereo, ms = upmix(loaded, audio)
    assert stereo.shape == (2, 2, 1000) and stereo.dtype == np.float32 and ms >= 0
    with torch.no_grad():
        np.testing.assert_allclose(stereo, model.stereo(torch.from_numpy(audio)[:, None]).numpy(), atol=1e-6)
    with pytest.raises(InputError, match="trained at 16000 Hz, the audio is at 44100 Hz"):
        load_upmixer(tmp_path, sample_rate=44100)
    with pytest.raises(InputError, match="run the train_stereo stage"):
        load_upmixer(tmp_path / "nowhere", sample_rate=SR)
