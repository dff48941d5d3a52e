"""Triton flash-decoding (`attention_decode`) against `attention_decode_ref`.

The CPU tests run the kernel source in Triton's interpreter; the CUDA launch decisions are checked
through `decode_launch` and, for a small case, run in the interpreter too; the CUDA specialisations
are compiled ahead of time for sm_80 and sm_90. Tests marked `gpu` run only with CUDA.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from codellama_rt.kernels._triton import SHARED_LIMIT, compile_for
from codellama_rt.kernels.attention_decode import (
    _launch,
    aot_configs,
    attention_decode,
    attention_decode_ref,
    decode_launch,
)
from codellama_rt.kernels.options import KernelOptions  # noqa: E402
from codellama_rt.bench.common import aot_models
from nan_poison import poisoned_like
from tolerances import assert_close, assert_error_within_torch

# The interpreter converts the loop bounds (loaded from `lengths`) with a NumPy deprecation warning.

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
GARBAGE = 1e4  # written into every cache slot a sequence must not read
ONE_PASS = KernelOptions(experiments={"attn_one_pass"})


def _options(names: str) -> KernelOptions:
    """KernelOptions with the comma-separated experiments `names` on ("" : none)."""
    return KernelOptions(experiments=[n for n in names.split(",") if n])


def make_inputs(B, H, Hkv, S, D, lengths, dtype, seed=0, garbage=GARBAGE):
    """q [B, H, D]; k, v = cache[:B, :, :S] of a larger contiguous [B + 1, Hkv, S + 13, D] buffer whose
    slots at and beyond each sequence's length hold `garbage`; lengths int64 [B]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    caches = []
    for _ in range(2):
        buf = torch.randn(B + 1, Hkv, S + 13, D, generator=g)
        buf[B:] = garbage
        for b, n in enumerate(lengths):
            buf[b, :, n:] = garbage
        caches.append(buf.to(dtype)[:B, :, :S])
    return q, caches[0], caches[1], torch.tensor(lengths, dtype=torch.int64)


def torch_same_dtype(q, k, v, lengths):
    """The same attention done by PyTorch entirely in q's dtype (scores, softmax, P @ V): the error
    budget of `assert_error_within_torch`."""
    B, H, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = torch.matmul(k, q.unsqueeze(-1)).squeeze(-1) * (1.0 / math.sqrt(D))
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]
    p = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    return torch.matmul(p.unsqueeze(-2), v).squeeze(-2)


def check(out, q, k, v, lengths):
    """Same-dtype closeness to the reference, and error vs fp32 within 2x PyTorch's own."""
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    assert_close(out, attention_decode_ref(q, k, v, lengths))
    ref32 = attention_decode_ref(q.float(), k.float(), v.float(), lengths)
    assert_error_within_torch(out, torch_same_dtype(q, k, v, lengths), ref32, q.dtype)


# ---- numerics in the interpreter ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 1000, 4097])
def test_kv_lengths(length, dtype):
    """Block boundaries (BLOCK_N = 64 at D=128 in 16-bit, 32 in fp32) and long caches; GQA group 4."""
    q, k, v, lengths = make_inputs(1, 4, 1, length + 37, 128, [length], dtype, seed=length)
    check(attention_decode(q, k, v, lengths), q, k, v, lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (8, 1)], ids=["group1", "group4", "group8"])
def test_gqa_and_head_dim(H, Hkv, D, dtype):
    q, k, v, lengths = make_inputs(2, H, Hkv, 300, D, [200, 77], dtype, seed=H * Hkv + D)
    check(attention_decode(q, k, v, lengths), q, k, v, lengths)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_different_lengths(dtype):
    """One batch, lengths 1 .. 4097: each row splits its own length; garbage past each length."""
    q, k, v, lengths = make_inputs(3, 8, 1, 4200, 128, [1, 4097, 300], dtype, seed=3)
    check(attention_decode(q, k, v, lengths), q, k, v, lengths)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_garbage_is_never_read(bad):
    """Slots past each length hold NaN/inf: the result equals the reference on a clean cache."""
    q, k, v, lengths = make_inputs(2, 8, 2, 200, 128, [130, 5], torch.bfloat16, seed=4, garbage=bad)
    out = attention_decode(q, k, v, lengths)
    clean = [t.clone() for t in (k, v)]
    for t in clean:
        for b, n in enumerate(lengths.tolist()):
            t[b, :, n:] = 0
    check(out, q, *clean, lengths)


