"""Triton KV-cache write against `kv_cache_write_ref`, run in Triton's interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.kernels import kv_cache_write as mod
from codellama_rt.kernels.kv_cache_write import kv_cache_write, kv_cache_write_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _decode_inputs(B, Hkv, S, D, dtype, seed, max_batch=None, H=None):
    """Caches as the engine has them (views [:B] of a [max_batch, ...] KVCache layer) and k/v as the model
    passes them: one token of the [B, Hkv, 1, D] views of a fused qkv projection's output."""
    g = torch.Generator().manual_seed(seed)
    max_batch = max_batch or B
    H = H or 2 * Hkv
    data = torch.randn(2, max_batch, Hkv, S, D, generator=g).to(dtype)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g).to(dtype)
    k = qkv[..., H * D:(H + Hkv) * D].view(B, 1, Hkv, D).transpose(1, 2)[:, :, 0]
    v = qkv[..., (H + Hkv) * D:].view(B, 1, Hkv, D).transpose(1, 2)[:, :, 0]
    positions = torch.randperm(S, generator=g)[:B]
    return data[0][:B], data[1][:B], k, v, positions


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hkv,S,D,max_batch", [(1, 1, 1, 1, 1), (1, 32, 256, 128, 1), (3, 2, 17, 64, 5),
                                                 (4, 8, 300, 96, 4)], ids=str)
def test_matches_reference(B, Hkv, S, D, max_batch, dtype):
    kc, vc, k, v, pos = _decode_inputs(B, Hkv, S, D, dtype, seed=S + D, max_batch=max_batch)
    if B > 1:
        assert k.stride(0) == 4 * Hkv * D  # rows of the fused projection's output, not contiguous
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kv_cache_write_ref(kc_ref, vc_ref, k, v, pos)
    kv_cache_write(kc, vc, k, v, pos)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # a copy: bit-identical
    rows = torch.arange(B)
    assert torch.equal(kc[rows, :, pos], k) and torch.equal(vc[rows, :, pos], v)


def test_other_slots_and_rows_untouched():
    kc, vc, k, v, pos = _decode_inputs(2, 2, 40, 16, torch.float32, seed=0, max_batch=3)
    full_k = kc.clone()
    kv_cache_write(kc, vc, k, v, pos)
    changed = (kc != full_k).any(-1)  # [B, Hkv, S]
    expect = torch.zeros_like(changed)
    expect[torch.arange(2), :, pos] = True
    assert torch.equal(changed, expect)


def test_positions_outside_the_cache_write_nothing():
    kc, vc, k, v, _ = _decode_inputs(2, 2, 8, 16, torch.float32, seed=1)
    before = kc.clone(), vc.clone()
    kv_cache_write(kc, vc, k, v, torch.tensor([8, -1]))
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


def test_int32_positions():
    kc, vc, k, v, pos = _decode_inputs(3, 2, 20, 32, torch.bfloat16, seed=2)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kv_cache_write_ref(kc_ref, vc_ref, k, v, pos)
    kv_cache_write(kc, vc, k, v, pos.int())
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def _bad(change):
    kc, vc, k, v, pos = _decode_inputs(2, 2, 8, 16, torch.float32, seed=3)
    return change(kc, vc, k, v, pos)


@pytest.mark.parametrize("args,err,match", [
    (_bad(lambda kc, vc, k, v, p: (kc, vc[:, :1], k, v, p)), ValueError, "one shape"),
    (_bad(lambda kc, vc, k, v, p: (kc, vc, k[:, :1], v, p)), ValueError, r"k and v must be \[2, 2, 16\]"),
    (_bad(lambda kc, vc, k, v, p: (kc, vc, k.double(), v, p)), TypeError, "dtype"),
    (_bad(lambda kc, vc, k, v, p: (kc, vc, k, v, p.float())), ValueError, "positions"),
    (_bad(lambda kc, vc, k, v, p: (kc, vc, k, v, p[:1])), ValueError, "positions"),
    (_bad(lambda kc, vc, k, v, p: (kc.transpose(2, 3).contiguous().transpose(2, 3), vc, k, v, p)), ValueError,
     "unit stride"),
    (_bad(lambda kc, vc, k, v, p: (kc, vc, k, v, p.to("meta"))), ValueError, "one device"),
], ids=["v-cache-shape", "k-shape", "dtype", "pos-dtype", "pos-shape", "cache-stride", "device"])
def test_bad_input_names_the_problem(args, err, match):
    with pytest.raises(err, match=match):
        kv_cache_write(*args)


def test_empty_batch():
    kc, vc, k, v, pos = _decode_inputs(2, 2, 8, 16, torch.float32, seed=4)
    kv_cache_write(kc[:0], vc[:0], k[:0], v[:0], pos[:0])


def test_aot_configs_compile(check_aot):
    check_aot(mod.aot_configs())
