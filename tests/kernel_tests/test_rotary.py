"""Triton RoPE (in place, rotate-half) against `rotary_ref`, run in Triton's interpreter on CPU."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from codellama_rt.kernels import rotary as mod
from codellama_rt.kernels.rotary import rope_tables, rotary, rotary_ref
from codellama_rt.bench.common import aot_models
from tolerances import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_POS = 16384
# B, H, Hkv, T, D, rope_theta: decode (T=1), odd T, GQA ratios 1/4/8, D 64/128, both rope bases
CASES = [
    pytest.param(3, 4, 4, 1, 64, 1e4, id="decode-mha-d64"),
    pytest.param(2, 4, 1, 5, 128, 1e6, id="t5-gqa4-d128"),
    pytest.param(3, 8, 1, 5, 64, 1e6, id="t5-gqa8-d64", marks=pytest.mark.slow),
    pytest.param(2, 8, 8, 33, 128, 1e4, id="t33-mha-d128", marks=pytest.mark.slow),
    pytest.param(2, 8, 2, 33, 64, 1e6, id="t33-gqa4-d64", marks=pytest.mark.slow),
    pytest.param(2, 12, 3, 5, 96, 1e4, id="t5-h12-hkv3-d96"),  # partial head block and D/2 not a power of 2
]


@lru_cache(maxsize=None)
def _tables(D, theta):
    return rope_tables(D, MAX_POS, theta)


def _qkv(B, H, Hkv, T, D, dtype, seed, pad=16):
    """q, k as the model makes them: transposed views of a fused qkv output, here inside a padded buffer."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(B, T, (H + 2 * Hkv) * D + pad, generator=g).to(dtype)
    q, k, _ = buf[..., :(H + 2 * Hkv) * D].split([H * D, Hkv * D, Hkv * D], dim=-1)
    return buf, q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2)


