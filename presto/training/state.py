"""Resumable training state: weights, optimiser moments, RNG and step, as safetensors + JSON.

A state is a folder `step-<n>/` holding `state.safetensors` (every tensor) and `meta.json` (every other
value); it is written under a temporary name and renamed, so a crash mid-save leaves the previous state
usable. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from presto.errors import InputError

STATE = "state.safetensors"
META = "meta.json"


def _split(prefix: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested structure into `tensors`, leaving a JSON-able reference behind."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_split(f"{prefix}/k{i}", k, tensors), _split(f"{prefix}/{i}", v, tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_split(f"{prefix}/{i}", v, tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, dict) and "__list__" in value:
        items = [_join(v, tensors) for v in value["__list__"]]
        return tuple(items) if value["tuple"] else items
    return value


def save_state(folder: str | Path, step: int, modules: dict[str, nn.Module],
               optimizers: dict[str, torch.optim.Optimizer], extra: dict[str, Any] | None = None,
               keep: int = 2) -> Path:
    """Write `folder/step-<step>/`; keep the newest `keep` states."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            tensors[f"module/{name}/{key}"] = t.detach().cpu().contiguous()
    meta = {
        "step": step,
        "extra": extra or {},
        "optimizers": {name: _split(f"optim/{name}", opt.state_dict(), tensors) for name, opt in optimizers.items()},
        "rng": _split("rng", {"torch": torch.get_rng_state()}, tensors),
    }
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / STATE))
    (tmp / META).write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(folder: str | Path) -> Path | None:
    folder = Path(folder)
    states = sorted(p for p in folder.glob("step-*") if (p / META).is_file()) if folder.is_dir() else []
    return states[-1] if states else None


def load_state(path: str | Path, modules: dict[str, nn.Module],
               optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, dict[str, Any]]:
    """Restore modules and optimisers in place; return (step, extra)."""
    path = Path(path)
    try:
        tensors = load_file(str(path / STATE))
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable training state ({err})") from None
    for name, module in modules.items():
        prefix = f"module/{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in optimizers.items():
        opt.load_state_dict(_join(meta["optimizers"][name], tensors))
    torch.set_rng_state(_join(meta["rng"], tensors)["torch"])
    return int(meta["step"]), meta["extra"]
