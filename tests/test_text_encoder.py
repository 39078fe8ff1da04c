"""The packaged MiniLM loads offline and gives masked token states plus a pooled vector."""

from __future__ import annotations

import pytest
import torch

from presto.errors import InputError
from presto.text.encoder import MiniLMEncoder, TextEncoderConfig, check_prompt, clean_prompt, load_text_encoder


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return load_text_encoder(TextEncoderConfig(kind="minilm", path=None, max_tokens=64))


def test_tokens_mask_and_pooled(encoder: MiniLMEncoder) -> None:
    batch = encoder.encode(["a calm solo piano piece in D minor at 90 bpm", "organ", ""])
    assert batch.tokens.shape[0] == 3 and batch.tokens.shape[2] == encoder.dim == 384
    lengths = batch.mask.sum(1)
    assert lengths[0] > lengths[1] >= lengths[2] >= 1  # CLS and SEP even for an empty prompt
    assert torch.all(batch.tokens[~batch.mask] == 0)
    torch.testing.assert_close(batch.pooled.norm(dim=1), torch.ones(3))


def test_batch_independence(encoder: MiniLMEncoder) -> None:
    alone = encoder.encode(["strings and flute, bright, at 120 bpm"])
    mixed = encoder.encode(["x", "strings and flute, bright, at 120 bpm"])
    n = int(alone.mask.sum())
    torch.testing.assert_close(alone.tokens[0, :n], mixed.tokens[1, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.pooled[0], mixed.pooled[1], atol=1e-5, rtol=1e-4)


def test_similar_prompts_are_closer(encoder: MiniLMEncoder) -> None:
    p = encoder.encode(["calm solo piano", "gentle piano solo", "loud brass fanfare with drums"]).pooled
    assert p[0] @ p[1] > p[0] @ p[2]


def test_hostile_prompts(encoder: MiniLMEncoder) -> None:
    huge = "la " * 50_000
    batch = encoder.encode([huge, b"caf\xe9 \xff\xfe music".decode("latin-1"), "tab\tand\x00null"])
    assert batch.mask.sum(1)[0] <= 64
    assert clean_prompt(b"caf\xc3\xa9 \xff") == "café \ufffd"
    assert clean_prompt("a\x00b\x1bc") == "a b c"
    assert len(clean_prompt(huge)) == 2000


def test_bad_local_path_is_named(tmp_path) -> None:
    with pytest.raises(InputError, match=str(tmp_path)):
        load_text_encoder(TextEncoderConfig(kind="minilm", path=str(tmp_path), max_tokens=64))
    with pytest.raises(InputError, match="local T5 model folder"):
        load_text_encoder(TextEncoderConfig(kind="t5", path=None, max_tokens=64))


def test_check_prompt_refuses_empty_and_says_what_cleaning_changed() -> None:
    assert check_prompt("  calm\tpiano ") == ("calm piano", [])
    for empty in ("", "   ", "\x00\x1b"):
        with pytest.raises(InputError, match="prompt is empty"):
            check_prompt(empty)
    cleaned, notes = check_prompt(b"caf\xc3\xa9 \xff organ")
    assert cleaned == "café \ufffd organ" and notes == ["the prompt is not valid UTF-8: undecodable bytes were replaced"]
    # A command line's undecodable bytes arrive as lone surrogates (surrogateescape).
    assert "not valid UTF-8" in check_prompt(b"organ \xff".decode("utf-8", "surrogateescape"))[1][0]
    cleaned, notes = check_prompt("la " * 5000)
    assert len(cleaned) == 2000 and "only the first 2000" in notes[0]
