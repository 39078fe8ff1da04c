"""Multi-head attention kernels and rotary positions, shared by the DiT's self- and cross-attention.

Tensors are laid out [batch, tokens, heads, head_dim] (flash-attn's layout, so the GPU path needs no
transpose). `key_mask` is [batch, keys] bool, True where a key is real; every query attends to every real
key (no causal mask: a denoiser sees the whole clip).

Kernel choice: on CUDA in fp16/bf16 with flash-attn installed, FlashAttention-2 (the paper's kernel):
the dense kernel without a mask, the varlen kernel with one (padded keys are dropped, not masked).
Everywhere else torch's scaled_dot_product_attention. On CUDA its kernels are tried in the order
SDPA_PRIORITY, first usable wins: its own FlashAttention-2 (bf16/fp16, no mask: the self-attention), the
memory-efficient kernel (takes the key mask: the cross-attention), cuDNN, then the unfused math kernel.
Torch's built-in order has moved between releases (2.9's tries math before cuDNN), so it is fixed here.
On a CPU, torch picks its own fused kernel.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # flash-attn is an optional GPU extra; SDPA covers every case without it
    flash_attn_func = flash_attn_varlen_func = None

FLASH_DTYPES = (torch.float16, torch.bfloat16)
SDPA_PRIORITY = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH]


def flash_usable(q: torch.Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in FLASH_DTYPES


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over the real keys. q [B, Tq, H, D], k/v [B, Tk, H, D] -> [B, Tq, H, D]."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "[B, Tq, H, D], [B, Tk, H, D], [B, Tk, H, D]")
    if key_mask is not None:
        if key_mask.shape != k.shape[:2] or key_mask.dtype != torch.bool:
            raise ValueError(f"attention: key_mask must be bool [B, Tk] = {list(k.shape[:2])}, "
                             f"got {key_mask.dtype} {list(key_mask.shape)}")
    if flash_usable(q):
        return _flash_attention(q, k, v, key_mask)
    return _sdpa_attention(q, k, v, key_mask)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads and queries
    kernels = sdpa_kernel(SDPA_PRIORITY, set_priority=True) if q.is_cuda else contextlib.nullcontext()
    with kernels:  # SDPA's layout is [B, H, T, D]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    if key_mask is None:
        return flash_attn_func(q, k, v)
    # Varlen: queries are all real (every latent frame counts), keys are packed without their padding.
    batch, q_len, heads, dim = q.shape
    k_lens = key_mask.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(k_lens, dim=0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(
        q.reshape(batch * q_len, heads, dim), k[key_mask], v[key_mask],
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=q_len, max_seqlen_k=int(k_lens.max()),
    )
    return out.reshape(batch, q_len, heads, dim)


def rotary_tables(
    length: int, head_dim: int, base: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim // 2] of the angles pos * base^(-2i / head_dim) (RoFormer's frequencies)."""
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + D/2]) of x [B, T, H, D] by the angle of its position.

    Then <rot(q, m), rot(k, n)> depends on m - n only: attention sees relative positions, at any length.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
