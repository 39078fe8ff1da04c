"""Training the mono-to-stereo upmixer: STFT losses on the side signal and the channels, then adversarially.

The upmixer gets the mid M = (L + R) / 2 of a real stereo crop and predicts its side S = (L - R) / 2. Every
iteration is one generator step and, from `disc_start_step` on, one discriminator step, each with its own
Adam optimiser (the pattern of presto/training/vae_trainer.py):

    generator:      L_G = w_side * MR-STFT(S_hat, S) + w_channels * (MR-STFT(L_hat, L) + MR-STFT(R_hat, R)) / 2
                          [+ w_adv * hinge_G(D(S_hat)) + w_fm * FM(D(S), D(S_hat))   once D has started]
    discriminator:  L_D = hinge_D(D(S), D(stopgrad(S_hat)))

The discriminator judges side signals: the mid is given exactly, so the side is all the upmixer makes. The
generator reads D with D's parameters frozen; D reads the prediction detached, so its backward never reaches
the upmixer. Both steps clip their gradient norm at `grad_clip`.

Also here: the stereo metrics of upmixed against real stereo, and the dual-mono baseline (side = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from presto.errors import InputError
from presto.models.audio_losses import multi_resolution_stft_loss
from presto.models.discriminators import MultiScaleSTFTDiscriminator
from presto.models.upmixer import Upmixer, join_mid_side, split_mid_side
from presto.training.adversarial import discriminator_update, generator_adversarial_terms

# Keeps correlation and width finite on a silent clip (energies are means of squares of audio in [-1, 1]).
ENERGY_FLOOR = 1e-12


@dataclass(frozen=True)
class UpmixLossWeights:
    side: float
    channels: float
    adversarial: float
    feature_matching: float


class UpmixTrainer:
    """The upmixer, its discriminator and one optimiser for each. `step` counts iterations; the discriminator
    (and the generator's adversarial terms) start at `disc_start_step`. Resumable state: `modules()` and
    `optimizers()` (for presto.training.state), `step`."""

    def __init__(self, upmixer: Upmixer, discriminator: MultiScaleSTFTDiscriminator, *, lr: float,
                 betas: tuple[float, float], weights: UpmixLossWeights, fft_sizes: Sequence[int],
                 grad_clip: float, disc_start_step: int):
        self.upmixer, self.discriminator = upmixer, discriminator
        self.weights, self.fft_sizes, self.disc_start_step = weights, list(fft_sizes), disc_start_step
        self.grad_clip = grad_clip
        self.opt_g = torch.optim.Adam(upmixer.parameters(), lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
        self.step = 0

    @property
    def adversarial(self) -> bool:
        return self.step >= self.disc_start_step

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"upmixer": self.upmixer, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    def generator_step(self, stereo: Tensor) -> tuple[dict[str, float], Tensor]:
        """One optimiser step of the upmixer on real stereo [B, 2, N]; returns (losses, predicted side)."""
        self.upmixer.train()
        mid, side = split_mid_side(stereo)
        side_hat = self.upmixer(mid)
        pred = join_mid_side(mid, side_hat)
        side_loss = multi_resolution_stft_loss(side_hat, side, self.fft_sizes)
        channel_loss = (multi_resolution_stft_loss(pred[:, :1], stereo[:, :1], self.fft_sizes)
                        + multi_resolution_stft_loss(pred[:, 1:], stereo[:, 1:], self.fft_sizes)) / 2
        loss = self.weights.side * side_loss + self.weights.channels * channel_loss
        logs = {"side_stft": side_loss.item(), "channel_stft": channel_loss.item()}
        if self.adversarial:
            adv, fm = generator_adversarial_terms(self.discriminator, side, side_hat)
            loss = loss + self.weights.adversarial * adv + self.weights.feature_matching * fm
            logs |= {"adv_g": adv.item(), "feature_matching": fm.item()}
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.upmixer.parameters(), self.grad_clip)
        self.opt_g.step()
        logs |= {"loss_g": loss.item(), "grad_norm_g": norm.item()}
        return logs, side_hat

    def discriminator_step(self, side: Tensor, side_hat: Tensor) -> dict[str, float]:
        """One optimiser step of the discriminator: the real side signal against the detached prediction."""
        return discriminator_update(self.discriminator, self.opt_d, side, side_hat, self.grad_clip)

    def train_step(self, stereo: Tensor) -> dict[str, float]:
        """One iteration on real stereo [B, 2, N]: a generator step, then a discriminator step once started."""
        if not torch.isfinite(stereo).all():  # refused before it can reach the weights
            bad = int((~torch.isfinite(stereo)).sum())
            raise InputError(f"step {self.step + 1}: the stereo batch holds NaN or Inf ({bad} of "
                             f"{stereo.numel()} samples); training stopped, the last good checkpoint is kept")
        logs, side_hat = self.generator_step(stereo)
        if self.adversarial:
            logs |= self.discriminator_step(split_mid_side(stereo)[1], side_hat)
        self.step += 1
        return logs


@torch.no_grad()
def upmix_batched(upmixer: Upmixer, mono: Tensor, batch: int) -> Tensor:
    """Stereo [B, 2, N] of mono [B, 1, N], `batch` clips at a time."""
    upmixer.eval()
    return torch.cat([upmixer.stereo(mono[i:i + batch]) for i in range(0, len(mono), batch)])


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
    mean absolute errors against the real clips'."""
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


def stereo_comparison(upmixer: Upmixer, real: Tensor, *, batch: int, fft_sizes: Sequence[int]) -> dict[str, float]:
    """stereo_metrics of the upmixer (keys `upmix_*`) and of dual mono (keys `dual_mono_*`) against real
    stereo [B, 2, N], both from its downmix; plus the real clips' own correlation and width (`real_*`)."""
    mid = split_mid_side(real)[0]
    ours = stereo_metrics(upmix_batched(upmixer, mid, batch), real, fft_sizes)
    dual = stereo_metrics(join_mid_side(mid, torch.zeros_like(mid)), real, fft_sizes)
    return {**{f"upmix_{k}": v for k, v in ours.items()}, **{f"dual_mono_{k}": v for k, v in dual.items()},
            "real_correlation": channel_correlation(real).mean().item(),
            "real_width": stereo_width(real).mean().item()}
