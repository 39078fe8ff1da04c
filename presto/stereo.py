"""Stereo generation: the text-to-music model writes mono, the upmixer (a train_stereo out folder) adds the
side signal, so the stereo clip's downmix is the mono clip. What `presto generate --stereo` and serving run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from presto.generation import Generator, SamplingRecipe
from presto.models.upmixer import load_upmixer, upmix


class StereoGenerator:
    """A Generator followed by the upmixer in `upmixer_dir`, loaded on the generator's device (compiled as the
    generator is) and refused if trained at another sample rate: the same `generate` call, stereo out."""

    def __init__(self, generator: Generator, upmixer_dir: str | Path):
        self.generator = generator
        self.upmixer = load_upmixer(upmixer_dir, sample_rate=generator.sample_rate, device=generator.device,
                                    compile=generator.compile)

    @property
    def sample_rate(self) -> int:
        return self.generator.sample_rate

    def generate(self, prompts: Sequence[str], seconds: float, seeds: Sequence[int],
                 recipe: SamplingRecipe) -> tuple[np.ndarray, dict[str, float]]:
        """Stereo audio [B, 2, N] (left, right) and Generator.generate's timings plus upmix_ms; total_ms
        includes the upmix."""
        mono, timings = self.generator.generate(prompts, seconds, seeds, recipe)
        stereo, upmix_ms = upmix(self.upmixer, mono)
        return stereo, timings | {"upmix_ms": upmix_ms, "total_ms": timings["total_ms"] + upmix_ms}