def test_lengths_beyond_cache_are_clamped():
    """lengths[b] > S: the reference attends all S keys; the kernel must not read past the slice."""
    q, k, v, _ = make_inputs(2, 4, 2, 96, 64, [96, 96], torch.float16, seed=5)
    lengths = torch.tensor([96 + 40, 50])
    check(attention_decode(q, k, v, lengths), q, k, v, lengths)


@pytest.mark.parametrize("layout", ["view-of-BHTD", "strided-head-dim"])
def test_non_contiguous_q(layout):
    B, H, D = 2, 8, 128
    _, k, v, lengths = make_inputs(B, H, 2, 150, D, [150, 33], torch.float16, seed=6)
    if layout == "view-of-BHTD":  # q[:, :, 0] of [B, H, T, D] as the model passes it
        q = torch.randn(B, 3, H, D).to(torch.float16).transpose(1, 2)[:, :, 1]
        assert q.stride(-1) == 1 and not q.is_contiguous()
    else:
        q = torch.randn(B, D, H).to(torch.float16).transpose(1, 2)
        assert q.stride(-1) == H
    check(attention_decode(q, k, v, lengths), q, k, v, lengths)


def test_unaligned_cache_view():
    """K/V rows that are not 16-byte aligned (a view into a wider buffer) take the un-hinted path."""
    q, k, v, lengths = make_inputs(2, 4, 2, 90, 64, [90, 17], torch.float16, seed=9)
    k, v = (torch.cat([t[..., :1], t, t[..., :1]], dim=-1)[..., 1:65] for t in (k, v))
    assert k.stride(2) == 66
    check(attention_decode(q, k, v, lengths), q, k, v, lengths)


def test_public_launcher_writes_everything(nan_empty):
    """torch.empty returns NaN-filled tensors, so output or scratch the kernels leave unwritten shows."""
    assert torch.empty(2).isnan().all()
    q, k, v, lengths = make_inputs(3, 8, 1, 1100, 128, [1, 1100, 64], torch.float16, seed=8)
    check(attention_decode(q, k, v, lengths), q, k, v, lengths)


# ---- CUDA launch decisions ---------------------------------------------------------------------

