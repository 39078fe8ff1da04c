"""Presto-S's discriminator head: a small 1-D conv net on the fake score's hidden states.

It reads the DiT's token states [B, T, width] at the output of the middle block (the paper's block 14 of
28), brings the latent frame rate down to about 2.8 frames per second with four strided conv blocks
(Conv1d -> GroupNorm -> SiLU), and maps every remaining frame to one logit with a linear layer: the
least-squares GAN scores each ~0.36 s stretch of the clip on its own instead of pooling to one value.

The strides come from the frame rates, not from params: of all choices of one stride in 1..4 per block,
the one whose product is closest (in log scale) to frame_rate / target_rate, the most even on a tie.
21.5 Hz latents (paper) give 2 x 2 x 2 x 1 = 8 and 2.69 Hz; 62.5 Hz (16 kHz audio, hop 256) give
3 x 2 x 2 x 2 = 24 and 2.60 Hz. The input width and frame rate are facts of the fake score and the latents,
so they are constructor arguments, not params.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from presto.config import DiscHeadConfig


# Strides above 4 would need kernels of 11+ frames; four blocks of stride <= 4 already reach 256x.
MAX_STRIDE = 4


def downsample_strides(frame_rate: float, target_rate: float, n_blocks: int) -> list[int]:
    """Per-block strides in 1..MAX_STRIDE, largest first, whose product is closest in log scale to
    frame_rate / target_rate; among equally close ones the most even (smallest largest stride)."""
    if frame_rate <= 0 or target_rate <= 0 or n_blocks < 1:
        raise ValueError(f"frame_rate = {frame_rate}, target_rate = {target_rate}, n_blocks = {n_blocks}: "
                         "rates must be > 0 and n_blocks >= 1")
    ratio = frame_rate / target_rate
    if ratio > MAX_STRIDE**n_blocks:
        raise ValueError(f"{n_blocks} blocks of stride <= {MAX_STRIDE} cannot bring {frame_rate} frames/s down "
                         f"to {target_rate}/s; use more blocks")
    choices = itertools.combinations_with_replacement(range(1, MAX_STRIDE + 1), n_blocks)
    best = min(choices, key=lambda s: (abs(math.log(math.prod(s) / ratio)), max(s)))
    return sorted(best, reverse=True)


class DiscHeadBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int, groups: int):
        super().__init__()
        # Kernel 2s+1 with padding s: each output frame sees its whole stride window and one frame beyond
        # on each side, and T frames become ceil(T / s).
        self.conv = nn.Conv1d(in_channels, channels, kernel_size=2 * stride + 1, stride=stride, padding=stride)
        self.norm = nn.GroupNorm(groups, channels)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(h)))


class DiscHead(nn.Module):
    """hidden [B, T, in_width] -> logits [B, ceil(T / downsampling)], one per output frame.

    in_width: the width of the states it reads (the DiT's); frame_rate: their frames per second.
    """

    def __init__(self, cfg: DiscHeadConfig, *, in_width: int, frame_rate: float):
        super().__init__()
        self.cfg, self.in_width, self.frame_rate = cfg, in_width, frame_rate
        self.strides = downsample_strides(frame_rate, cfg.target_rate, cfg.n_blocks)
        widths = [in_width] + [cfg.channels] * cfg.n_blocks
        self.blocks = nn.Sequential(*(DiscHeadBlock(c_in, c_out, s, cfg.groups)
                                      for c_in, c_out, s in zip(widths, widths[1:], self.strides)))
        self.out = nn.Linear(cfg.channels, 1)

    @property
    def downsampling(self) -> int:
        return math.prod(self.strides)

    @property
    def logit_rate(self) -> float:
        """Logits per second of audio."""
        return self.frame_rate / self.downsampling

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.ndim != 3 or hidden.shape[2] != self.in_width:
            raise ValueError(f"DiscHead expects hidden states [B, T, {self.in_width}], "
                             f"got {list(hidden.shape)}")
        h = self.blocks(hidden.transpose(1, 2).to(self.out.weight.dtype))
        return self.out(h.transpose(1, 2)).squeeze(-1)
