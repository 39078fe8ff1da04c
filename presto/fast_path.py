"""The inference fast path: networks compiled with torch.compile, or run eagerly when compiling fails.

What generation compiles (`Generator`, `load_upmixer`), each through `compile_for_inference`:
- every DiT block on its own ("regional" compilation): the blocks share their code and their shapes, so
  one compiled graph serves all of them, and a layer budget that skips blocks (Presto-L, Presto-LS) needs
  no new compilation; the small layers around the blocks stay eager;
- the VAE decoder and the stereo upmixer, whole (convolutions, no data-dependent control flow).

Shapes follow torch's automatic dynamic shapes: the first call compiles for its exact shapes; a later call
with another shape (another clip length, caption length, or the doubled batch of guidance) compiles once
more with those sizes symbolic, and later shapes reuse that graph (torch still gives a size of 1 a graph of
its own). Fully static shapes would compile anew for every caption length a prompt brings.

The compiled code is inductor's default mode; CUDA graphs (mode "reduce-overhead") are left out until they
are measured on a GPU. The DiT runs under bf16 autocast on CUDA either way (presto.generation); attention's
kernel is chosen in presto.models.attention.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, get_args

import torch
from torch import nn

from presto.config import CompileChoice

COMPILE_CHOICES = get_args(CompileChoice)
WARNING_CHARS = 300  # of a compiler error quoted in the fallback warning (some run to pages)


def wants_compile(choice: str, device: torch.device) -> bool:
    """'on', 'off', or 'auto': on for CUDA, off on a CPU (where compiling costs about a minute per network
    and only the VAE decoder and the upmixer gain, ~2x; the DiT is matmul-bound: bench/RESULTS.md)."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile = {choice!r}: must be one of {', '.join(COMPILE_CHOICES)} "
                         "(auto: on for CUDA, off on a CPU)")
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def compile_for_inference(module: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """`module` with its forward compiled in place (the same object: its attributes, state dict and
    callers are unchanged), returned for convenience.

    torch.compile works lazily, so a failure (no C++ compiler, no triton, an unsupported operation) shows
    on the first call: that call and every later one then run the eager forward, with a warning naming the
    module and the error. An input the eager forward refuses too raises the eager error and keeps the
    compiled forward for the next call. A module compiled already is left as it is.
    """
    if "forward" in vars(module):
        return module
    eager = module.forward
    name = type(module).__name__
    try:
        from torch._dynamo.exc import TorchDynamoException  # here, not at import: torch._dynamo takes ~1 s

        compiled = torch.compile(eager, backend=backend, dynamic=None)
    except (ImportError, RuntimeError) as err:  # torch.compile itself unavailable (e.g. on an unsupported Python)
        _warn_eager(name, err)
        return module

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except TorchDynamoException as err:
            out = eager(*args, **kwargs)
            _warn_eager(name, err)
            del module.forward  # back to the class's own forward for good
            return out

    module.forward = forward
    return module


def _warn_eager(name: str, err: Exception) -> None:
    message = " ".join(str(err).split())  # torch's errors span lines (the backend's own error comes second)
    if len(message) > WARNING_CHARS:
        message = message[:WARNING_CHARS] + " ..."
    warnings.warn(f"torch.compile failed for {name} ({type(err).__name__}: {message}); running it eagerly",
                  RuntimeWarning, stacklevel=3)