def test_cuda_decisions_with_poisoned_buffers_in_interpreter():
    """The CUDA choice (here 16 splits of one 64-key tile) run in the interpreter, with output and scratch
    filled with NaN: every split writes its partial (neutral ones exactly -inf / 0 / 0) and the
    reduction never turns a neutral partial into NaN."""
    B, H, Hkv, S, D = 2, 8, 1, 1024, 128
    q, k, v, lengths = make_inputs(B, H, Hkv, S, D, [1, 700], torch.bfloat16, seed=7)
    cfg = decode_launch(B, Hkv, S, H // Hkv, D, q.element_size(), on_cuda=True)
    assert (cfg.num_splits, cfg.block_n) == (16, 64)
    out = poisoned_like(q)
    mid_o = torch.full((B, H, cfg.num_splits, D), float("nan"))
    mid_m = torch.full((B, H, cfg.num_splits), float("nan"))
    mid_l = torch.full((B, H, cfg.num_splits), float("nan"))
    _launch(q, k, v, lengths, cfg, out, mid_o, mid_m, mid_l)
    check(out, q, k, v, lengths)
    assert not (mid_o.isnan().any() or mid_m.isnan().any() or mid_l.isnan().any())
    n_blocks = (lengths + cfg.block_n - 1) // cfg.block_n  # row 0: 1 block, row 1: 11 blocks, 1 per split
    for b in range(B):
        empty = torch.arange(cfg.num_splits) >= n_blocks[b]
        assert empty.sum() == cfg.num_splits - n_blocks[b]
        assert (mid_m[b][:, empty] == float("-inf")).all() and (mid_l[b][:, empty] == 0).all()
        assert (mid_o[b][:, empty] == 0).all()
        assert mid_m[b][:, ~empty].isfinite().all() and (mid_l[b][:, ~empty] >= 1).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_one_split_writes_the_output_directly(dtype):
    """With one split (here a 64-key cache, as the CUDA heuristic picks for S <= 64 or B * Hkv >= 2 x SMs)
    pass 1 writes the output itself: bitwise what the two passes give, lengths 1..S and 0 included."""
    B, H, Hkv, S, D = 3, 8, 2, 64, 64
    q, k, v, lengths = make_inputs(B, H, Hkv, S, D, [1, 64, 37], dtype, seed=11)
    cfg = decode_launch(B, Hkv, S, H // Hkv, D, q.element_size(), on_cuda=True)
    assert cfg.num_splits == 1
    two_pass = _launch(q, k, v, lengths, cfg, poisoned_like(q), torch.full((B, H, 1, D), float("nan")),
                       torch.full((B, H, 1), float("nan")), torch.full((B, H, 1), float("nan")), direct=False)
    untouched = torch.full((B, H, 1, D), float("nan"))
    direct = _launch(q, k, v, lengths, cfg, poisoned_like(q), untouched, untouched, untouched)
    assert torch.equal(direct, two_pass) and untouched.isnan().all()  # no scratch written
    check(direct, q, k, v, lengths)
    empty = _launch(q, k, v, torch.zeros_like(lengths), cfg, poisoned_like(q), untouched, untouched, untouched)
    assert torch.equal(empty, torch.zeros_like(empty))  # no keys: 0, as pass 2 gives, never NaN


@pytest.mark.slow
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 1), (16, 2)], ids=["mha", "group8", "group8-2kv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_one_pass_combine_equals_the_second_pass(H, Hkv, dtype):
    """One pass (each (sequence, kv head)'s last program combines the splits): bitwise the two-pass result,
    neutral splits and a zero length included, and every ticket back at zero for the next launch."""
    from codellama_rt.kernels._triton import tickets

    B, S, D = 3, 1024, 64
    q, k, v, lengths = make_inputs(B, H, Hkv, S, D, [1, 1024, 333], dtype, seed=H + Hkv)
    cfg = decode_launch(B, Hkv, S, H // Hkv, D, q.element_size(), on_cuda=True)
    assert cfg.num_splits > 1

    def run(lens, one_pass):
        scratch = [torch.full(shape, float("nan")) for shape in
                   ((B, H, cfg.num_splits, D), (B, H, cfg.num_splits), (B, H, cfg.num_splits))]
        return _launch(q, k, v, lens, cfg, poisoned_like(q), *scratch, one_pass=one_pass)

    outputs = []
    for lens in (lengths, torch.tensor([0, 5, 1024])):
        outputs.append(run(lens, True))
        assert torch.equal(outputs[-1], run(lens, False))
        assert (tickets(q.device, B * Hkv) == 0).all()
    check(outputs[0], q, k, v, lengths)
    assert torch.equal(outputs[1][0], torch.zeros_like(outputs[1][0]))  # no keys: 0, never NaN


def test_one_pass_experiment_reaches_the_public_launcher(monkeypatch):
    """With the experiment "attn_one_pass" in its options, `attention_decode` launches pass 1 alone (pass 2
    never runs) and gives the same output."""
    from codellama_rt.kernels import attention_decode as mod

    q, k, v, lengths = make_inputs(2, 8, 2, 700, 64, [700, 20], torch.float16, seed=3)
    two = attention_decode(q, k, v, lengths)
    monkeypatch.setattr(mod._decode_reduce_kernel, "interp", None)  # a launch of pass 2 would fail
    assert torch.equal(attention_decode(q, k, v, lengths, options=ONE_PASS), two)


# ---- decode's rotary and cache write inside the attention kernel (experiment "attn_rope") -----------

def _new_token(B, H, Hkv, S, D, lengths, dtype, seed):
    """A decode step's inputs: q, k, v [B, *, 1, D] as views of one projection row (as the model has
    them), rotary tables, positions [B, 1] = lengths - 1, slots, and caches [B, Hkv, S, D] of random keys."""
    from codellama_rt.kernels.rotary import rope_tables

    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g).to(dtype)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.view(B, 1, n, D).transpose(1, 2) for t, n in ((q, H), (k, Hkv), (v, Hkv)))
    cos, sin = rope_tables(D, S + 5, 1e6)
    lengths = torch.tensor(lengths)
    caches = [torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2)]
    return q, k, v, cos, sin, (lengths - 1)[:, None], caches, lengths - 1, lengths


