"""Text to audio with a trained bundle: text encoder -> sampler over the EDM denoiser -> VAE decode.

    cond      = text_encoder(prompts)                         (frozen; the encode stage's own config)
    z_n       = sampler(D, sigma_0 eps, sigmas, cond)        (guided by CFG / CFG++, or not)
    z         = z_n / sigma_data * std + mean                (undo the encode stage's normalisation)
    audio     = VAE.decode(z)                                (in chunks with full context: no seams)

A `SamplingRecipe` says how to sample: which sampler of `presto.diffusion.sampling.SAMPLERS`, how many
steps on which rho grid, which guidance. Every model family is sampled through the same `generate` call:
the base model (a multistep sampler with CFG++), Presto-S (the `consistency` sampler, guidance `none`),
Presto-L, ASE and Presto-LS (a layer budget per noise level: the schedule.json saved beside the model, which
`Generator.load` applies at every step count and rho, or a recipe's per-step `budgets`). What the network is given besides (x, sigma, text)
at a noise level is `Generator.net_kwargs`, the one place a new model family plugs in.

Fast path: on CUDA the DiT runs under bf16 autocast; with `compile` on (presto.fast_path) the DiT's blocks and
the VAE decoder run compiled; a prompt's text embedding is kept in a small LRU (presto.text.encoder), so a
repeated prompt skips the text encoder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from presto.config import SamplingRecipe
from presto.data.latents import LATENT_STATS, TEXT_ENCODER, LatentStats
from presto.diffusion.edm import Denoiser
from presto.diffusion.guidance import CFGPlusPlus, ClassifierFreeGuidance, NFECounter
from presto.distill.presto_l import SCHEDULE_FILE, BudgetedDenoiser, load_schedule
from presto.diffusion.sampling import PerItemNoise, sample
from presto.errors import InputError
from presto.fast_path import CompileChoice, compile_for_inference, wants_compile
from presto.models.checkpoint import load_model
from presto.models.dit import DiT
from presto.models.vae import AudioVAE
from presto.text.condition import TextCondition
from presto.text.encoder import (
    TEXT_CACHE_PROMPTS,
    CachedTextEncoder,
    TextEncoder,
    TextEncoderConfig,
    load_text_encoder,
)

EDM_FILE = "edm.json"  # sigma_data, sigma_min, sigma_max of a trained denoiser, beside its model/ folder
MODEL_DIR = "model"
# Latent frames decoded per VAE call. Each chunk is decoded with the VAE's full receptive field as context,
# so the output equals a whole-clip decode (vae.decode_long); the chunk size only bounds memory.
DECODE_CHUNK_FRAMES = 256


def read_edm(path: str | Path) -> dict[str, float]:
    """{sigma_data, sigma_min, sigma_max} of a trained denoiser (the `edm.json` beside its model folder)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        return {k: float(raw[k]) for k in ("sigma_data", "sigma_min", "sigma_max")}
    except FileNotFoundError:
        raise InputError(f"{path}: not found; is {path.parent} a trained diffusion model's folder?") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise InputError(f"{path}: not an EDM description ({type(err).__name__}: {err})") from None


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU; anything else is taken as a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"device {name!r}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: CUDA is not available on this machine")
    return device


