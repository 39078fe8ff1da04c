"""The diffusion transformer: shapes, adaLN-Zero init, block subsets, layer budgets, text conditioning,
attention kernels, weights on disk, FLOPs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError
from torch.utils.flop_counter import FlopCounterMode

from presto.errors import InputError
from presto.models import attention as attention_module
from presto.models import dit as dit_module
from presto.models.attention import apply_rotary, attention, rotary_tables
from presto.models.checkpoint import CONFIG, WEIGHTS, load_model, save_model
from presto.models.dit import DiT, DiTConfig, dit_flops, layer_schedule, sinusoidal_embedding
from presto.text.condition import TextCondition

C, T, D = 4, 10, 12  # latent channels, frames, text_dim


def tiny_cfg(**changes) -> DiTConfig:
    fields = dict(latent_channels=C, width=32, depth=6, heads=2, mlp_ratio=2.0, text_dim=D, budget_conditioning=False)
    return DiTConfig(**(fields | changes))


def make_cond(batch: int, length: int = 5, real: list[int] | None = None) -> TextCondition:
    real = real or [length] * batch
    mask = torch.arange(length)[None, :] < torch.tensor(real)[:, None]
    return TextCondition(torch.randn(batch, length, D), mask, torch.randn(batch, D))


def randomize_(model: torch.nn.Module, keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """Give every parameter (but those named in keep) random values, so outputs are not the zero of init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(keep):
                p.copy_(torch.randn_like(p) * 0.2)
    return model


