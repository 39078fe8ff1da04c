"""A 1-D convolutional VAE for mono audio, in the family of Stable Audio's "Oobleck" autoencoder.

    encoder: conv(1 -> C) | per stage: residual units (dilations d_1..d_k) at the stage's input width,
             Snake, strided conv (kernel 2s, stride s) to the next width | Snake, conv -> 2 * latent
    decoder: conv(latent -> widest) | per stage, in reverse: Snake, transposed conv (kernel 2s, stride s),
             residual units | Snake, conv -> 1

The encoder's head gives a mean and a pre-scale per latent channel; std = softplus(pre-scale + STD_SHIFT) + MIN_STD.
One latent frame covers `hop_length` = prod(strides) samples.

The network has no normalisation across time and no attention: every output depends only on a finite
window of input, at most `context_frames` latent frames to either side. `encode_long` / `decode_long`
exploit that: each chunk is processed with that much real context on both sides and only its middle is
kept (overlap-discard). The joined result then equals the whole-signal result, so there is nothing to
crossfade and no seam to hear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from presto.config import VAEConfig

# Floor on the posterior std: keeps log(std) in the KL finite when the encoder pushes a channel to zero.
MIN_STD = 1e-4
# The posterior starts nearly deterministic (std ~ softplus(-4) = 0.018, not softplus(0) = 0.69): a fresh
# encoder's means spread ~0.02, so unit-scale noise hides them from the decoder, which then learns only the
# average spectrum and, on a short budget, never recovers (posterior collapse). Measured on the demo corpus
# at 600 steps: chroma similarity 0.55 -> 0.73, log-mel L1 0.74 -> 0.50. The KL term still moves std freely.
STD_SHIFT = -4.0
# Floor on Snake's alpha: exp(log_alpha) underflows to 0 in float32 below log_alpha ~ -103, and 0/0 is NaN.
# Near the floor snake(x) ~ x + alpha x^2, so the floor changes nothing measurable.
SNAKE_MIN_ALPHA = 1e-9


def _conv(c_in: int, c_out: int, kernel: int, dilation: int = 1) -> nn.Module:
    """Weight-normalised 'same' convolution (odd kernel)."""
    return weight_norm(nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2))


class Snake(nn.Module):
    """snake(x) = x + sin^2(alpha x) / alpha, one learnable alpha per channel.

    alpha = exp(log_alpha) stays positive, so the division never flips sign as alpha learns; the floor
    SNAKE_MIN_ALPHA keeps it from underflowing to zero.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.log_alpha.exp().clamp_min(SNAKE_MIN_ALPHA)
        return x + torch.sin(alpha * x).pow(2) / alpha


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv_k,dilated(snake(x))))."""

    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake(channels),
            _conv(channels, channels, kernel, dilation),
            Snake(channels),
            _conv(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class EncoderBlock(nn.Sequential):
    """Residual units at the input rate, then a strided conv that divides the length by `stride`.

    Kernel 2s with padding ceil(s/2) maps N samples to exactly N/s frames when s divides N.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, dilations: list[int]):
        super().__init__(
            *[ResidualUnit(c_in, kernel, d) for d in dilations],
            Snake(c_in),
            weight_norm(nn.Conv1d(c_in, c_out, 2 * stride, stride=stride, padding=math.ceil(stride / 2))),
        )


