"""Triton RoPE (in place, rotate-half) against `rotary_ref`, run in Triton's interpreter on CPU."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from codellama_rt.kernels import rotary as mod
from codellama_rt.kernels.rotary import rope_tables, rotary, rotary_ref
from tolerances import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MAX_POS = 16384
# B, H, Hkv, T, D, rope_theta: decode (T=1), odd T, GQA ratios 1/4/8, D 64/128, both rope bases
CASES = [
    pytest.param(3, 4, 4, 1, 64, 1e4, id="decode-mha-d64"),
    pytest.param(2, 4, 1, 5, 128, 1e6, id="t5-gqa4-d128"),
    pytest.param(3, 8, 1, 5, 64, 1e6, id="t5-gqa8-d64"),
    pytest.param(2, 8, 8, 33, 128, 1e4, id="t33-mha-d128"),
    pytest.param(2, 8, 2, 33, 64, 1e6, id="t33-gqa4-d64"),
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
    configs = mod.aot_configs()
    assert len(configs) == 8  # {7B, 34B/70B} x {bf16, fp16} x {prefill, decode}
    check_aot(configs)
