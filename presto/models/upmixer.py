"""A mono-to-stereo upmixer: a 1-D convolutional U-Net that predicts the side signal of mono audio.

    mono M [B, 1, N] -> side S [B, 1, N];   left = M + S, right = M - S

so the downmix (left + right) / 2 is M by construction (up to float32 rounding): the upmixer can only add
stereo image, never change what the mono model made. It is built from the VAE's blocks:

    conv(1 -> C) | per stage: EncoderBlock (residual units, Snake, strided conv) to the next width
    | residual units at the widest | per stage, in reverse: DecoderBlock (transposed conv, residual units),
    plus the encoder's activation at that rate (U-Net skip) | Snake, conv -> 1

The skips carry the full-rate detail (onsets, timbre) that the side signal shares with the mid; the strided
path gives the receptive field to tell which instrument is sounding (and so where it is panned).
Inputs of any length are zero-padded at the end to a whole number of `hop_length` samples and cropped back.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from presto.config import UpmixerConfig
from presto.errors import InputError
from presto.fast_path import CompileChoice, compile_for_inference, wants_compile
from presto.models.checkpoint import load_model
from presto.models.vae import DecoderBlock, EncoderBlock, ResidualUnit, Snake, _conv

MODEL_DIR = "model"  # a train_stereo out folder: the saved Upmixer (save_model) ...
INFO_FILE = "upmixer.json"  # ... and {"sample_rate": the rate it was trained at}


class Upmixer(nn.Module):
    """Mono audio [B, 1, N] -> side signal [B, 1, N]; `stereo(mono)` gives [B, 2, N] (left, right)."""

    def __init__(self, config: UpmixerConfig):
        super().__init__()
        self.config = config
        c, k = config.channels, config.kernel_size
        widths = [c] + [c * m for m in config.channel_multipliers]
        stages = list(zip(widths[:-1], widths[1:], config.strides))
        self.stem = _conv(1, c, k)
        self.down = nn.ModuleList(EncoderBlock(a, b, s, k, config.dilations) for a, b, s in stages)
        self.middle = nn.Sequential(*[ResidualUnit(widths[-1], k, d) for d in config.dilations])
        self.up = nn.ModuleList(DecoderBlock(b, a, s, k, config.dilations) for a, b, s in reversed(stages))
        self.head = nn.Sequential(Snake(c), _conv(c, 1, k))

    @property
    def hop_length(self) -> int:
        return math.prod(self.config.strides)

    def forward(self, mono: Tensor) -> Tensor:
        if mono.ndim != 3 or mono.shape[1] != 1:
            raise ValueError(f"mono audio must be [batch, 1, samples], got shape {tuple(mono.shape)}")
        n = mono.shape[-1]
        x = self.stem(F.pad(mono, (0, -n % self.hop_length)))
        skips = []
        for block in self.down:
            skips.append(x)
            x = block(x)
        x = self.middle(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(x) + skip
        return self.head(x)[..., :n]

    def stereo(self, mono: Tensor) -> Tensor:
        """[B, 2, N]: left = mono + side, right = mono - side."""
        return join_mid_side(mono, self(mono))


def join_mid_side(mid: Tensor, side: Tensor) -> Tensor:
    """[B, 1, N] mid and side -> [B, 2, N] (left = mid + side, right = mid - side)."""
    return torch.cat([mid + side, mid - side], dim=1)


def split_mid_side(stereo: Tensor) -> tuple[Tensor, Tensor]:
    """[B, 2, N] -> (mid, side), each [B, 1, N]: mid = (L + R) / 2, side = (L - R) / 2."""
    left, right = stereo[:, :1], stereo[:, 1:]
    return (left + right) / 2, (left - right) / 2


def load_upmixer(folder: str | Path, *, sample_rate: int, device: torch.device | str = "cpu",
                 compile: CompileChoice = "off") -> Upmixer:
    """The upmixer a train_stereo run wrote into `folder` (its MODEL_DIR and INFO_FILE), in eval mode and
    compiled if `compile` says so (presto.fast_path: auto, on, off); refuses one trained at another rate than
    `sample_rate` (its side signal would be pitched wrong)."""
    folder = Path(folder)
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise InputError(f"{info_path} not found; run the train_stereo stage first")
    trained_at = json.loads(info_path.read_text())["sample_rate"]
    if trained_at != sample_rate:
        raise InputError(f"{folder}: the upmixer was trained at {trained_at} Hz, the audio is at {sample_rate} Hz")
    model, _ = load_model(folder / MODEL_DIR, device=device)
    if not isinstance(model, Upmixer):
        raise InputError(f"{folder / MODEL_DIR}: holds a {type(model).__name__}, not an Upmixer")
    if wants_compile(compile, torch.device(device)):
        compile_for_inference(model)
    return model.eval()


@torch.inference_mode()
def upmix(upmixer: Upmixer, audio: np.ndarray) -> tuple[np.ndarray, float]:
    """Mono audio [B, N] -> (stereo [B, 2, N] float32, milliseconds it took, transfers to and from the
    upmixer's device included: what it adds to the latency of stereo generation)."""
    device = next(upmixer.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    stereo = upmixer.eval().stereo(torch.from_numpy(np.asarray(audio, dtype=np.float32)).to(device)[:, None])
    out = stereo.float().cpu().numpy()
    return out, 1e3 * (time.perf_counter() - t0)
