"""The two sides of the audio GAN, shared by the VAE and the upmixer trainers.

    generator side:      hinge_G(D(fake)) and FM(D(real), D(fake)), with D's parameters frozen: no gradient is
                         built for them, so the generator's backward never touches the discriminator
    discriminator side:  hinge_D(D(real), D(stopgrad(fake))), one clipped Adam step: its backward never
                         reaches the generator
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from presto.models.audio_losses import (
    discriminator_adversarial_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)


def generator_adversarial_terms(discriminator: nn.Module, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """(hinge generator loss, feature matching loss) of `fake` against `real`; gradients flow to `fake` only."""
    discriminator.requires_grad_(False)
    try:
        fake_logits, fake_features = discriminator(fake)
        with torch.no_grad():
            _, real_features = discriminator(real)
    finally:
        discriminator.requires_grad_(True)
    return generator_adversarial_loss(fake_logits), feature_matching_loss(real_features, fake_features)


def discriminator_update(discriminator: nn.Module, optimizer: torch.optim.Optimizer, real: Tensor, fake: Tensor,
                         grad_clip: float) -> dict[str, float]:
    """One optimiser step of the discriminator on `real` against the detached `fake`: {loss_d, grad_norm_d}."""
    discriminator.train()
    real_logits, _ = discriminator(real)
    fake_logits, _ = discriminator(fake.detach())
    loss = discriminator_adversarial_loss(real_logits, fake_logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(discriminator.parameters(), grad_clip)
    optimizer.step()
    return {"loss_d": loss.item(), "grad_norm_d": norm.item()}
