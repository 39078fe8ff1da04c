"""Generation from a bundle: output length, determinism per seed, batch independence, NFE accounting,
de-normalisation before the decoder, layer budgets per noise level, recipes checked, bundles loaded."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from presto.data.latents import LATENT_STATS, TEXT_ENCODER, LatentStats
from presto.errors import InputError
from presto.generation import EDM_FILE, MODEL_DIR, Generator, SamplingRecipe, resolve_device
from presto.models.checkpoint import save_model
from presto.models.dit import DiT, DiTConfig
from presto.models.vae import AudioVAE, VAEConfig
from presto.text.condition import TextCondition

C, SR, HOP = 4, 4000, 16
CPU = torch.device("cpu")
VAE_CFG = VAEConfig(channels=4, channel_multipliers=[1, 2], strides=[4, 4], latent_channels=C, dilations=[1],
                    kernel_size=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


class HashEncoder:
    """A deterministic stand-in for the text encoder: one token per word, states seeded by the word."""

    dim = 8

    def encode(self, texts: list[str]) -> TextCondition:
        words = [t.split() or [""] for t in texts]
        length = max(len(w) for w in words)
        tokens, mask = torch.zeros(len(texts), length, self.dim), torch.zeros(len(texts), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                tokens[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
                mask[i, j] = True
        return TextCondition(tokens, mask, tokens.sum(1) / mask.sum(1, keepdim=True))


def dit_config(**changes) -> DiTConfig:
    return DiTConfig(**(dict(latent_channels=C, width=32, depth=3, heads=2, mlp_ratio=2.0, text_dim=8,
                             budget_conditioning=False) | changes))


def random_dit(**changes) -> DiT:
    """Random weights everywhere (an untrained DiT outputs zero, which would hide most mistakes)."""
    torch.manual_seed(0)
    dit = DiT(dit_config(**changes))
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return dit


def stats(mean: float = 0.3, std: float = 2.0) -> LatentStats:
    return LatentStats(mean=[mean] * C, std=[std] * C, sigma_data=0.5, hop_length=HOP, sample_rate=SR,
                       frames_per_second=SR / HOP, latent_channels=C)


def make_generator(dit: DiT | None = None, latent_stats: LatentStats | None = None) -> Generator:
    torch.manual_seed(1)
    return Generator(dit or random_dit(), 0.5, AudioVAE(VAE_CFG), latent_stats or stats(), HashEncoder(), CPU)


def recipe(**changes) -> SamplingRecipe:
    return SamplingRecipe(**(dict(sampler="dpmpp_2m_sde", steps=4, rho=7.0, sigma_min=0.002, sigma_max=80.0,
                                  guidance="cfgpp", scale=0.8, budgets=None) | changes))


PROMPTS = ["slow organ chorale", "bright fast piano in C major at 140 bpm", "strings"]


def test_output_length_and_type():
    audio, timings = make_generator().generate(PROMPTS[:2], 0.3, [0, 1], recipe())
    assert audio.shape == (2, round(0.3 * SR)) and audio.dtype == np.float32 and np.isfinite(audio).all()
    assert set(timings) == {"text_ms", "sample_ms", "decode_ms", "total_ms", "nfe"}
    assert timings["total_ms"] >= timings["sample_ms"] > 0


def test_deterministic_per_seed():
    gen = make_generator()
    a, _ = gen.generate(PROMPTS[:1], 0.2, [5], recipe())
    b, _ = gen.generate(PROMPTS[:1], 0.2, [5], recipe())
    c, _ = gen.generate(PROMPTS[:1], 0.2, [6], recipe())
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_an_item_does_not_depend_on_its_batch():
    """Prompts of different lengths pad each other's tokens; the mask keeps that from changing anything."""
    gen = make_generator()
    together, _ = gen.generate(PROMPTS, 0.2, [3, 4, 5], recipe())
    for k in range(3):
        alone, _ = gen.generate([PROMPTS[k]], 0.2, [3 + k], recipe())
        np.testing.assert_allclose(together[k], alone[0], atol=2e-4, rtol=0)


@pytest.mark.parametrize("sampler, guidance, steps, nfe", [
    ("dpmpp_2m", "cfgpp", 5, 10),  # CFG and CFG++ evaluate the conditional and unconditional model
    ("dpmpp_2m", "cfg", 5, 10),
    ("dpmpp_2m", "none", 5, 5),
    ("heun", "cfgpp", 3, 2 * (2 * 3 - 1)),  # Heun: 2 evaluations per step but the last
    ("consistency", "none", 2, 2),
])
def test_nfe_counts_every_network_evaluation(sampler, guidance, steps, nfe):
    scale = 3.0 if guidance == "cfg" else 0.8
    _, timings = make_generator().generate(PROMPTS[:2], 0.1, [0, 1], recipe(sampler=sampler, guidance=guidance,
                                                                             steps=steps, scale=scale))
    assert timings["nfe"] == nfe


