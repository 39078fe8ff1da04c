"""Training the audio VAE: reconstruction + KL, then adversarially against a multi-scale STFT discriminator.

Every iteration is one generator (VAE) step and, from `disc_start_step` on, one discriminator step, each
with its own Adam optimiser:

    generator:      L_G = w_stft * MR-STFT(x_hat, x) + w_kl * KL(q(z|x) || N(0, I))
                          [+ w_adv * hinge_G(D(x_hat)) + w_fm * FM(D(x), D(x_hat))   once D has started]
    discriminator:  L_D = hinge_D(D(x), D(stopgrad(x_hat)))

The generator's adversarial terms read D with D's parameters frozen (no gradient is built for them), and
the discriminator reads the reconstruction detached (its backward never reaches the VAE). Both steps use
the same reconstruction, and each clips its gradient norm at `grad_clip` (the log-magnitude terms give rare,
huge gradients when a predicted bin is near zero). After each generator step the EMA of the VAE's weights is updated; the EMA is what
gets evaluated and exported.

Also here: reconstruction metrics of a VAE over a set of clips, and the trivial codec they are compared
with (resampling down to as many numbers per second as the latents hold, and back up).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from presto.audio.io import resample
from presto.errors import InputError
from presto.models.audio_losses import kl_divergence, multi_resolution_stft_loss, reconstruction_metrics
from presto.models.discriminators import MultiScaleSTFTDiscriminator
from presto.models.ema import EMA
from presto.models.vae import AudioVAE
from presto.training.adversarial import discriminator_update, generator_adversarial_terms


@dataclass(frozen=True)
class VAELossWeights:
    stft: float
    kl: float
    adversarial: float
    feature_matching: float


class VAETrainer:
    """The VAE, its discriminator, one optimiser for each, and the EMA of the VAE's weights.

    `step` counts iterations; the discriminator (and the generator's adversarial terms) start at
    `disc_start_step`. Resumable state: `modules()` and `optimizers()` (for presto.training.state), `step`.
    """

    def __init__(self, vae: AudioVAE, discriminator: MultiScaleSTFTDiscriminator, *, lr: float,
                 betas: tuple[float, float], weights: VAELossWeights, fft_sizes: Sequence[int],
                 grad_clip: float, disc_start_step: int, ema_decay: float):
        self.vae, self.discriminator = vae, discriminator
        self.weights, self.fft_sizes, self.disc_start_step = weights, list(fft_sizes), disc_start_step
        self.grad_clip = grad_clip
        self.opt_g = torch.optim.Adam(vae.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
        self.ema = EMA(vae, ema_decay)
        self.step = 0

    @property
    def adversarial(self) -> bool:
        return self.step >= self.disc_start_step

    def modules(self) -> dict[str, object]:
        # The EMA is saved like a module: it has state_dict / load_state_dict of plain tensors.
        return {"vae": self.vae, "discriminator": self.discriminator, "ema": self.ema}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    def generator_step(self, audio: Tensor) -> tuple[dict[str, float], Tensor]:
        """One optimiser step of the VAE on audio [B, 1, N]; returns (losses, reconstruction)."""
        self.vae.train()
        recon, mean, std = self.vae(audio)
        stft = multi_resolution_stft_loss(recon, audio, self.fft_sizes)
        kl = kl_divergence(mean, std)
        loss = self.weights.stft * stft + self.weights.kl * kl
        logs = {"stft": stft.item(), "kl": kl.item()}
        if self.adversarial:
            adv, fm = generator_adversarial_terms(self.discriminator, audio, recon)
            loss = loss + self.weights.adversarial * adv + self.weights.feature_matching * fm
            logs |= {"adv_g": adv.item(), "feature_matching": fm.item()}
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.grad_clip)
        self.opt_g.step()
        self.ema.update(self.vae)
        logs |= {"loss_g": loss.item(), "grad_norm_g": norm.item()}
        return logs, recon

    def discriminator_step(self, audio: Tensor, recon: Tensor) -> dict[str, float]:
        """One optimiser step of the discriminator: real `audio` against the detached `recon`."""
        return discriminator_update(self.discriminator, self.opt_d, audio, recon, self.grad_clip)

    def train_step(self, audio: Tensor) -> dict[str, float]:
        """One iteration: a generator step, then a discriminator step once it has started."""
        if not torch.isfinite(audio).all():  # refused before it can reach the weights
            bad = int((~torch.isfinite(audio)).sum())
            raise InputError(f"step {self.step + 1}: the input audio batch holds NaN or Inf ({bad} of "
                             f"{audio.numel()} samples); training stopped, the last good checkpoint is kept")
        logs, recon = self.generator_step(audio)
        if self.adversarial:
            logs |= self.discriminator_step(audio, recon)
        self.step += 1
        return logs

    def ema_model(self) -> AudioVAE:
        """A copy of the VAE holding the EMA weights, in eval mode."""
        model = copy.deepcopy(self.vae)
        self.ema.copy_to(model)
        return model.eval()


def resampling_codec(audio: np.ndarray, sample_rate: int, values_per_second: float) -> np.ndarray:
    """The trivial codec at a given data rate: resample [n] audio down to `values_per_second` Hz and back.

    It keeps exactly the content below values_per_second / 2 (Nyquist), so it is the reference a learned
    codec holding as many numbers per second must beat. At or above the audio's own rate it is the identity.
    """
    low = int(round(values_per_second))
    if low >= sample_rate:
        return np.asarray(audio, dtype=np.float32).copy()
    back = resample(resample(audio, sample_rate, low), low, sample_rate)
    out = np.zeros(len(audio), dtype=np.float32)
    out[:min(len(back), len(audio))] = back[:len(audio)]
    return out


@torch.no_grad()
def reconstruct(vae: AudioVAE, audio: Tensor, batch: int) -> Tensor:
    """Decode of the posterior mean of audio [B, 1, N] (N a multiple of hop_length), `batch` clips at a time."""
    vae.eval()
    return torch.cat([vae.decode(vae.encode(audio[i:i + batch])[0]) for i in range(0, len(audio), batch)])


def latent_values_per_second(vae: AudioVAE, sample_rate: int) -> float:
    """Numbers per second of audio the latents hold: latent_channels * sample_rate / hop_length."""
    return vae.config.latent_channels * sample_rate / vae.hop_length


def codec_comparison(vae: AudioVAE, audio: Tensor, *, sample_rate: int, batch: int, fft_sizes: Sequence[int],
                     mel_fft_size: int, n_mels: int) -> dict[str, float]:
    """Reconstruction metrics (stft_distance, mel_l1, si_sdr_db; means over clips) of the VAE's posterior-mean
    reconstruction (keys `vae_*`) and of the resampling codec at the latents' data rate (keys `resample_*`),
    on the same clips [B, 1, N]."""
    rate = latent_values_per_second(vae, sample_rate)
    baseline = torch.stack([torch.from_numpy(resampling_codec(clip[0].cpu().numpy(), sample_rate, rate))
                            for clip in audio])[:, None].to(audio)
    settings = dict(sample_rate=sample_rate, fft_sizes=fft_sizes, mel_fft_size=mel_fft_size, n_mels=n_mels)
    ours = reconstruction_metrics(reconstruct(vae, audio, batch), audio, **settings)
    theirs = reconstruction_metrics(baseline, audio, **settings)
    return {**{f"vae_{k}": v for k, v in ours.items()}, **{f"resample_{k}": v for k, v in theirs.items()}}
