"""Multi-scale STFT discriminator for training the audio VAE adversarially.

One sub-discriminator per FFT size reads the complex spectrogram (real and imaginary parts as two input
channels, so phase errors are visible too) with 2-D convolutions over [frequency, time]:

    conv (3x9) | per dilation d: conv (3x9), stride 2 in frequency, dilation d in time | conv (3x3)
    | conv (3x3) -> 1 channel of logits

Each sub-discriminator returns a map of logits (one per time-frequency cell, no pooling) and the feature
map after every hidden layer, which the feature-matching loss compares between real and generated audio.
Several FFT sizes trade time against frequency resolution, so no single resolution's artefacts go unseen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from presto.config import STFTDiscriminatorConfig

# Negative slope of the LeakyReLU between layers (the usual GAN-discriminator choice).
LEAKY_SLOPE = 0.2


class STFTSubDiscriminator(nn.Module):
    """2-D conv stack over one resolution's complex spectrogram; hop = n_fft / 4, Hann window."""

    def __init__(self, n_fft: int, channels: int, dilations: list[int]):
        super().__init__()
        self.n_fft = n_fft
        self.hop = n_fft // 4
        layers = [weight_norm(nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))]
        for d in dilations:
            layers.append(weight_norm(nn.Conv2d(channels, channels, (3, 9), stride=(2, 1), dilation=(1, d),
                                                padding=(1, 4 * d))))
        layers.append(weight_norm(nn.Conv2d(channels, channels, (3, 3), padding=(1, 1))))
        self.layers = nn.ModuleList(layers)
        self.to_logits = weight_norm(nn.Conv2d(channels, 1, (3, 3), padding=(1, 1)))

    def forward(self, audio: Tensor) -> tuple[Tensor, list[Tensor]]:
        """audio [B, 1, N] -> (logits [B, 1, F', T], hidden feature maps)."""
        window = torch.hann_window(self.n_fft, device=audio.device, dtype=audio.dtype)
        spec = torch.stft(audio.squeeze(1), self.n_fft, self.hop, window=window, return_complex=True)
        x = torch.stack([spec.real, spec.imag], dim=1)  # [B, 2, freq, time]
        features = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), LEAKY_SLOPE)
            features.append(x)
        return self.to_logits(x), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """One STFTSubDiscriminator per FFT size."""

    def __init__(self, config: STFTDiscriminatorConfig):
        super().__init__()
        self.config = config
        self.scales = nn.ModuleList(
            STFTSubDiscriminator(n, config.channels, config.dilations) for n in config.fft_sizes
        )

    def forward(self, audio: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        """audio [B, 1, N] -> (logits per scale, feature maps per scale)."""
        if audio.ndim != 3 or audio.shape[1] != 1:
            raise ValueError(f"audio must be mono [batch, 1, samples], got shape {tuple(audio.shape)}")
        outputs = [scale(audio) for scale in self.scales]
        return [logits for logits, _ in outputs], [features for _, features in outputs]