@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("S,lengths", [(64, [1, 64]), (300, [1, 300, 129])], ids=["one-split", "splits"])
def test_rope_inside_attention_equals_the_two_launches(monkeypatch, H, Hkv, dtype, S, lengths):
    """With "attn_rope" the attention kernel rotates q itself and caches the new key and value before
    reading them: the output and both caches bitwise what `rotary_to_cache` then `attention_decode` give,
    and within tolerance of the reference."""
    from codellama_rt.kernels import attention_decode as mod

    B, D = len(lengths), 64
    from codellama_rt.kernels import rotary

    runs = {}
    for on in ("", "attn_rope"):
        q, k, v, cos, sin, pos, caches, slots, lens = _new_token(B, H, Hkv, S, D, lengths, dtype, seed=S + H)
        if on:  # one launch: the rotary kernel must not run
            monkeypatch.setattr(rotary._rotary_kernel, "interp", None)
        out = mod.rotary_attention_decode(q, k, v, cos, sin, pos, *caches, slots, lens, options=_options(on))
        runs[on] = (out, *caches)
    q, k, v, cos, sin, pos, caches, slots, lens = _new_token(B, H, Hkv, S, D, lengths, dtype, seed=S + H)
    ref = mod.rotary_attention_decode_ref(q, k, v, cos, sin, pos, *caches, slots, lens)
    for got, want in zip(runs["attn_rope"], runs[""]):
        assert torch.equal(got, want)
    assert torch.equal(runs["attn_rope"][1], caches[0]) and torch.equal(runs["attn_rope"][2], caches[1])
    assert_close(runs["attn_rope"][0], ref)


def test_rope_inside_attention_checks_its_arguments():
    from codellama_rt.kernels import attention_decode as mod

    rope = _options("attn_rope")
    q, k, v, cos, sin, pos, caches, slots, lens = _new_token(2, 4, 2, 64, 64, [3, 9], torch.float32, seed=1)
    with pytest.raises(ValueError, match="positions must be int64"):
        mod.rotary_attention_decode(q, k, v, cos, sin, pos.int(), *caches, slots, lens, options=rope)
    with pytest.raises(TypeError, match="cos/sin must be fp32"):
        mod.rotary_attention_decode(q, k, v, cos.double(), sin.double(), pos, *caches, slots, lens, options=rope)
    with pytest.raises(ValueError, match="lengths must have shape"):
        mod.rotary_attention_decode(q, k, v, cos, sin, pos, *caches, slots, lens[:1], options=rope)


