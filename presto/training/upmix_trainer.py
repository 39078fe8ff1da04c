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

The stereo metrics (upmix against real stereo, beside dual mono) are presto/eval/stereo.py's.
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