def block_calls(model: DiT) -> tuple[list[int], list]:
    calls: list[int] = []
    handles = [b.register_forward_pre_hook(lambda _m, _a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    return calls, handles


def reference_attention(q, k, v, key_mask=None):
    """softmax(q k^T / sqrt(d)) v written out with matmuls (B, T, H, D layout)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- config ------------------------------------------------------------------------------------------

def test_config_validates():
    with pytest.raises(ValidationError, match="multiple of heads"):
        tiny_cfg(width=30, heads=4)
    with pytest.raises(ValidationError, match="even"):
        tiny_cfg(width=30, heads=2)
    with pytest.raises(ValidationError, match="extra"):
        DiTConfig(**tiny_cfg().model_dump(), max_frames=100)
    with pytest.raises(ValidationError, match="budget_conditioning"):
        DiTConfig(**{k: v for k, v in tiny_cfg().model_dump().items() if k != "budget_conditioning"})


# -- shapes and init ---------------------------------------------------------------------------------

def test_shapes_and_untrained_output_is_exactly_zero():
    model = DiT(tiny_cfg())
    x = torch.randn(3, C, T)
    out, hidden = model(x, torch.randn(3), make_cond(3), return_hidden={2})
    assert out.shape == (3, C, T)
    assert hidden[2].shape == (3, T, 32)
    assert torch.equal(out, torch.zeros_like(out))
    assert model(x, 0.3, make_cond(3)).shape == (3, C, T)  # one noise level for the whole batch


def test_bad_inputs_are_named():
    model = DiT(tiny_cfg())
    x = torch.randn(2, C, T)
    with pytest.raises(ValueError, match="x_in"):
        model(torch.randn(2, C + 1, T), torch.zeros(2), make_cond(2))
    with pytest.raises(ValueError, match="c_noise"):
        model(x, torch.zeros(3), make_cond(2))
    with pytest.raises(ValueError, match="at least one real token"):
        model(x, torch.zeros(2), make_cond(2, real=[3, 0]))
    with pytest.raises(ValueError, match="either blocks or budget"):
        model(x, torch.zeros(2), make_cond(2), blocks=[0], budget=2)
    with pytest.raises(ValueError, match="repeats"):
        model(x, torch.zeros(2), make_cond(2), blocks=[0, 0])
    with pytest.raises(ValueError, match="do not run"):
        model(x, torch.zeros(2), make_cond(2), blocks=[0, 1], return_hidden={3})


# -- running a subset of blocks ----------------------------------------------------------------------

def test_block_subset_runs_only_those_blocks_and_equals_manual_composition():
    model = randomize_(DiT(tiny_cfg()))
    x, c_noise, cond = torch.randn(2, C, T), torch.randn(2), make_cond(2, real=[5, 2])
    calls, handles = block_calls(model)
    out = model(x, c_noise, cond, blocks=[0, 3, 1])
    assert calls == [0, 3, 1]
    for handle in handles:
        handle.remove()

    c = model.global_embedding(c_noise, cond.pooled, None)
    rope = rotary_tables(T, model.cfg.head_dim, dit_module.ROPE_BASE)
    h = model.input_proj(x.transpose(1, 2))
    for i in [0, 3, 1]:
        h = model.blocks[i](h, c, cond, rope)
    torch.testing.assert_close(out, model.final(h, c).transpose(1, 2), rtol=0, atol=0)


def test_hidden_state_of_a_block_is_the_input_of_the_next():
    model = randomize_(DiT(tiny_cfg()))
    seen = []
    model.blocks[3].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _, hidden = model(torch.randn(2, C, T), torch.randn(2), make_cond(2), return_hidden={2, 4})
    assert set(hidden) == {2, 4}
    assert len(seen) == 1 and torch.equal(hidden[2], seen[0])
    assert not torch.equal(hidden[2], hidden[4])


# -- layer budgets (Presto-L, ASE) ---------------------------------------------------------------------

def test_layer_schedule():
    assert layer_schedule(12, 28, reroute=True) == list(range(11)) + [27]
    assert layer_schedule(12, 28, reroute=False) == list(range(12))
    assert layer_schedule(28, 28, reroute=True) == list(range(28))
    assert layer_schedule(1, 28, reroute=True) == [27]
    for bad in (0, 29):
        with pytest.raises(ValueError, match="budget"):
            layer_schedule(bad, 28, reroute=True)


@pytest.mark.parametrize("reroute", [True, False])
def test_budget_runs_its_schedule_and_the_reroute_always_runs_the_last_block(reroute):
    model = DiT(tiny_cfg())
    calls, _ = block_calls(model)
    for budget in range(1, 7):
        calls.clear()
        model(torch.randn(1, C, T), torch.zeros(1), make_cond(1), budget=budget, reroute=reroute)
        assert calls == layer_schedule(budget, 6, reroute)
        assert len(calls) == budget
        assert (calls[-1] == 5) == (reroute or budget == 6)


def test_per_item_budgets_equal_each_item_alone():
    model = randomize_(DiT(tiny_cfg(budget_conditioning=True)))
    budgets = torch.tensor([3, 6, 3, 1])
    x, c_noise, cond = torch.randn(4, C, T), torch.randn(4), make_cond(4, real=[5, 1, 3, 4])
    out, hidden = model(x, c_noise, cond, budget=budgets, return_hidden={5})
    for i in range(4):
        one = torch.tensor([i])
        out_i, hidden_i = model(x[one], c_noise[one], cond.select(one), budget=int(budgets[i]), return_hidden={5})
        torch.testing.assert_close(out[one], out_i, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hidden[5][one], hidden_i[5], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[0], model(x[:1], c_noise[:1], cond.select(torch.tensor([0])), budget=6)[0])


def test_zero_init_budget_embedding_leaves_the_function_unchanged():
    conditioned = randomize_(DiT(tiny_cfg(budget_conditioning=True)), keep=("budget_embed",))
    plain = DiT(tiny_cfg())
    state = {k: v for k, v in conditioned.state_dict().items() if not k.startswith("budget_embed")}
    plain.load_state_dict(state, strict=True)
    x, c_noise, cond = torch.randn(2, C, T), torch.randn(2), make_cond(2)
    for budget in (2, 6):
        assert torch.equal(conditioned(x, c_noise, cond, budget=budget),
                           plain(x, c_noise, cond, blocks=layer_schedule(budget, 6, reroute=True)))
    assert torch.equal(conditioned(x, c_noise, cond), plain(x, c_noise, cond))


def test_budget_embedding_reaches_every_block_and_the_final_layer():
    model = randomize_(DiT(tiny_cfg(budget_conditioning=True)))
    seen = []
    for module in [*model.blocks, model.final]:
        module.register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    x, c_noise, cond = torch.randn(2, C, T), torch.randn(2), make_cond(2)
    model(x, c_noise, cond, budget=4)
    assert len(seen) == 5  # 4 blocks + final layer
    without_budget = model.noise_embed(sinusoidal_embedding(c_noise, 32, dit_module.NOISE_MAX_FREQ))
    without_budget = without_budget + model.pooled_embed(cond.pooled)
    for c in seen:
        torch.testing.assert_close(c, without_budget + model.budget_embed.weight[3])


# -- text conditioning -------------------------------------------------------------------------------

def test_padded_text_tokens_do_not_change_the_output():
    model = randomize_(DiT(tiny_cfg()))
    x, c_noise = torch.randn(2, C, T), torch.randn(2)
    cond = make_cond(2, length=6, real=[6, 3])
    garbage = cond.tokens.clone()
    garbage[1, 3:] = 1e3 * torch.randn(3, D)
    out = model(x, c_noise, cond)
    torch.testing.assert_close(model(x, c_noise, TextCondition(garbage, cond.mask, cond.pooled)), out)
    one = torch.tensor([1])
    short = TextCondition(cond.tokens[1:, :3], cond.mask[1:, :3], cond.pooled[1:])
    # A batch of one with 3 tokens reduces in another order than a batch of two padded to 6: float32 rounding,
    # which differs between CPUs (1.3e-6 seen on an Intel Xeon).
    torch.testing.assert_close(model(x[one], c_noise[one], short), out[one], rtol=1e-4, atol=1e-5)
    changed = cond.tokens.clone()
    changed[1, :3] += 1.0  # real tokens do matter
    assert not torch.allclose(model(x, c_noise, TextCondition(changed, cond.mask, cond.pooled))[1], out[1])


def test_drop_cond_swaps_in_the_learned_null():
    model = randomize_(DiT(tiny_cfg()))
    cond = make_cond(3, length=4, real=[4, 2, 3])
    dropped = model.drop_cond(cond, torch.tensor([True, False, True]))
    keep = torch.tensor([0, 2])
    for field in ("tokens", "mask", "pooled"):
        assert torch.equal(getattr(dropped, field)[keep], getattr(cond, field)[keep])
    null = model.null_cond(1, 4)
    assert torch.equal(dropped.tokens[1], null.tokens[0])
    assert dropped.mask[1].tolist() == [True, False, False, False]
    assert torch.equal(dropped.tokens[1, 0], model.null_token.detach())
    assert torch.equal(dropped.pooled[1], model.null_pooled.detach())
    x, c_noise = torch.randn(3, C, T), torch.randn(3)
    torch.testing.assert_close(model(x, c_noise, dropped)[1:2], model(x[1:2], c_noise[1:2], model.null_cond(1)),
                               rtol=1e-4, atol=1e-5)  # batch of one against three: rounding, as above
    # The null is learned: condition dropout sends gradients into it.
    model(x, c_noise, dropped).square().sum().backward()
    assert model.null_token.grad.abs().sum() > 0 and model.null_pooled.grad.abs().sum() > 0


# -- attention ---------------------------------------------------------------------------------------

def test_attention_matches_the_softmax_formula_with_a_key_mask():
    q, k, v = torch.randn(2, 7, 3, 8), torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    torch.testing.assert_close(attention(q, k, v, mask), reference_attention(q, k, v, mask))
    torch.testing.assert_close(attention(q, k, v), reference_attention(q, k, v))
    # One real key: every query returns that key's value.
    single = torch.tensor([[True, False, False, False, False]] * 2)
    torch.testing.assert_close(attention(q, k, v, single), v[:, :1].expand(2, 7, 3, 8))


def test_flash_path_packs_padded_keys_correctly(monkeypatch):
    """The flash-attn branch (CUDA only) run on CPU with reference kernels standing in for flash-attn."""

    def dense(q, k, v):
        return reference_attention(q, k, v)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        outs = []
        for i in range(len(cu_seqlens_q) - 1):
            qs, ks = slice(cu_seqlens_q[i], cu_seqlens_q[i + 1]), slice(cu_seqlens_k[i], cu_seqlens_k[i + 1])
            assert ks.stop - ks.start <= max_seqlen_k and qs.stop - qs.start <= max_seqlen_q
            outs.append(reference_attention(q[None, qs], k[None, ks], v[None, ks])[0])
        return torch.cat(outs)

    monkeypatch.setattr(attention_module, "flash_attn_func", dense)
    monkeypatch.setattr(attention_module, "flash_attn_varlen_func", varlen)
    monkeypatch.setattr(attention_module, "flash_usable", lambda q: True)
    q, k, v = torch.randn(3, 4, 2, 8), torch.randn(3, 6, 2, 8), torch.randn(3, 6, 2, 8)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4])[:, None]
    torch.testing.assert_close(attention(q, k, v, mask), reference_attention(q, k, v, mask))
    torch.testing.assert_close(attention(q, k, v), reference_attention(q, k, v))


def test_rotary_positions_are_rotations_that_see_relative_position_only():
    cos, sin = rotary_tables(12, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)
    rot_q = apply_rotary(q.expand(1, 12, 1, 8), cos, sin)[0, :, 0]
    rot_k = apply_rotary(k.expand(1, 12, 1, 8), cos, sin)[0, :, 0]
    torch.testing.assert_close(rot_q.norm(dim=-1), q.norm().expand(12))
    torch.testing.assert_close(rot_q[0], q)  # position 0 is not rotated
    torch.testing.assert_close(rot_q[5] @ rot_k[2], rot_q[9] @ rot_k[6])  # same offset, same score
    assert not torch.allclose(rot_q[5] @ rot_k[2], rot_q[5] @ rot_k[3])


def test_sinusoidal_embedding():
    emb = sinusoidal_embedding(torch.tensor([0.0, 0.5]), 8, 1000.0)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    # float32 frequencies: the angle 500 carries an error of ~5e-5
    torch.testing.assert_close(emb[1], torch.cat([(0.5 * freqs).cos(), (0.5 * freqs).sin()]), rtol=0, atol=2e-4)


# -- weights on disk ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    cfg = tiny_cfg(budget_conditioning=True)
    model = randomize_(DiT(cfg)).to(dtype)
    save_model(model, cfg, tmp_path / "dit")
    header = json.loads((tmp_path / "dit" / CONFIG).read_text())
    assert header["model_type"] == "presto.models.dit.DiT" and header["config"]["depth"] == 6
    loaded, loaded_cfg = load_model(tmp_path / "dit")
    assert isinstance(loaded, DiT) and loaded_cfg == cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x, c_noise, cond = torch.randn(2, C, T, dtype=dtype), torch.randn(2), make_cond(2)
    cond = TextCondition(cond.tokens.to(dtype), cond.mask, cond.pooled.to(dtype))
    assert torch.equal(model(x, c_noise, cond, budget=3), loaded(x, c_noise, cond, budget=3))


def test_load_rejects_bad_folders(tmp_path):
    with pytest.raises(InputError, match="config not found"):
        load_model(tmp_path / "missing")
    cfg = tiny_cfg()
    folder = save_model(DiT(cfg), cfg, tmp_path / "dit")
    header = json.loads((folder / CONFIG).read_text())

    def rewrite(**changes):
        (folder / CONFIG).write_text(json.dumps(header | changes))

    rewrite(model_type="os.system")
    with pytest.raises(InputError, match="model_type.*presto package"):
        load_model(folder)
    rewrite(config_type="presto.models.dit.DiT")
    with pytest.raises(InputError, match="config_type.*not a Section"):
        load_model(folder)
    rewrite(config=header["config"] | {"depth": 0})
    with pytest.raises(InputError, match="config.depth"):
        load_model(folder)
    rewrite(config=header["config"] | {"depth": 5})
    with pytest.raises(InputError, match="do not fit"):
        load_model(folder)
    rewrite()
    (folder / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="safetensors"):
        load_model(folder)
    with pytest.raises(ValueError, match="presto package"):
        save_model(torch.nn.Linear(2, 2), cfg, tmp_path / "linear")


# -- FLOPs -------------------------------------------------------------------------------------------

def test_flops_estimate_matches_counted_matmuls(monkeypatch):
    monkeypatch.setattr(dit_module, "attention", reference_attention)  # torch counts no CPU SDPA FLOPs
    cfg = tiny_cfg(mlp_ratio=3.0)
    model = DiT(cfg)
    for budget in (6, 3):
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, C, T), torch.zeros(1), make_cond(1, length=7), budget=budget)
        assert dit_flops(cfg, T, 7, budget) == counter.get_total_flops()


# -- training ----------------------------------------------------------------------------------------

def test_a_tiny_dit_learns_a_regression_target():
    model = DiT(tiny_cfg(depth=2))
    x, c_noise, cond = torch.randn(8, C, T), torch.randn(8), make_cond(8)
    target = -x + cond.pooled[:, :C, None]  # needs the input path and the text path
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = (model(x, c_noise, cond) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