@pytest.mark.parametrize("B,Hkv,S,splits", [
    (1, 8, 100_000, 33),   # 70B, one long sequence: 8 x 33 programs fill 2 x 132 SMs
    (1, 32, 100_000, 9),   # 7B
    (4, 8, 16_384, 9),
    (64, 32, 100_000, 1),  # B * Hkv alone fills the GPU
    (1, 8, 100, 2),        # never more splits than the cache has tiles
    (1, 8, 1, 1),
])
def test_cuda_split_heuristic(B, Hkv, S, splits):
    cfg = decode_launch(B, Hkv, S, 8, 128, 2, on_cuda=True)
    assert cfg.num_splits == splits
    assert cfg.block_n == 64 and cfg.block_g == 16 and cfg.num_splits <= -(-S // cfg.block_n)


def test_aot_configs_cover_every_cuda_launch():
    """Tile sizes, warps and stages do not depend on (B, S): one AOT binary per (dtype, group) covers
    every batch size and cache length, split count included (a runtime argument)."""
    split_cfgs = {(c.signature["Q"], c.constexprs["GROUP"], c.constexprs["DIRECT"], c.constexprs["ONE_PASS"],
                   c.constexprs["ROPE"]): c for c in aot_configs(aot_models()) if "GROUP" in c.constexprs}
    assert set(split_cfgs) == {(ty, g, d, o, r) for ty in ("*bf16", "*fp16") for g in (1, 8)
                               for d, o in ((False, False), (False, True), (True, False)) for r in (False, True)}
    for (ty, group, _, _, _), c in split_cfgs.items():
        assert c.constexprs["UPCAST_DOT"] is False and c.constexprs["KV_ALIGNED"] is True
        for B in (1, 7, 64):
            for S in (1, 4097, 100_000):
                cfg = decode_launch(B, 64 // group, S, group, 128, 2, on_cuda=True)
                assert (cfg.block_n, cfg.block_g, cfg.num_warps, cfg.num_stages) == (
                    c.constexprs["BLOCK_N"], c.constexprs["BLOCK_G"], c.num_warps, c.num_stages)


def test_cpu_uses_few_splits():
    cfg = decode_launch(1, 1, 100_000, 4, 128, 2, on_cuda=False)
    assert cfg.num_splits == 4 and cfg.block_n == 64


def test_aot_compiles_without_spills():
    rows = []
    for cfg in aot_configs(aot_models()):
        for arch in (80, 90):
            r = compile_for(cfg, arch)
            rows.append(r)
            print(f"{r.label:42s} sm_{arch}  regs {r.registers:3d}  shared {r.shared_bytes:6d} B  "
                  f"stack {r.stack_bytes}  local {r.local_bytes}  warps {r.num_warps}")
    for r in rows:
        assert not r.spills, f"{r.label} sm_{r.arch} spills: stack {r.stack_bytes} B, local {r.local_bytes} B"
        assert r.shared_bytes <= SHARED_LIMIT[r.arch], f"{r.label} sm_{r.arch}: {r.shared_bytes} B shared"


# ---- bad inputs --------------------------------------------------------------------------------

def _good():
    return make_inputs(2, 8, 2, 40, 64, [40, 3], torch.float16)


def _bad_cases():
    q, k, v, lengths = _good()
    return [
        ("q-2d", (q[0], k, v, lengths), "q must be"),
        ("int-q", (q.int(), k, v, lengths), "not supported"),
        ("k-dtype", (q, k.float(), v, lengths), "k_cache dtype"),
        ("v-shape", (q, k, v[:, :, :20], lengths), "!= v_cache"),
        ("cache-3d", (q, k[0], v[0], lengths), "k_cache must be"),
        ("batch", (q[:1], k, v, lengths[:1]), "does not match q"),
        ("head-dim", (q[..., :32], k, v, lengths), "does not match q"),
        ("head-dim-not-pow2", (q[..., :48], k[..., :48], v[..., :48], lengths), "power of two"),
        ("head-dim-too-small", (q[..., :8], k[..., :8], v[..., :8], lengths), "power of two"),
        ("gqa-ratio", (q[:, :7], k, v, lengths), "not a multiple"),
        ("lengths-int32", (q, k, v, lengths.int()), "int64"),
        ("lengths-shape", (q, k, v, lengths[:, None]), "shape"),
        ("lengths-device", (q, k, v, lengths.to("meta")), "lengths on meta"),
        ("k-strided-head-dim", (q, k.mT.contiguous().mT, v, lengths), "contiguous along"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise(case):
    _, args, match = _bad_cases()[case]
    with pytest.raises((ValueError, TypeError), match=match):
        attention_decode(*args)


def test_head_dim_512_rejected():
    q, k, v, lengths = make_inputs(1, 2, 2, 4, 512, [4], torch.float16)
    with pytest.raises(ValueError, match="power of two in"):
        attention_decode(q, k, v, lengths)


@pytest.mark.slow
def test_checks_hold_under_python_optimize():
    """`python -O` strips asserts: the launcher's checks are exceptions, so they still refuse bad input."""
    code = ("import torch\n"
            "from codellama_rt.kernels.attention_decode import attention_decode\n"
            "q = torch.zeros(1, 4, 48); k = torch.zeros(1, 2, 8, 48)\n"
            "try:\n"
            "    attention_decode(q, k, k, torch.ones(1, dtype=torch.long))\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "refused: attention_decode: head_dim 48 must be a power of two" in proc.stdout


# ---- on a GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("H,Hkv", [(32, 32), (64, 8)], ids=["7B", "70B"])
def test_cuda_graph_replay(H, Hkv):
    """Captured once with the full cache length; lengths change in place between replays."""
    dev, D, S = "cuda", 128, 8192
    q = torch.randn(4, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(4, Hkv, S, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lengths = torch.tensor([1, 64, 4097, S], device=dev)
    attention_decode(q, k, v, lengths)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_decode(q, k, v, lengths)
    for new in ([1, 64, 4097, S], [S, 3, 65, 1000]):
        lengths.copy_(torch.tensor(new))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, attention_decode_ref(q, k, v, lengths))
        ref32 = attention_decode_ref(q.float(), k.float(), v.float(), lengths)
        assert_error_within_torch(out, torch_same_dtype(q, k, v, lengths), ref32, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.experiment
@pytest.mark.parametrize("H,Hkv,B", [(32, 32, 1), (64, 8, 1), (64, 8, 4)], ids=["7B", "70B", "70B-batch4"])
def test_one_pass_on_gpu_is_bitwise_the_two_pass_result(H, Hkv, B):
    """The one-pass combine on real programs racing for their tickets (eager and in a replayed graph, many
    times): bitwise the two-pass output every time, and the tickets back at zero."""
    from codellama_rt.kernels._triton import tickets

    dev, D, S = "cuda", 128, 8192
    q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lengths = torch.tensor([1, 64, 4097, S][:B] if B > 1 else [300], device=dev)
    want = attention_decode(q, k, v, lengths)
    for _ in range(50):
        assert torch.equal(attention_decode(q, k, v, lengths, options=ONE_PASS), want)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_decode(q, k, v, lengths, options=ONE_PASS)
    for _ in range(50):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    assert (tickets(q.device, B * Hkv) == 0).all()


@pytest.mark.gpu
@pytest.mark.experiment
@pytest.mark.parametrize("H,Hkv,B", [(32, 32, 1), (64, 8, 4)], ids=["7B", "70B-batch4"])
def test_rope_inside_attention_on_gpu(H, Hkv, B):
    """"attn_rope" at real sizes: the output and the cached key within rounding of the two launches (the
    rotation may contract into FMAs differently), the cached value exact; a replayed graph gives the
    eager output bit for bit."""
    from codellama_rt.kernels import attention_decode as mod

    D, S = 128, 8192
    lengths = [300, 1, 4097, S][:B]
    runs = {}
    for on in ("", "attn_rope"):
        q, k, v, cos, sin, pos, caches, slots, lens = (
            t.cuda() if isinstance(t, torch.Tensor) else [c.cuda() for c in t]
            for t in _new_token(B, H, Hkv, S, D, lengths, torch.bfloat16, seed=H))
        runs[on] = (mod.rotary_attention_decode(q, k, v, cos, sin, pos, *caches, slots, lens, options=_options(on)),
                    *caches)
    out, k_cache, v_cache = runs["attn_rope"]
    assert_close(out, runs[""][0])
    assert_close(k_cache, runs[""][1])
    assert torch.equal(v_cache, runs[""][2])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = mod.rotary_attention_decode(q, k, v, cos, sin, pos, *caches, slots, lens,
                                               options=_options("attn_rope"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, runs["attn_rope"][0])