def test_latents_are_denormalised_before_decoding():
    """z = z_n / sigma_data * std + mean: with mean 0 and std = sigma_data the decoder sees z_n itself."""
    seen = {}

    def spy(name, gen):
        decode = gen.vae.decode_long

        def record(z, *args, **kwargs):
            seen[name] = z.clone()
            return decode(z, *args, **kwargs)

        gen.vae.decode_long = record
        return gen

    spy("identity", make_generator(latent_stats=stats(mean=0.0, std=0.5))).generate(PROMPTS[:1], 0.1, [0], recipe())
    spy("scaled", make_generator(latent_stats=stats(mean=0.3, std=2.0))).generate(PROMPTS[:1], 0.1, [0], recipe())
    torch.testing.assert_close(seen["scaled"], seen["identity"] / 0.5 * 2.0 + 0.3)


def test_budget_of_each_noise_level_reaches_the_network():
    gen = make_generator(random_dit(budget_conditioning=True))
    budgets = [1, 2, 3, 3]
    r = recipe(sampler="euler", steps=4, guidance="none", budgets=budgets)
    sigmas = r.sigmas()
    assert [gen.net_kwargs(r, sigmas, float(s))["budget"] for s in sigmas[:4]] == budgets
    assert gen.net_kwargs(r, sigmas, float(sigmas[1]) * 1.01)["budget"] == 2  # nearest level in log sigma
    assert gen.net_kwargs(recipe(), sigmas, 1.0) == {}

    calls: list[int] = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in gen.dit.blocks]
    gen.generate(PROMPTS[:1], 0.1, [0], r)
    for h in hooks:
        h.remove()
    assert len(calls) == sum(budgets)
    with pytest.raises(InputError, match="budget"):
        make_generator().generate(PROMPTS[:1], 0.1, [0], r)


def test_recipe_validation():
    with pytest.raises(ValidationError, match="sampler"):
        recipe(sampler="ddim")
    with pytest.raises(ValidationError, match="CFG"):
        recipe(scale=4.5)
    with pytest.raises(ValidationError, match="budgets"):
        recipe(budgets=[1, 2])
    with pytest.raises(ValidationError, match="sigma_min"):
        recipe(sigma_min=100.0)
    assert recipe(guidance="cfg", scale=4.5).scale == 4.5
    torch.testing.assert_close(recipe(sampler="consistency", steps=2, rho=1.0, sigma_max=4.0, sigma_min=2.0).sigmas(),
                               torch.tensor([4.0, 3.0, 0.0]))


def test_bad_requests_and_mismatched_bundles():
    gen = make_generator()
    with pytest.raises(InputError, match="seed"):
        gen.generate(PROMPTS[:2], 0.1, [0], recipe())
    with pytest.raises(InputError, match="seconds"):
        gen.generate(PROMPTS[:1], 0.0, [0], recipe())
    with pytest.raises(InputError, match="latent channels"):
        Generator(random_dit(latent_channels=8), 0.5, AudioVAE(VAE_CFG), stats(), HashEncoder(), CPU)
    with pytest.raises(InputError, match="sigma_data"):
        Generator(random_dit(), 1.0, AudioVAE(VAE_CFG), stats(), HashEncoder(), CPU)
    with pytest.raises(InputError, match="text"):
        Generator(random_dit(text_dim=16), 0.5, AudioVAE(VAE_CFG), stats(), HashEncoder(), CPU)
    with pytest.raises(InputError, match="device"):
        resolve_device("gpu0")


def test_load_a_bundle_from_disk(tmp_path: Path):
    """The folders the pipeline writes, with the packaged MiniLM text encoder (384-d)."""
    model_dir, vae_dir, encode_dir = tmp_path / "train_dit", tmp_path / "train_vae" / "model", tmp_path / "encode"
    dit = random_dit(text_dim=384)
    save_model(dit, dit.cfg, model_dir / MODEL_DIR)
    (model_dir / EDM_FILE).write_text(json.dumps({"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}))
    save_model(AudioVAE(VAE_CFG), VAE_CFG, vae_dir)
    encode_dir.mkdir()
    stats().save(encode_dir / LATENT_STATS)
    (encode_dir / TEXT_ENCODER).write_text(json.dumps({"kind": "minilm", "path": None, "max_tokens": 32}))

    gen = Generator.load(model_dir, vae_dir=vae_dir, encode_dir=encode_dir, device=CPU)
    audio, timings = gen.generate(["calm piano"], 0.1, [0], recipe(steps=2))
    assert audio.shape == (1, round(0.1 * SR)) and timings["nfe"] == 4
    (model_dir / EDM_FILE).unlink()
    with pytest.raises(InputError, match=EDM_FILE):
        Generator.load(model_dir, vae_dir=vae_dir, encode_dir=encode_dir, device=CPU)
