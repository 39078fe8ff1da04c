"""What a denoiser reads of a caption, produced by a text encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextCondition:
    """Token states [B, L, text_dim], mask [B, L] (True on real tokens, at least one per item) and a pooled
    vector [B, text_dim]."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def select(self, index: torch.Tensor) -> "TextCondition":
        return TextCondition(self.tokens[index], self.mask[index], self.pooled[index])

    def to(self, device: torch.device | str) -> "TextCondition":
        return TextCondition(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))
