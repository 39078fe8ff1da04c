"""Model weights on disk: <folder>/model.safetensors + <folder>/config.json. Nothing is unpickled.

config.json names the model class and its config class (both inside the `presto` package, so loading can
only build our own networks) and holds the config's fields; the model is rebuilt as ModelClass(config)
and its state dict loaded strictly, in the dtypes it was saved in. Works for any nn.Module built from a
single presto.config.Section (the DiT, the VAE, ...).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from presto.config import Section
from presto.errors import InputError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "presto-model/1"
PACKAGE = "presto."


def _dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def save_model(model: nn.Module, cfg: Section, folder: str | Path) -> Path:
    """Write the weights and config of `model` (built as type(model)(cfg)) into `folder`; returns it."""
    for obj in (model, cfg):
        name = _dotted_name(type(obj))
        if not name.startswith(PACKAGE) or "<locals>" in name:
            raise ValueError(f"save_model: {name} is not a class of the presto package, "
                             "so load_model could not rebuild it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT,
        "model_type": _dotted_name(type(model)),
        "config_type": _dotted_name(type(cfg)),
        "config": cfg.model_dump(mode="json"),
    }
    state = {key: tensor.detach().contiguous() for key, tensor in model.state_dict().items()}
    # Write beside the target and rename, so a crash never leaves a half-written file under the final name.
    save_file(state, folder / f".{WEIGHTS}.tmp", metadata={"format": FORMAT})
    os.replace(folder / f".{WEIGHTS}.tmp", folder / WEIGHTS)
    (folder / f".{CONFIG}.tmp").write_text(json.dumps(header, indent=2) + "\n")
    os.replace(folder / f".{CONFIG}.tmp", folder / CONFIG)
    return folder


def _resolve(dotted: object, base: type, source: Path, key: str) -> type:
    if not isinstance(dotted, str) or not dotted.startswith(PACKAGE):
        raise InputError(f"{source}: {key} = {dotted!r}: must name a class of the presto package")
    module_name, _, attr = dotted.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise InputError(f"{source}: {key} = {dotted!r}: no such class in this version of presto") from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise InputError(f"{source}: {key} = {dotted!r} is not a {base.__name__}")
    return obj


def load_config(folder: str | Path) -> tuple[type, Section]:
    """(model class, validated config) recorded in <folder>/config.json."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise InputError(f"{path}: model config not found (is {folder} a saved model folder?)")
    try:
        header = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else header
        raise InputError(f"{path}: format must be {FORMAT!r}, got {found!r}")
    model_cls = _resolve(header.get("model_type"), nn.Module, path, "model_type")
    config_cls = _resolve(header.get("config_type"), Section, path, "config_type")
    try:
        cfg = config_cls.model_validate(header.get("config"))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise InputError(f"{path}: config.{key}: {first['msg']}") from None
    return model_cls, cfg


def load_model(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Section]:
    """Rebuild the model saved in `folder` on `device`; returns (model, config)."""
    model_cls, cfg = load_config(folder)
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise InputError(f"{path}: model weights not found")
    try:
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable safetensors file: {err}") from None
    model = model_cls(cfg)
    try:
        # assign=True keeps the saved tensors (dtype, device) instead of copying into fresh ones.
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise InputError(f"{path}: weights do not fit {model_cls.__name__}({cfg!r}): {err}") from None
    return model.to(device), cfg  # buffers outside the state dict follow the weights' device