class DecoderBlock(nn.Sequential):
    """A transposed conv that multiplies the length by `stride`, then residual units at the output rate.

    Output length (L-1)s - 2 ceil(s/2) + 2s + (s mod 2) = L s: exact inverse of EncoderBlock's length.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, dilations: list[int]):
        super().__init__(
            Snake(c_in),
            weight_norm(
                nn.ConvTranspose1d(
                    c_in, c_out, 2 * stride, stride=stride,
                    padding=math.ceil(stride / 2), output_padding=stride % 2,
                )
            ),
            *[ResidualUnit(c_out, kernel, d) for d in dilations],
        )


class AudioVAE(nn.Module):
    """Mono audio [B, 1, N] <-> Gaussian latents [B, latent_channels, N / hop_length]."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c, k = config.channels, config.kernel_size
        widths = [c] + [c * m for m in config.channel_multipliers]
        stages = list(zip(widths[:-1], widths[1:], config.strides))

        self.encoder = nn.Sequential(
            _conv(1, c, k),
            *[EncoderBlock(c_in, c_out, s, k, config.dilations) for c_in, c_out, s in stages],
            Snake(widths[-1]),
            _conv(widths[-1], 2 * config.latent_channels, 3),
        )
        self.decoder = nn.Sequential(
            _conv(config.latent_channels, widths[-1], k),
            *[DecoderBlock(c_out, c_in, s, k, config.dilations) for c_in, c_out, s in reversed(stages)],
            Snake(c),
            _conv(c, 1, k),
        )

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame."""
        return math.prod(self.config.strides)

    @property
    def context_frames(self) -> int:
        """Latent frames on each side that can influence one frame of `encode` or `decode` output.

        An upper bound from the layer geometry: a layer whose steps are J samples apart and which reaches
        e steps beyond its own position adds e * J samples of reach. Same-padded convs reach d (k - 1) / 2;
        a strided conv (kernel 2s, padding ceil(s/2)) ceil(s/2) input steps; a transposed conv fewer than
        2s output steps.
        """
        cfg = self.config
        half = (cfg.kernel_size - 1) // 2
        units = sum(d * half for d in cfg.dilations)  # the residual units of one stage
        encoder, step = half, 1  # stem conv at the audio rate
        for s in cfg.strides:
            encoder += (units + math.ceil(s / 2)) * step
            step *= s
        encoder += 1 * step  # head conv, kernel 3, at the latent rate
        decoder, step = half * step, step  # head conv at the latent rate
        for s in reversed(cfg.strides):
            step //= s
            decoder += (2 * s + units) * step
        decoder += half  # output conv at the audio rate
        return -(-max(encoder, decoder) // self.hop_length)

    def _check_audio(self, audio: Tensor) -> None:
        if audio.ndim != 3 or audio.shape[1] != 1:
            raise ValueError(f"audio must be mono [batch, 1, samples], got shape {tuple(audio.shape)}")
        if audio.shape[-1] % self.hop_length:
            raise ValueError(
                f"audio length {audio.shape[-1]} is not a multiple of hop_length {self.hop_length}; "
                "pad it (encode_long pads for you)"
            )

    def encode(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior q(z | audio) as (mean, std), each [B, latent_channels, N / hop_length]."""
        self._check_audio(audio)
        mean, pre_scale = self.encoder(audio).chunk(2, dim=1)
        return mean, F.softplus(pre_scale + STD_SHIFT) + MIN_STD

    @staticmethod
    def sample(mean: Tensor, std: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw z = mean + std * eps."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * eps

    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, latent_channels, T] -> audio [B, 1, T * hop_length]."""
        if z.ndim != 3 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be [batch, {self.config.latent_channels}, frames], got shape {tuple(z.shape)}"
            )
        return self.decoder(z)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction from a posterior sample, mean, std)."""
        mean, std = self.encode(audio)
        return self.decode(self.sample(mean, std)), mean, std

    def encode_long(self, audio: Tensor, chunk_frames: int, overlap_frames: int | None = None,
                    mirror_edges: bool = False) -> tuple[Tensor, Tensor]:
        """`encode` of audio of any length, `chunk_frames` latent frames at a time, each seen with
        `overlap_frames` of context per side (default `context_frames`: equal to encoding it whole).

        The audio is padded at the end to a whole number of frames: ceil(N / hop_length) frames out. By
        default the padding is zeros, as in `encode`. With `mirror_edges` the audio is instead extended by
        its mirror image, `context_frames` beyond each end, and those frames are dropped again: no kept frame
        sees the signal's boundary. A clip cut from a longer track then gets edge latents like those of its
        interior, not the outliers an encoder trained on zero-padded crops gives at a boundary.
        """
        if audio.ndim != 3 or audio.shape[1] != 1:
            raise ValueError(f"audio must be mono [batch, 1, samples], got shape {tuple(audio.shape)}")
        hop = self.hop_length
        frames = -(-audio.shape[-1] // hop)
        end_pad = frames * hop - audio.shape[-1]
        margin = self.context_frames if mirror_edges else 0
        if mirror_edges:
            audio = _mirror_pad(audio, margin * hop, margin * hop + end_pad)
        else:
            audio = F.pad(audio, (0, end_pad))
        overlap = self.context_frames if overlap_frames is None else overlap_frames
        means, stds = [], []
        for w in _windows(frames + 2 * margin, chunk_frames, overlap):
            mean, std = self.encode(audio[..., w.start * hop:w.stop * hop])
            means.append(w.keep(mean, 1))
            stds.append(w.keep(std, 1))
        kept = slice(margin, margin + frames)
        return torch.cat(means, dim=-1)[..., kept], torch.cat(stds, dim=-1)[..., kept]

    def decode_long(self, z: Tensor, chunk_frames: int, overlap_frames: int | None = None) -> Tensor:
        """`decode` of a latent sequence of any length, `chunk_frames` latent frames at a time, each seen
        with `overlap_frames` of context per side (default `context_frames`: equal to decoding it whole)."""
        overlap = self.context_frames if overlap_frames is None else overlap_frames
        pieces = [
            w.keep(self.decode(z[..., w.start:w.stop]), self.hop_length)
            for w in _windows(z.shape[-1], chunk_frames, overlap)
        ]
        return torch.cat(pieces, dim=-1)


def _mirror_pad(audio: Tensor, left: int, right: int) -> Tensor:
    """Extend [..., N] audio by its mirror image (without repeating the edge sample), `left` samples before
    and `right` after; a signal shorter than the padding is mirrored back and forth as often as needed."""
    while left > 0 or right > 0:
        n = audio.shape[-1]
        step_l, step_r = min(left, n - 1), min(right, n - 1)
        if n < 2:  # nothing to mirror: a constant continues itself
            return F.pad(audio, (left, right), mode="replicate")
        audio = F.pad(audio, (step_l, step_r), mode="reflect")
        left, right = left - step_l, right - step_r
    return audio


@dataclass(frozen=True)
class _Window:
    """Frames [start, stop) are processed; of those, frames [keep_start, keep_stop) are kept."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int

    def keep(self, processed: Tensor, scale: int) -> Tensor:
        """The kept part of a processed window; `scale` is samples per frame of `processed` (1 for
        latents, hop_length for audio)."""
        return processed[..., (self.keep_start - self.start) * scale:(self.keep_stop - self.start) * scale]


def _windows(frames: int, chunk_frames: int, overlap_frames: int) -> list[_Window]:
    """Each kept chunk [a, a + chunk) is processed widened by the overlap on both sides, clipped to the
    signal; clipping at the signal's ends reproduces the whole-signal boundary (the same zero padding)."""
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames = {chunk_frames} must be >= 1")
    if overlap_frames < 0:
        raise ValueError(f"overlap_frames = {overlap_frames} must be >= 0")
    if frames < 1:
        raise ValueError("nothing to process: the signal has no latent frames")
    return [
        _Window(max(0, a - overlap_frames), min(frames, a + chunk_frames + overlap_frames),
                a, min(frames, a + chunk_frames))
        for a in range(0, frames, chunk_frames)
    ]
