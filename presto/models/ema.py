"""Exponential moving average of a model's weights.

After each optimiser step: shadow <- decay * shadow + (1 - decay) * weight, for every parameter; buffers
(running statistics, if any) are copied as they are. The shadow averages the last ~1 / (1 - decay) steps
and is what gets evaluated and exported. Saved as a flat safetensors file (tensors keyed by the model's
own parameter names, decay in the metadata): nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from presto.errors import InputError


class EMA:
    """Shadow copies of `model`'s parameters and buffers, updated with `update(model)`."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay = {decay} must be in [0, 1)")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            name: tensor.detach().clone() for name, tensor in _tensors(model).items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, tensor in _tensors(model).items():
            if name in params and tensor.is_floating_point():
                self.shadow[name].lerp_(tensor.detach(), 1.0 - self.decay)
            else:
                self.shadow[name].copy_(tensor)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (e.g. a copy used for evaluation)."""
        for name, tensor in _tensors(model).items():
            tensor.copy_(self.shadow[name])

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or unexpected:
            raise ValueError(f"EMA state does not fit the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        for name, tensor in state.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state '{name}' has shape {tuple(tensor.shape)}, "
                                 f"the model's is {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)

    def save(self, path: str | Path) -> None:
        save_file({name: t.contiguous() for name, t in self.shadow.items()}, str(path),
                  metadata={"decay": repr(self.decay)})

    def load(self, path: str | Path) -> None:
        """Load shadow weights saved by `save`; the decay stays the one this EMA was built with (a params
        change must take effect on resume)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: EMA weights file not found")
        self.load_state_dict(load_file(str(path)))


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}