class Generator:
    """A trained text-to-music bundle, ready to sample: `generate(prompts, seconds, seeds, recipe)`."""

    def __init__(self, dit: DiT, sigma_data: float, vae: AudioVAE, stats: LatentStats, text_encoder: TextEncoder,
                 device: torch.device, *, compile: CompileChoice = "off"):
        """`compile` (presto.fast_path: auto, on, off) compiles the DiT's blocks and the VAE decoder in place."""
        cfg = dit.cfg
        if not vae.config.latent_channels == stats.latent_channels == cfg.latent_channels:
            raise InputError(f"latent channels disagree: DiT {cfg.latent_channels}, VAE {vae.config.latent_channels}, "
                             f"latent statistics {stats.latent_channels}; the bundle mixes different runs")
        if stats.hop_length != vae.hop_length:
            raise InputError(f"latent statistics say hop_length {stats.hop_length}, the VAE has {vae.hop_length}")
        if abs(stats.sigma_data - sigma_data) > 1e-6:
            raise InputError(f"the model was trained with sigma_data {sigma_data}, the latents are normalised to "
                             f"{stats.sigma_data}")
        if text_encoder.dim != cfg.text_dim:
            raise InputError(f"the text encoder gives {text_encoder.dim}-d states, the DiT reads {cfg.text_dim}-d")
        self.device = device
        self.dit = dit.to(device).eval()
        self.denoiser = Denoiser(self.dit, sigma_data)
        self.vae = vae.to(device).eval()
        self.stats = stats
        self.text_encoder = CachedTextEncoder(text_encoder, TEXT_CACHE_PROMPTS)
        self.compile = compile
        if wants_compile(compile, device):
            for block in self.dit.blocks:
                compile_for_inference(block)
            compile_for_inference(self.vae.decoder)

    @classmethod
    def load(cls, model_dir: str | Path, *, vae_dir: str | Path, encode_dir: str | Path,
             device: torch.device, compile: CompileChoice = "off") -> "Generator":
        """A bundle from disk: `model_dir` holds `model/` (a saved DiT) and `edm.json`; see `around`. A model
        folder with a schedule.json (Presto-L, ASE, Presto-LS) runs each noise level at the layer budget it was
        trained for, with or without the reroute as trained."""
        model_dir = Path(model_dir)
        edm = read_edm(model_dir / EDM_FILE)
        dit, _ = load_model(model_dir / MODEL_DIR, device=device)
        if not isinstance(dit, DiT):
            raise InputError(f"{model_dir / MODEL_DIR}: holds a {type(dit).__name__}, not a DiT")
        generator = cls.around(dit, edm["sigma_data"], vae_dir=vae_dir, encode_dir=encode_dir, device=device,
                               compile=compile)
        if (model_dir / SCHEDULE_FILE).is_file():
            generator.denoiser = BudgetedDenoiser(generator.dit, edm["sigma_data"],
                                                  load_schedule(model_dir / SCHEDULE_FILE))
        return generator

    @classmethod
    def around(cls, dit: DiT, sigma_data: float, *, vae_dir: str | Path, encode_dir: str | Path,
               device: torch.device, compile: CompileChoice = "off") -> "Generator":
        """A DiT (e.g. one still in training) with the rest of the bundle from disk: the VAE is a saved model
        folder; `encode_dir` holds `latent_stats.json` and `text_encoder.json`."""
        encode_dir = Path(encode_dir)
        vae, _ = load_model(vae_dir, device=device)
        if not isinstance(vae, AudioVAE):
            raise InputError(f"{vae_dir}: holds a {type(vae).__name__}, not an AudioVAE")
        stats = LatentStats.load(encode_dir / LATENT_STATS)
        text_cfg_path = encode_dir / TEXT_ENCODER
        if not text_cfg_path.is_file():
            raise InputError(f"{text_cfg_path}: text encoder config not found; run the encode stage first")
        text_cfg = TextEncoderConfig.model_validate_json(text_cfg_path.read_text())
        return cls(dit, sigma_data, vae, stats, load_text_encoder(text_cfg, device=str(device)), device,
                   compile=compile)

    @property
    def sample_rate(self) -> int:
        return self.stats.sample_rate

    def frames(self, seconds: float) -> int:
        """Latent frames that cover `seconds` of audio."""
        return math.ceil(seconds * self.stats.sample_rate / self.stats.hop_length)

    def net_kwargs(self, recipe: SamplingRecipe, sigmas: Tensor, sigma: float) -> dict[str, Any]:
        """What the network gets besides (x, sigma, text) at noise level `sigma` of the grid `sigmas`: the
        layer budget of the nearest grid level (in log sigma) when the recipe has budgets."""
        if recipe.budgets is None:
            return {}
        levels = sigmas[:len(recipe.budgets)].double().log()
        return {"budget": recipe.budgets[int((levels - math.log(sigma)).abs().argmin())]}

    def denoise_fn(self, recipe: SamplingRecipe, sigmas: Tensor):
        """D(x, sigma, cond) for the samplers. cond travels as a (tokens, mask, pooled) tuple, which the
        guidance wrappers know how to batch."""

        def denoise(x: Tensor, sigma: Tensor, cond: tuple[Tensor, Tensor, Tensor]) -> Tensor:
            kwargs = self.net_kwargs(recipe, sigmas, float(sigma[0]))
            return self.denoiser(x, sigma, TextCondition(*cond), **kwargs)

        return denoise

    def encode_text(self, prompts: Sequence[str]) -> TextCondition:
        """The prompts' text condition on the generator's device (a repeated prompt comes from the cache)."""
        return self.text_encoder.encode(list(prompts)).to(self.device)

    @torch.inference_mode()
    def sample_latents(self, text: TextCondition, seconds: float, seeds: Sequence[int],
                       recipe: SamplingRecipe) -> tuple[Tensor, int]:
        """Normalised latents [B, C, frames(seconds)] sampled by `recipe` for the text condition, one seed per
        item, and the number of network evaluations (NFE; CFG counts 2)."""
        if recipe.budgets is not None and not self.dit.cfg.budget_conditioning:
            raise InputError("the recipe has layer budgets but this model was not trained with budget conditioning")
        if recipe.budgets is not None and isinstance(self.denoiser, BudgetedDenoiser):
            raise InputError(f"this model runs its own layer schedule ({SCHEDULE_FILE}); the recipe's budgets "
                             "must be null")
        batch, device = len(seeds), self.device
        cond = (text.tokens, text.mask, text.pooled)
        sigmas = recipe.sigmas(device)
        fn = self.denoise_fn(recipe, sigmas)
        if recipe.guidance != "none":
            null = self.dit.null_cond(batch, text.mask.shape[1])
            uncond = (null.tokens.to(text.tokens.dtype), null.mask, null.pooled.to(text.pooled.dtype))
            fn = (CFGPlusPlus if recipe.guidance == "cfgpp" else ClassifierFreeGuidance)(fn, uncond, recipe.scale)
        counter = NFECounter(fn)
        shape = (batch, self.dit.cfg.latent_channels, self.frames(seconds))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z_n = sample(recipe.sampler, counter, PerItemNoise(seeds), shape, sigmas, cond=cond, device=device)
        return z_n, counter.nfe

    @torch.inference_mode()
    def decode(self, z_n: Tensor, seconds: float) -> np.ndarray:
        """Audio [B, round(seconds * sample_rate)] float32 of normalised latents (VAE decode in float32)."""
        z = self.stats.denormalise(z_n.float())
        audio = self.vae.decode_long(z, DECODE_CHUNK_FRAMES)[:, 0, :round(seconds * self.sample_rate)]
        return audio.float().cpu().numpy()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seconds: float, seeds: Sequence[int],
                 recipe: SamplingRecipe) -> tuple[np.ndarray, dict[str, float]]:
        """Audio [B, N] float32 (N = round(seconds * sample_rate)) for each prompt with its own seed, and the
        time spent: text_ms, sample_ms, decode_ms, total_ms, and nfe (network evaluations; CFG counts 2).

        An item's audio depends on its prompt and seed only, not on what else shares the batch.
        """
        if len(prompts) == 0 or len(prompts) != len(seeds):
            raise InputError(f"generate: {len(prompts)} prompts and {len(seeds)} seeds; give one seed per prompt")
        if not (math.isfinite(seconds) and seconds > 0):
            raise InputError(f"generate: seconds = {seconds} must be a positive number")
        self._sync()
        t0 = time.perf_counter()
        text = self.encode_text(prompts)
        self._sync()
        t1 = time.perf_counter()
        z_n, nfe = self.sample_latents(text, seconds, seeds, recipe)
        self._sync()
        t2 = time.perf_counter()
        out = self.decode(z_n, seconds)
        t3 = time.perf_counter()
        timings = {"text_ms": 1e3 * (t1 - t0), "sample_ms": 1e3 * (t2 - t1), "decode_ms": 1e3 * (t3 - t2),
                   "total_ms": 1e3 * (t3 - t0), "nfe": float(nfe)}
        return out, timings