def _positions(B, T, seed):
    """Different, non-zero starts per batch row, up to ~16000."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, MAX_POS - T, (B,), generator=g)
    starts[-1] = MAX_POS - T  # the table's last row is reached
    return starts[:, None] + torch.arange(T)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,Hkv,T,D,theta", CASES)
def test_matches_reference_in_place(B, H, Hkv, T, D, theta, dtype):
    cos, sin = _tables(D, theta)
    buf, q, k = _qkv(B, H, Hkv, T, D, dtype, seed=B * T + H)
    before = buf.clone()
    pos = _positions(B, T, seed=T)
    q_ref, k_ref = rotary_ref(q, k, cos, sin, pos)
    q_out, k_out = rotary(q, k, cos, sin, pos)
    assert q_out is q and k_out is k
    assert_close(q, q_ref)
    assert_close(k, k_ref)
    if dtype != torch.float32:  # one rounding, as the reference: nearly all elements bit-identical
        assert (q == q_ref).float().mean() >= 0.99 and (k == k_ref).float().mean() >= 0.99
    qk = (H + Hkv) * D  # v and the padding after q and k in the same buffer are untouched
    assert torch.equal(buf[..., qk:], before[..., qk:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_contiguous_inputs_and_position_layouts(dtype):
    """Contiguous q/k; positions as the model passes them: an expanded arange (prefill, batch stride 0)
    and `[B] -> [B, 1]` (decode)."""
    cos, sin = _tables(128, 1e6)
    g = torch.Generator().manual_seed(0)
    for B, T, pos in ((2, 7, torch.arange(9000, 9007).expand(2, 7)), (3, 1, torch.tensor([5, 16000, 0])[:, None])):
        q = torch.randn(B, 4, T, 128, generator=g).to(dtype)
        k = torch.randn(B, 2, T, 128, generator=g).to(dtype)
        q_ref, k_ref = rotary_ref(q, k, cos, sin, pos)
        rotary(q, k, cos, sin, pos)
        assert_close(q, q_ref)
        assert_close(k, k_ref)


def test_empty_is_a_no_op():
    cos, sin = _tables(64, 1e4)
    q, k = torch.empty(2, 4, 0, 64), torch.empty(2, 1, 0, 64)
    assert rotary(q, k, cos, sin, torch.empty(2, 0, dtype=torch.int64)) == (q, k)


def _args(**changes):
    cos, sin = _tables(64, 1e4)
    args = dict(q=torch.randn(2, 4, 3, 64), k=torch.randn(2, 2, 3, 64), cos=cos, sin=sin,
                positions=torch.zeros(2, 3, dtype=torch.int64))
    args.update({name: change(args) for name, change in changes.items()})
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(q=lambda a: a["q"].int()), "dtype"),
    (dict(k=lambda a: a["k"].half()), "dtype"),
    (dict(k=lambda a: a["k"][:1]), "does not match"),
    (dict(k=lambda a: a["k"][:, :, :2]), "does not match"),
    (dict(q=lambda a: a["q"][0]), r"\[B, H, T, D\]"),
    (dict(q=lambda a: a["q"][..., :63], k=lambda a: a["k"][..., :63]), "even"),
    (dict(q=lambda a: torch.randn(2, 4, 3, 128)[..., ::2]), "unit stride"),
    (dict(cos=lambda a: a["cos"].half()), "fp32"),
    (dict(cos=lambda a: a["cos"][:, :16], sin=lambda a: a["sin"][:, :16]), "max_pos"),
    (dict(cos=lambda a: a["cos"].t().contiguous().t()), "contiguous"),
    (dict(positions=lambda a: a["positions"].int()), "int64"),
    (dict(positions=lambda a: a["positions"][:, :2]), "int64"),
])
def test_bad_inputs_raise(changes, match):
    args = _args(**changes)
    with pytest.raises((TypeError, ValueError), match=match):
        rotary(**args)


def test_aot_configs_compile(check_aot):
    configs = mod.aot_configs(aot_models())
    assert len(configs) == 8  # {7B, 34B/70B} x {bf16, fp16} x {prefill, decode (to cache)}
    assert sum(c.constexprs["TO_CACHE"] for c in configs) == 4
    check_aot(configs)


# ---- decode: rotary and the KV-cache write in one launch (rotary_to_cache) -----------------------

def _decode_case(B, H, Hkv, D, dtype, seed, max_batch, S=300):
    """q/k/v as the model makes them (views of a fused qkv output, T = 1), caches as views [:B] of a
    [max_batch, ...] KVCache layer, RoPE positions that differ from the cache slots."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g).to(dtype)
    q, k, v = buf.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.view(B, 1, -1, D).transpose(1, 2) for t in (q, k, v))
    data = torch.randn(2, max_batch, Hkv, S, D, generator=g).to(dtype)
    slots = torch.randperm(S, generator=g)[:B]
    return buf, q, k, v, data[0][:B], data[1][:B], _positions(B, 1, seed), slots


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,Hkv,D,max_batch", [(1, 32, 32, 128, 1), (3, 8, 2, 64, 4), (2, 12, 3, 96, 2)], ids=str)
def test_to_cache_matches_reference(B, H, Hkv, D, max_batch, dtype):
    cos, sin = _tables(D, 1e6)
    buf, q, k, v, kc, vc, pos, slots = _decode_case(B, H, Hkv, D, dtype, B + H, max_batch)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = mod.rotary_to_cache_ref(q, k, v, cos, sin, pos, kc_ref, vc_ref, slots)
    k_before = k.clone()
    assert mod.rotary_to_cache(q, k, v, cos, sin, pos, kc, vc, slots) is q
    assert_close(q, q_ref)
    assert_close(kc, kc_ref)
    assert torch.equal(vc, vc_ref) and torch.equal(k, k_before)  # v copied exactly; k itself untouched
    rows = torch.arange(B)
    untouched = torch.ones(kc.shape[:3], dtype=torch.bool)
    untouched[rows, :, slots] = False
    assert torch.equal(kc[untouched], kc_ref[untouched])
    if dtype != torch.float32:
        assert (kc == kc_ref).float().mean() >= 0.99 and (q == q_ref).float().mean() >= 0.99
    # the same values as the unfused kernel rotating k in place
    k2 = k.clone()
    rotary(q.clone(), k2, cos, sin, pos)
    assert torch.equal(kc[rows, :, slots], k2[:, :, 0])


def test_to_cache_slot_outside_the_cache_writes_nothing():
    cos, sin = _tables(64, 1e4)
    _, q, k, v, kc, vc, pos, _ = _decode_case(2, 4, 2, 64, torch.float32, 0, 2, S=8)
    before = kc.clone(), vc.clone()
    mod.rotary_to_cache(q, k, v, cos, sin, pos, kc, vc, torch.tensor([8, -1]))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "q": a["q"].expand(-1, -1, 2, -1), "k": a["k"].expand(-1, -1, 2, -1),
                "positions": a["positions"].expand(-1, 2)}, "T=2"),
    (lambda a: {**a, "v": a["v"][:, :1]}, "v must be"),
    (lambda a: {**a, "k_cache": a["k_cache"].double(), "v_cache": a["v_cache"].double()}, "caches must be"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :, :5]}, "k_cache and v_cache"),
    (lambda a: {**a, "slots": a["slots"].float()}, "slots"),
    (lambda a: {**a, "slots": a["slots"].to("meta")}, "one device"),
], ids=["T", "v-shape", "cache-dtype", "cache-shape", "slots-dtype", "device"])
def test_to_cache_bad_inputs_raise(change, match):
    cos, sin = _tables(64, 1e4)
    _, q, k, v, kc, vc, pos, slots = _decode_case(2, 4, 2, 64, torch.float32, 1, 2, S=16)
    args = change(dict(q=q, k=k, v=v, cos=cos, sin=sin, positions=pos, k_cache=kc, v_cache=vc, slots=slots))
    with pytest.raises((TypeError, ValueError), match=match):
        mod.rotary_to_cache(**args)
