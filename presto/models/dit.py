"""The diffusion transformer F(x; c_noise, text) inside the EDM denoiser, with Presto-L's layer budgets.

One token per latent frame: [B, C, T] latents -> linear -> T tokens of `width`. Positions are rotary
(applied to self-attention queries and keys), so there is no max_frames and any clip length works.
Each block (DiT's adaLN-Zero, plus cross-attention to the text encoder's token states):

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))
    h = h + gate1 * SelfAttn(LN(h) * (1 + scale1) + shift1)
    h = h + CrossAttn(LN'(h), text tokens, key padding mask)
    h = h + gate2 * MLP(LN(h) * (1 + scale2) + shift2)

with the global vector c = NoiseMLP(sinusoids(c_noise)) + PooledMLP(pooled text) [+ BudgetEmbedding].
The final layer is an adaLN'd LayerNorm + linear. Every adaLN projection and the final linear start at
zero (DiT), so an untrained model outputs 0 and every block starts with its self-attention and MLP
branches gated shut.

Layer budgets (Presto-L, ASE): `budget` = number of blocks that run. With the reroute (Presto-L) they
are the first budget-1 blocks and then always the last block, so the output layer sees states of the
statistics it was trained on; without it (plain ASE) the first `budget` blocks feed the output layer.
With `budget_conditioning` the budget is embedded into c, which drives every block's adaLN and the final
layer's. The two are independent switches so each can be ablated; plain ASE is
`budget_conditioning=False` with `reroute=False`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch
from torch import nn

from presto.config import DiTConfig
from presto.models.attention import apply_rotary, attention, rotary_tables
from presto.text.condition import TextCondition

# Rotary base of RoFormer / LLaMA: wavelengths up to ~60K frames, far beyond any clip (21.5 frames/s).
ROPE_BASE = 10000.0
# c_noise = ln(sigma)/4 spans about [-1.55, 1.10] for sigma in [0.002, 80]: angular frequencies from 1
# (whose sine is monotone over the whole range) to 1000 (resolves steps of ~1e-3 in c_noise).
NOISE_MAX_FREQ = 1000.0
NORM_EPS = 1e-6


def layer_schedule(budget: int, depth: int, reroute: bool) -> list[int]:
    """Blocks run under a budget: [0 .. budget-2] + [depth-1] with the reroute, [0 .. budget-1] without."""
    if not 1 <= budget <= depth:
        raise ValueError(f"layer budget {budget} must be in [1, {depth}] (the DiT's depth)")
    if reroute:
        return list(range(budget - 1)) + [depth - 1]
    return list(range(budget))


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_freq: float) -> torch.Tensor:
    """[cos(v f_i), sin(v f_i)] for dim/2 angular frequencies f_i geometric from 1 to max_freq: [N] -> [N, dim]."""
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2, device=values.device))
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        width, self.heads = cfg.width, cfg.heads
        self.norm_attn = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        # The cross-attention branch has no adaLN, so its norm keeps a learned affine (as in PixArt).
        self.norm_cross = nn.LayerNorm(width, eps=NORM_EPS)
        self.cross_q = nn.Linear(width, width)
        self.cross_kv = nn.Linear(cfg.text_dim, 2 * width)
        self.cross_out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, cfg.mlp_width), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))

    def forward(self, h: torch.Tensor, c: torch.Tensor, cond: TextCondition,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)[:, None, :].chunk(6, dim=-1)

        q, k, v = self.qkv(modulate(self.norm_attn(h), shift_a, scale_a)).chunk(3, dim=-1)
        q, k = apply_rotary(self._heads(q), *rope), apply_rotary(self._heads(k), *rope)
        h = h + gate_a * self.attn_out(attention(q, k, self._heads(v)).flatten(2))

        q = self._heads(self.cross_q(self.norm_cross(h)))
        k, v = self.cross_kv(cond.tokens).chunk(2, dim=-1)
        h = h + self.cross_out(attention(q, self._heads(k), self._heads(v), key_mask=cond.mask).flatten(2))

        return h + gate_m * self.mlp(modulate(self.norm_mlp(h), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, width: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=NORM_EPS)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, channels)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(h), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.input_proj = nn.Linear(cfg.latent_channels, width)
        self.noise_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.pooled_embed = nn.Sequential(nn.Linear(cfg.text_dim, width), nn.SiLU(), nn.Linear(width, width))
        # Row b-1 embeds budget b. Zero at start, so a fine-tune from the teacher starts at its function.
        self.budget_embed = nn.Embedding(cfg.depth, width) if cfg.budget_conditioning else None
        # Classifier-free guidance's "no caption": one learned token (the rest padding) and a pooled vector.
        self.null_token = nn.Parameter(torch.empty(cfg.text_dim))
        self.null_pooled = nn.Parameter(torch.empty(cfg.text_dim))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(width, cfg.latent_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.null_token, std=0.02)
        nn.init.normal_(self.null_pooled, std=0.02)
        # adaLN-Zero: every modulation (hence every gate) and the output layer start at zero.
        zeroed = [block.modulation[-1] for block in self.blocks] + [self.final.modulation[-1], self.final.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.budget_embed is not None:
            nn.init.zeros_(self.budget_embed.weight)

    # -- conditioning -------------------------------------------------------------------------------

    def null_cond(self, batch: int, length: int = 1) -> TextCondition:
        """The learned unconditional input, padded to `length` tokens."""
        if length < 1:
            raise ValueError(f"null_cond: length must be at least 1, got {length}")
        tokens = torch.cat([self.null_token.expand(batch, 1, -1),
                            self.null_token.new_zeros(batch, length - 1, self.cfg.text_dim)], dim=1)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=tokens.device)
        mask[:, 0] = True
        return TextCondition(tokens, mask, self.null_pooled.expand(batch, -1))

    def drop_cond(self, cond: TextCondition, keep: torch.Tensor) -> TextCondition:
        """Swap in the null condition for items where keep [B] is False (condition dropout)."""
        batch, length = cond.mask.shape
        if keep.shape != (batch,) or keep.dtype != torch.bool:
            raise ValueError(f"drop_cond: keep must be bool [{batch}], got {keep.dtype} {list(keep.shape)}")
        null = self.null_cond(batch, length)
        return TextCondition(
            tokens=torch.where(keep[:, None, None], cond.tokens, null.tokens.to(cond.tokens.dtype)),
            mask=torch.where(keep[:, None], cond.mask, null.mask),
            pooled=torch.where(keep[:, None], cond.pooled, null.pooled.to(cond.pooled.dtype)),
        )

    def global_embedding(self, c_noise: torch.Tensor, pooled: torch.Tensor,
                         budgets: torch.Tensor | None) -> torch.Tensor:
        """c [B, width] that drives every adaLN. budgets [B] (None: the full depth) counts only with
        budget_conditioning."""
        weight = self.input_proj.weight
        c = self.noise_embed(sinusoidal_embedding(c_noise, self.cfg.width, NOISE_MAX_FREQ).to(weight.dtype))
        c = c + self.pooled_embed(pooled)
        if self.budget_embed is not None:
            if budgets is None:
                budgets = torch.full_like(c_noise, self.cfg.depth, dtype=torch.long)
            c = c + self.budget_embed(budgets - 1)
        return c

    # -- forward ------------------------------------------------------------------------------------

    def forward(
        self,
        x_in: torch.Tensor,
        c_noise: torch.Tensor | float,
        cond: TextCondition,
        *,
        blocks: Sequence[int] | None = None,
        budget: int | torch.Tensor | None = None,
        return_hidden: Collection[int] | None = None,
        reroute: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """F(x_in; c_noise, cond): [B, C, T] -> [B, C, T].

        blocks: indices of the blocks to run, in order (default all). Only these execute; e.g. Presto-S's
            discriminator features: blocks=range(depth // 2), return_hidden={depth // 2 - 1}.
        budget: number of active blocks (int, or LongTensor [B] per item); the blocks are
            layer_schedule(budget, depth, reroute). Exclusive with `blocks`. Without a budget, a
            budget-conditioned model embeds the full depth.
        return_hidden: block indices whose output states [B, T, width] are returned as a dict beside the
            output; every listed block must run (for every item).
        reroute: with a budget, always end on the last block (Presto-L) or not (plain ASE).
        """
        batch = self._check_inputs(x_in, cond)
        c_noise = self._noise_levels(c_noise, batch, x_in.device)
        wanted = set(return_hidden) if return_hidden is not None else set()
        if not all(isinstance(i, int) and 0 <= i < self.cfg.depth for i in wanted):
            raise ValueError(f"return_hidden {sorted(wanted)} must hold block indices in [0, {self.cfg.depth})")
        plans, budgets = self._plans(batch, blocks, budget, reroute)

        c = self.global_embedding(c_noise, cond.pooled, budgets)
        h = self.input_proj(x_in.transpose(1, 2))
        rope = rotary_tables(x_in.shape[2], self.cfg.head_dim, ROPE_BASE, device=x_in.device)

        if len(plans) == 1:
            h, hidden = self._run_blocks(plans[0][1], h, c, cond, rope, wanted)
        else:  # per-item budgets: run each budget's items together, then put them back in batch order
            parts, part_hidden, order = [], [], []
            for index, schedule in plans:
                h_part, hid = self._run_blocks(schedule, h[index], c[index], cond.select(index), rope, wanted)
                parts.append(h_part)
                part_hidden.append(hid)
                order.append(index)
            inverse = torch.argsort(torch.cat(order))
            h = torch.cat(parts)[inverse]
            hidden = {i: torch.cat([hid[i] for hid in part_hidden])[inverse] for i in wanted}

        out = self.final(h, c).transpose(1, 2)
        return out if return_hidden is None else (out, hidden)

    def _run_blocks(self, schedule: Sequence[int], h: torch.Tensor, c: torch.Tensor, cond: TextCondition,
                    rope: tuple[torch.Tensor, torch.Tensor], wanted: set[int]) -> tuple[torch.Tensor, dict]:
        missing = wanted - set(schedule)
        if missing:
            raise ValueError(f"return_hidden asks for blocks {sorted(missing)}, which do not run "
                             f"(blocks run: {list(schedule)})")
        hidden = {}
        for i in schedule:
            h = self.blocks[i](h, c, cond, rope)
            if i in wanted:
                hidden[i] = h
        return h, hidden

    def _plans(self, batch: int, blocks: Sequence[int] | None, budget: int | torch.Tensor | None,
               reroute: bool) -> tuple[list[tuple[torch.Tensor | None, list[int]]], torch.Tensor | None]:
        """[(item index or None for all, block schedule)] and the per-item budgets to embed (None: full)."""
        depth = self.cfg.depth
        if budget is None:
            if not reroute:
                raise ValueError("reroute=False only applies together with a budget")
            if blocks is None:
                return [(None, list(range(depth)))], None
            schedule = list(blocks)
            if not schedule or not all(isinstance(i, int) and 0 <= i < depth for i in schedule):
                raise ValueError(f"blocks {schedule} must be a non-empty list of block indices in [0, {depth})")
            if len(set(schedule)) != len(schedule):
                raise ValueError(f"blocks {schedule} repeats a block")
            return [(None, schedule)], None
        if blocks is not None:
            raise ValueError("pass either blocks or budget, not both")
        if isinstance(budget, int):
            return [(None, layer_schedule(budget, depth, reroute))], torch.full((batch,), budget, dtype=torch.long,
                                                                               device=self.input_proj.weight.device)
        if budget.shape != (batch,) or budget.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"budget must be an int or an integer tensor [{batch}], "
                             f"got {budget.dtype} {list(budget.shape)}")
        values = budget.unique().tolist()
        if len(values) == 1:
            return [(None, layer_schedule(values[0], depth, reroute))], budget.long()
        return [((budget == b).nonzero().squeeze(1), layer_schedule(b, depth, reroute)) for b in values], budget.long()

    def _check_inputs(self, x_in: torch.Tensor, cond: TextCondition) -> int:
        cfg = self.cfg
        if x_in.ndim != 3 or x_in.shape[1] != cfg.latent_channels:
            raise ValueError(f"x_in must be [B, {cfg.latent_channels}, T] latents, got {list(x_in.shape)}")
        batch = x_in.shape[0]
        if cond.tokens.ndim != 3 or cond.tokens.shape[0] != batch or cond.tokens.shape[2] != cfg.text_dim:
            raise ValueError(f"cond.tokens must be [{batch}, L, {cfg.text_dim}], got {list(cond.tokens.shape)}")
        if cond.mask.shape != cond.tokens.shape[:2] or cond.mask.dtype != torch.bool:
            raise ValueError(f"cond.mask must be bool {list(cond.tokens.shape[:2])}, "
                             f"got {cond.mask.dtype} {list(cond.mask.shape)}")
        if cond.pooled.shape != (batch, cfg.text_dim):
            raise ValueError(f"cond.pooled must be [{batch}, {cfg.text_dim}], got {list(cond.pooled.shape)}")
        if not bool(cond.mask.any(dim=1).all()):  # an all-padding caption would make attention NaN
            raise ValueError("cond.mask: every item needs at least one real token (use null_cond for none)")
        return batch

    @staticmethod
    def _noise_levels(c_noise: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        c_noise = torch.as_tensor(c_noise, device=device).flatten()
        if c_noise.numel() not in (1, batch):
            raise ValueError(f"c_noise must hold 1 or {batch} (batch) values, got {c_noise.numel()}")
        return c_noise.expand(batch)


def dit_flops(cfg: DiTConfig, frames: int, text_len: int, n_blocks: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward for one item: the count MFU is quoted in.

    Element-wise work (norms, activations, softmax, rotary) is left out; attention counts every key it
    scores, padding included.
    """
    t, l, w, c, d, m = frames, text_len, cfg.width, cfg.latent_channels, cfg.text_dim, cfg.mlp_width
    embeddings = t * c * w + 2 * w * w + (d * w + w * w)  # input projection, noise MLP, pooled-text MLP
    block = (
        6 * w * w                                   # adaLN modulation
        + t * w * 3 * w + 2 * t * t * w + t * w * w  # self-attention: qkv, scores and values, out
        + 2 * t * w * w + l * d * 2 * w + 2 * t * l * w  # cross-attention: q and out, kv, scores and values
        + 2 * t * w * m                             # MLP
    )
    final = 2 * w * w + t * w * c
    return 2 * (embeddings + n_blocks * block + final)
