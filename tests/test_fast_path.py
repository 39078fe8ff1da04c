"""The inference fast path: compiled networks give the eager outputs, a failed compilation falls back to eager
with a warning, the compile switch is checked, and the text-embedding cache skips the encoder for a repeated
prompt while staying bounded.

The equivalence tests compile with the `aot_eager` backend: it runs torch.compile's whole capture (Dynamo's
graph capture, guards, recompilation on a new shape, AOTAutograd) but executes the captured graph with
torch's own kernels. Inductor's C++ code generation took 9-23 s per tiny network on this 2-core CPU (cold
cache), which would make each test several times slower than the suite allows; the benchmark
(bench/latency.py --compile) exercises inductor itself.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import yaml

from presto.config import load_params, parse_params
from presto.errors import ParamsError
from presto.fast_path import compile_for_inference, wants_compile
from presto.generation import Generator
from presto.models.checkpoint import save_model
from presto.models.upmixer import INFO_FILE, MODEL_DIR, Upmixer, UpmixerConfig, load_upmixer
from presto.models.vae import AudioVAE
from presto.text.condition import TextCondition
from presto.text.encoder import CachedTextEncoder
from test_generation import CPU, VAE_CFG, HashEncoder, make_generator, random_dit, recipe, stats

BACKEND = "aot_eager"
UPMIXER_CFG = UpmixerConfig(channels=4, channel_multipliers=[2], strides=[4], dilations=[1], kernel_size=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


@pytest.fixture
def compiled_modules(monkeypatch) -> list[torch.nn.Module]:
    """Every module the library compiles from here on, compiled with BACKEND instead of inductor."""
    seen = []

    def spy(module):
        seen.append(module)
        return compile_for_inference(module, backend=BACKEND)

    monkeypatch.setattr("presto.generation.compile_for_inference", spy)
    monkeypatch.setattr("presto.models.upmixer.compile_for_inference", spy)
    return seen


def text(batch: int, length: int = 5) -> TextCondition:
    g = torch.Generator().manual_seed(batch)
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (batch,), generator=g)[:, None]
    return TextCondition(torch.randn(batch, length, 8, generator=g), mask, torch.randn(batch, 8, generator=g))


# ---- the compile switch ---------------------------------------------------------------------------------


def test_auto_compiles_on_cuda_only_and_bad_choices_are_named():
    assert wants_compile("auto", torch.device("cuda")) and not wants_compile("auto", torch.device("cpu"))
    assert wants_compile("on", torch.device("cpu")) and not wants_compile("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="compile = 'yes': must be one of auto, on, off"):
        wants_compile("yes", torch.device("cpu"))


def test_generate_compile_param_is_validated(repo):
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    assert load_params(repo / "params.yaml").generate.compile == "auto"
    raw["generate"]["compile"] = False  # what YAML makes of a bare `off`
    assert parse_params(raw).generate.compile == "off"
    raw["generate"]["compile"] = "fast"
    with pytest.raises(ParamsError, match="generate.compile = 'fast'"):
        parse_params(raw)


# ---- compiled equals eager ------------------------------------------------------------------------------


def test_compiled_dit_blocks_match_eager_across_shapes_and_budgets():
    dit = random_dit(budget_conditioning=True).eval()
    x, sigma = torch.randn(2, 4, 24), torch.tensor([0.3, 2.0])
    calls = [lambda: dit(x, sigma, text(2)),
             lambda: dit(x[:1, :, :17], sigma[:1], text(1, 3)),  # another batch, length and caption length
             lambda: dit(x, sigma, text(2), budget=torch.tensor([2, 3]))]  # per-item budgets: other block sets
    with torch.inference_mode():
        eager = [call() for call in calls]
        for block in dit.blocks:
            compile_for_inference(block, backend=BACKEND)
        for call, expected in zip(calls, eager):
            torch.testing.assert_close(call(), expected, rtol=1e-5, atol=1e-6)


def test_compiled_vae_decoder_and_upmixer_match_eager():
    torch.manual_seed(0)
    vae, upmixer = AudioVAE(VAE_CFG).eval(), Upmixer(UPMIXER_CFG).eval()
    z, mono = torch.randn(1, 4, 9), torch.randn(1, 1, 250)
    with torch.inference_mode():
        expected = vae.decode_long(z, 4), upmixer.stereo(mono)
        compile_for_inference(vae.decoder, backend=BACKEND)
        compile_for_inference(upmixer, backend=BACKEND)
        torch.testing.assert_close(vae.decode_long(z, 4), expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(upmixer.stereo(mono), expected[1], rtol=1e-5, atol=1e-6)


def generator(compile: str) -> Generator:
    """The same random bundle every time (make_generator's weights), compiled as asked."""
    return Generator(random_dit(), 0.5, AudioVAE(VAE_CFG), stats(), HashEncoder(), CPU, compile=compile)


def test_generator_compiles_dit_blocks_and_decoder_only_when_asked(compiled_modules):
    audio, _ = generator("off").generate(["calm piano"], 0.1, [3], recipe())
    generator("auto")  # auto is off on a CPU
    assert compiled_modules == []

    compiled = generator("on")
    assert compiled_modules == [*compiled.dit.blocks, compiled.vae.decoder]
    again, _ = compiled.generate(["calm piano"], 0.1, [3], recipe())
    np.testing.assert_allclose(again, audio, rtol=1e-5, atol=1e-6)


def test_load_upmixer_compiles_when_asked(tmp_path, compiled_modules):
    torch.manual_seed(0)
    save_model(Upmixer(UPMIXER_CFG), UPMIXER_CFG, tmp_path / MODEL_DIR)
    (tmp_path / INFO_FILE).write_text(json.dumps({"sample_rate": 4000}))
    eager = load_upmixer(tmp_path, sample_rate=4000)
    compiled = load_upmixer(tmp_path, sample_rate=4000, compile="on")
    assert compiled_modules == [compiled]
    mono = torch.randn(2, 1, 300)
    with torch.inference_mode():
        torch.testing.assert_close(compiled.stereo(mono), eager.stereo(mono), rtol=1e-5, atol=1e-6)


def test_compiling_twice_leaves_the_first_compilation_in_place():
    upmixer = compile_for_inference(Upmixer(UPMIXER_CFG).eval(), backend=BACKEND)
    forward = upmixer.forward
    assert compile_for_inference(upmixer, backend=broken_backend) is upmixer and upmixer.forward is forward


# ---- falling back to eager ------------------------------------------------------------------------------


def broken_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler on this machine")


def test_a_failed_compilation_runs_eagerly_with_one_warning():
    torch.manual_seed(0)
    upmixer = Upmixer(UPMIXER_CFG).eval()
    mono = torch.randn(1, 1, 200)
    with torch.inference_mode():
        expected = upmixer(mono)
        compile_for_inference(upmixer, backend=broken_backend)
        with pytest.warns(RuntimeWarning, match="torch.compile failed for Upmixer .*no C\\+\\+ compiler.*eagerly"):
            torch.testing.assert_close(upmixer(mono), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the eager forward is back for good: no second warning
            torch.testing.assert_close(upmixer(mono), expected)
    assert "forward" not in vars(upmixer)


def test_an_input_the_model_refuses_raises_its_own_error_and_keeps_the_compiled_forward():
    upmixer = compile_for_inference(Upmixer(UPMIXER_CFG).eval(), backend=BACKEND)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="mono audio must be"):
            upmixer(torch.randn(1, 2, 200))
    assert "forward" in vars(upmixer)


# ---- the text-embedding cache ---------------------------------------------------------------------------


class CountingEncoder(HashEncoder):
    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return super().encode(texts)


def assert_same(a: TextCondition, b: TextCondition) -> None:
    for x, y in zip((a.tokens, a.mask, a.pooled), (b.tokens, b.mask, b.pooled)):
        assert torch.equal(x, y)


def test_a_repeated_prompt_skips_the_encoder_and_gives_identical_tensors():
    encoder = CountingEncoder()
    cache = CachedTextEncoder(encoder, capacity=4)
    first = cache.encode(["slow strings in D minor"])
    assert_same(cache.encode(["slow strings in D minor"]), first)
    assert encoder.calls == [["slow strings in D minor"]]


def test_a_batch_of_cached_and_fresh_prompts_equals_encoding_it_whole():
    encoder = CountingEncoder()
    cache = CachedTextEncoder(encoder, capacity=4)
    cache.encode(["a long prompt of many words", "short"])
    batch = ["short", "new words here", "a long prompt of many words", "short"]
    assert_same(cache.encode(batch), HashEncoder().encode(batch))
    assert encoder.calls[1:] == [["new words here"]]  # only the fresh prompt, once


def test_the_cache_is_bounded_and_forgets_the_least_recently_used():
    encoder = CountingEncoder()
    cache = CachedTextEncoder(encoder, capacity=2)
    cache.encode(["a"])
    cache.encode(["b"])
    cache.encode(["a"])  # a is now the most recently used
    cache.encode(["c"])  # b goes
    assert len(cache) == 2
    cache.encode(["a", "c"])
    cache.encode(["b"])
    assert encoder.calls == [["a"], ["b"], ["c"], ["b"]]
    with pytest.raises(ValueError, match="capacity = 0"):
        CachedTextEncoder(encoder, capacity=0)


def test_the_generator_encodes_a_repeated_prompt_once():
    gen = make_generator()
    encoder = CountingEncoder()
    gen.text_encoder = CachedTextEncoder(encoder, capacity=8)
    one, _ = gen.generate(["calm piano"], 0.1, [1], recipe(steps=2))
    two, timings = gen.generate(["calm piano"], 0.1, [1], recipe(steps=2))
    assert encoder.calls == [["calm piano"]]
    np.testing.assert_array_equal(one, two)
    assert timings["text_ms"] >= 0


def test_generator_wraps_its_text_encoder_in_the_cache():
    assert isinstance(make_generator().text_encoder, CachedTextEncoder)
