"""Classifier-free guidance (CFG) and CFG++, as denoiser wrappers that every sampler accepts.

With D_c = D(x; sigma, cond) and D_u = D(x; sigma, uncond), both from ONE forward pass on the
concatenated batch [cond; uncond] (so NFE counts two evaluations per call):

    D_w = D_u + w (D_c - D_u)

- `ClassifierFreeGuidance` (Ho & Salimans 2022) returns D_w: the sampler uses it for the data term and for
  the noise direction alike. w is the usual scale: w = 0 is the unconditional model, w = 1 the
  conditional one, w > 1 extrapolates (Presto-S's real score uses w = 4.5).
- `CFGPlusPlus` (Chung et al. 2024) returns `Estimate(data=D_w, noise=D_u)`: the step heads for D_w but
  re-noises along the *unconditional* noise eps_u = (x - D_u) / sigma. Its Euler step is
  x' = D_w + (sigma'/sigma)(x - D_u) and its DPM-Solver++(2M) step uses D_w in the data term and D_u in
  the noise term. Here w lives in [0, 1] (paper default 0.8 for the Presto! base model). w = 0 is the
  unconditional sampler; w = 1 is NOT the conditional one: it still re-noises with eps_u, which amounts to
  plain CFG with the per-step scale w sigma / (sigma - sigma') (for an Euler step).

Samplers stay generic: they read `Estimate.data` and `Estimate.noise` (sampling.py). Where a
multistep sampler extrapolates the data term from earlier steps it extrapolates D_w from earlier D_w, so
the correction stays a difference of like with like (the CFG++ authors' 2M code extrapolates from earlier
D_u instead, which adds a step-size dependent amount of guidance).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from presto.diffusion.edm import per_item_sigma
from presto.diffusion.sampling import DenoiseFn, Estimate


def concat_cond(cond: Any, uncond: Any) -> Any:
    """[cond; uncond] along the batch, leaf by leaf, for a Tensor or a dict / tuple / list of them."""
    if isinstance(cond, Tensor):
        if not isinstance(uncond, Tensor) or uncond.shape != cond.shape:
            got = tuple(uncond.shape) if isinstance(uncond, Tensor) else type(uncond).__name__
            raise ValueError(f"uncond must match cond's shape {tuple(cond.shape)}, got {got}")
        return torch.cat([cond, uncond])
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(cond) != set(uncond):
            raise ValueError(f"uncond must have the same keys as cond {sorted(cond)}")
        return {k: concat_cond(cond[k], uncond[k]) for k in cond}
    if isinstance(cond, (tuple, list)):
        if not isinstance(uncond, (tuple, list)) or len(uncond) != len(cond):
            raise ValueError(f"uncond must be a sequence of {len(cond)} items like cond")
        return type(cond)(concat_cond(c, u) for c, u in zip(cond, uncond))
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__}; use a Tensor or a dict/tuple of them")


def cond_and_uncond(
    denoiser: DenoiseFn, x: Tensor, sigma: float | Tensor, cond: Any, uncond: Any, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """(D_c, D_u) from one forward on the doubled batch. Extra kwargs pass unchanged to the denoiser, so
    they must not be per-item tensors."""
    sigma = per_item_sigma(sigma, x)
    both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), concat_cond(cond, uncond), **kwargs)
    d_cond, d_uncond = both.chunk(2)
    return d_cond, d_uncond


class ClassifierFreeGuidance:
    """Plain CFG: D_w = D_u + w (D_c - D_u). `uncond` has cond's structure and batch size."""

    evaluations_per_call = 2

    def __init__(self, denoiser: DenoiseFn, uncond: Any, scale: float):
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale = {scale}: must be finite")
        self.denoiser, self.uncond, self.scale = denoiser, uncond, float(scale)

    def __call__(self, x: Tensor, sigma: float | Tensor, cond: Any, **kwargs: Any) -> Tensor:
        d_cond, d_uncond = cond_and_uncond(self.denoiser, x, sigma, cond, self.uncond, **kwargs)
        return d_uncond + self.scale * (d_cond - d_uncond)


class CFGPlusPlus:
    """CFG++: Estimate(data = D_u + w (D_c - D_u), noise = D_u), with w in [0, 1]."""

    evaluations_per_call = 2

    def __init__(self, denoiser: DenoiseFn, uncond: Any, scale: float):
        if not 0 <= scale <= 1:
            raise ValueError(f"CFG++ scale = {scale}: must lie in [0, 1] (paper default 0.8); "
                             f"a plain-CFG scale such as 4.5 belongs to ClassifierFreeGuidance")
        self.denoiser, self.uncond, self.scale = denoiser, uncond, float(scale)

    def __call__(self, x: Tensor, sigma: float | Tensor, cond: Any, **kwargs: Any) -> Estimate:
        d_cond, d_uncond = cond_and_uncond(self.denoiser, x, sigma, cond, self.uncond, **kwargs)
        return Estimate(data=d_uncond + self.scale * (d_cond - d_uncond), noise=d_uncond)


class NFECounter:
    """Counts network function evaluations through a denoiser: a guided denoiser counts 2 per call
    (its `evaluations_per_call`), any other 1."""

    def __init__(self, denoiser: DenoiseFn):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: Tensor, sigma: float | Tensor, cond: Any, **kwargs: Any) -> Tensor | Estimate:
        self.nfe += getattr(self.denoiser, "evaluations_per_call", 1)
        return self.denoiser(x, sigma, cond, **kwargs)
