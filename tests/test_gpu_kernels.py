"""GPU-only checks (marked `gpu`, skipped without CUDA): the Triton kernels at real CodeLlama sizes
in bf16 against their references, and the triton backend end to end on CUDA."""
from __future__ import annotations

import pytest
import torch

from tolerances import assert_close, assert_error_within_torch

pytestmark = pytest.mark.gpu
DEV = "cuda"
SHAPES = [pytest.param(dict(dim=4096, heads=32, kv=32), id="7B"),
          pytest.param(dict(dim=8192, heads=64, kv=8), id="70B")]


@pytest.mark.parametrize("s", SHAPES)
def test_rms_norm_real_size(s):
    from codellama_rt.kernels.rms_norm import rms_norm, rms_norm_ref

    x = torch.randn(4097, s["dim"], device=DEV, dtype=torch.bfloat16)
    r, w = torch.randn_like(x), torch.randn(s["dim"], device=DEV, dtype=torch.bfloat16)
    y, h = rms_norm(x, w, 1e-5, r)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-5, r)
    assert_close(h, h_ref)
    assert_close(y, y_ref)
    y32, _ = rms_norm_ref(x.float(), w.float(), 1e-5, r.float())
    assert_error_within_torch(y, y_ref, y32, torch.bfloat16)


@pytest.mark.parametrize("s", SHAPES)
def test_rotary_real_size(s):
    from codellama_rt.kernels.rotary import rope_tables, rotary, rotary_ref

    B, T, D = 2, 3001, 128
    q = torch.randn(B, s["heads"], T, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, s["kv"], T, D, device=DEV, dtype=torch.bfloat16)
    cos, sin = rope_tables(D, 16384, 1e6, device=DEV)
    pos = torch.stack([torch.arange(T), torch.arange(7000, 7000 + T)]).to(DEV)
    q_ref, k_ref = rotary_ref(q.clone(), k.clone(), cos, sin, pos)
    q2, k2 = rotary(q, k, cos, sin, pos)
    assert_close(q2, q_ref)
    assert_close(k2, k_ref)


@pytest.mark.parametrize("s", SHAPES)
def test_rotary_to_cache_real_size(s):
    """Decode's rotary + KV-cache write at batch 4 into a 16k cache: q, the written slots and v as the reference
    gives them; every other slot untouched."""
    from codellama_rt.kernels.rotary import rope_tables, rotary_to_cache, rotary_to_cache_ref

    B, D, S = 4, 128, 16384
    H, Hkv = s["heads"], s["kv"]
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, device=DEV, dtype=torch.bfloat16)
    q, k, v = (t.view(B, 1, -1, D).transpose(1, 2) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    cache = torch.randn(2, B, Hkv, S, D, device=DEV, dtype=torch.bfloat16)
    cos, sin = rope_tables(D, S, 1e6, device=DEV)
    pos = torch.tensor([[0], [1], [9000], [S - 1]], device=DEV)
    slots = pos[:, 0].clone()
    ref_cache = cache.clone()
    q_ref = rotary_to_cache_ref(q.clone(), k, v, cos, sin, pos, ref_cache[0], ref_cache[1], slots)
    q_out = rotary_to_cache(q, k, v, cos, sin, pos, cache[0], cache[1], slots)
    assert_close(q_out, q_ref)
    assert_close(cache, ref_cache)
    assert torch.equal(cache[1], ref_cache[1])  # v is copied
    rows = torch.arange(B, device=DEV)
    keep = torch.ones(B, Hkv, S, dtype=torch.bool, device=DEV)
    keep[rows, :, slots] = False
    assert torch.equal(cache[0][keep], ref_cache[0][keep])


@pytest.mark.parametrize("s", SHAPES)
@pytest.mark.parametrize("T,start", [(4096, 0), (1000, 3000)])
def test_prefill_attention_real_size(s, T, start):
    from codellama_rt.kernels.attention_prefill import attention_prefill, attention_prefill_ref

    D = 128
    q = torch.randn(1, s["heads"], T, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, s["kv"], start + T, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = attention_prefill(q, k, v, start)
    ref32 = attention_prefill_ref(q.float(), k.float(), v.float(), start)
    same = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(s["heads"] // s["kv"], 1), v.repeat_interleave(s["heads"] // s["kv"], 1),
        attn_mask=torch.ones(T, start + T, dtype=torch.bool, device=DEV).tril(start))
    assert_error_within_torch(out, same, ref32, torch.bfloat16)


@pytest.mark.parametrize("s", SHAPES)
def test_decode_attention_real_size(s):
    from codellama_rt.kernels.attention_decode import attention_decode, attention_decode_ref

    B, S, D = 3, 100_000, 128
    q = torch.randn(B, s["heads"], D, device=DEV, dtype=torch.bfloat16)
    kc = torch.randn(B, s["kv"], S, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lengths = torch.tensor([1, 16384, 100_000], device=DEV)
    out = attention_decode(q, kc, vc, lengths)
    ref32 = attention_decode_ref(q.float(), kc.float(), vc.float(), lengths)
    assert_error_within_torch(out, attention_decode_ref(q, kc, vc, lengths), ref32, torch.bfloat16)


@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 11008), (32016, 4096), (16384, 22016)], ids=str)
def test_gemv_real_size(N, K):
    """7B wqkv, 7B w2 (K not a multiple of the K tile), the 7B lm_head and a 34B-like w2, in bf16."""
    import torch.nn.functional as F

    from codellama_rt.kernels.gemv import gemv, gemv_ref, linear

    w = torch.randn(N, K, device=DEV, dtype=torch.bfloat16) / K ** 0.5
    x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
    y = gemv(x, w)
    assert torch.equal(linear(x, w), y) and torch.equal(linear(x[0], w), y[0])  # the backend takes the kernel
    assert torch.equal(linear(x.expand(2, K), w), F.linear(x.expand(2, K), w))  # two rows: cuBLAS
    assert_close(y, gemv_ref(x, w))
    assert_error_within_torch(y, gemv_ref(x, w), x.double() @ w.double().t(), torch.bfloat16)


@pytest.mark.experiment
@pytest.mark.parametrize("swiglu", [False, True], ids=["wqkv", "w13-swiglu"])
def test_gemv_prefetch_changes_no_bits(swiglu):
    """The L2 prefetch before the PDL wait (experiment "gemv_prefetch") only moves when weights arrive."""
    from codellama_rt.kernels.gemv import gemv, gemv_swiglu
    from codellama_rt.kernels.options import KernelOptions

    N, K = (22016, 4096) if swiglu else (12288, 4096)
    w = torch.randn(N, K, device=DEV, dtype=torch.bfloat16) / K ** 0.5
    x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
    run = gemv_swiglu if swiglu else gemv
    want = run(x, w)
    for _ in range(3):
        assert torch.equal(run(x, w, options=KernelOptions(experiments={"gemv_prefetch"})), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", [None, pytest.param("gemv_mma", marks=pytest.mark.experiment)],
                         ids=["default", "gemv_mma"])
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("N,K", [(12288, 4096), (4096, 11008)], ids=["7B-wqkv", "7B-w2"])
def test_int4_linear_real_size(N, K, M, kind, dtype):
    """int4 decode GEMVs at 7B sizes, as int4_launch picks them and through the tensor-core kernel (its
    PTX nibble conversion runs only here): against the exact product of the dequantized weights."""
    import torch.nn.functional as F

    from codellama_rt.kernels.int4 import dequantize_int4, int4_launch, int4_linear, int4_linear_ref, quantize_int4

    g = torch.Generator(device=DEV).manual_seed(M)
    w = quantize_int4(torch.randn(N, K, device=DEV, generator=g, dtype=dtype) / K ** 0.5, group_size=128)
    x = torch.randn(M, K, device=DEV, generator=g, dtype=dtype)
    cfg = int4_launch(M, N, K, 128, dtype, num_sms=torch.cuda.get_device_properties(DEV).multi_processor_count,
                      kind=kind)
    y = int4_linear(x, w, cfg)
    exact = F.linear(x.double(), dequantize_int4(w, torch.float64))
    assert_close(y, int4_linear_ref(x, w))
    assert_error_within_torch(y, int4_linear_ref(x, w), exact, dtype)
    if kind == "gemv_mma":  # exact weights, fp32 sums: as the fp32 product of the dequantized weights
        same_steps = F.linear(x.float(), dequantize_int4(w, torch.float32)).to(dtype)
        assert (y != same_steps).float().mean() <= 0.02


@pytest.mark.experiment
@pytest.mark.parametrize("kind", [None, "gemv_mma"], ids=["default", "gemv_mma"])
@pytest.mark.parametrize("M", [1, 8])
def test_int4_one_pass_split_k_real_size(M, kind):
    """The experiment "int4_one_pass" at the 7B wqkv size (11 splits racing per column block), eagerly and
    in a replayed graph, many times: bitwise the reduce kernel's result, tickets back at zero."""
    from codellama_rt.kernels._triton import tickets
    from codellama_rt.kernels.int4 import int4_launch, int4_linear, quantize_int4
    from codellama_rt.kernels.options import KernelOptions

    one_pass = KernelOptions(experiments={"int4_one_pass"})
    N, K = 12288, 4096
    w = quantize_int4(torch.randn(N, K, device=DEV, dtype=torch.bfloat16) / K ** 0.5, group_size=128)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    cfg = int4_launch(M, N, K, 128, torch.bfloat16,
                      num_sms=torch.cuda.get_device_properties(DEV).multi_processor_count, kind=kind)
    assert cfg.split_k > 1
    want = int4_linear(x, w, cfg)
    for _ in range(20):
        assert torch.equal(int4_linear(x, w, cfg, options=one_pass), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_linear(x, w, cfg, options=one_pass)
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    assert (tickets(x.device, N // cfg.block_n) == 0).all()


def _replayed(fn):
    """fn()'s output captured in a CUDA graph, after one replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.experiment
@pytest.mark.parametrize("N,K,M", [(12288, 4096, 1), (12288, 4096, 8), (4096, 11008, 3), (32016, 4096, 13),
                                   (4096, 4096, 16)], ids=["wqkv-1", "wqkv-8", "w2-3", "padded-13", "wo-16"])
def test_int4_frag_gluon_real_size(N, K, M):
    """The Gluon fragment-order GEMV (experiment "int4_frag") at 7B sizes: within one bf16 rounding (plus fp32
    sums' rounding) of the fp32 reference; the Triton twin, compiled (one row only: it compiles slowly), agrees
    as closely; a replayed graph gives the eager bits."""
    from codellama_rt.kernels import int4_frag
    from codellama_rt.kernels.int4 import quantize_int4
    from codellama_rt.kernels.int4_frag_format import dequantize_frag, to_frag

    w = quantize_int4(torch.randn(N, K, device=DEV, dtype=torch.bfloat16) / K ** 0.5, group_size=128)
    fw = to_frag(w)
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    y = int4_frag.int4_frag_linear(x, fw)
    ref = int4_frag.int4_frag_linear_ref(x, fw)
    w32 = dequantize_frag(fw, torch.float32)
    bound = 2.0 ** -7 * ref.float().abs() + 16 * 2.0 ** -24 * K ** 0.5 * (x.float().abs() @ w32.abs().t())
    assert ((y.float() - ref.float()).abs() <= bound).all()
    if M == 1:
        _, launches = int4_frag._prepare(x, fw)
        twin = [(int4_frag._int4_frag_gemv_twin,) + launch[1:] for launch in launches[:1]] + launches[1:]
        for kern, grid, args, constexprs, num_warps in twin:  # the twin writes the same partials / output
            constexprs = {k: v for k, v in constexprs.items() if k not in ("SCALE_LAYOUT", "X_LAYOUT")}
            kern.on(x, True)[grid](*args, **constexprs, num_warps=num_warps)
        out = launches[0][2][3].view_as(y)
        assert ((out.float() - ref.float()).abs() <= bound).all()
    assert torch.equal(_replayed(lambda: int4_frag.int4_frag_linear(x, fw)), y)


@pytest.mark.experiment
@pytest.mark.parametrize("N,K,M,dtype", [(12288, 4096, 1, torch.bfloat16), (12288, 4096, 8, torch.float16),
                                         (4096, 11008, 3, torch.bfloat16), (32016, 4096, 13, torch.bfloat16),
                                         (4096, 4096, 16, torch.float16)],
                         ids=["wqkv-1", "wqkv-8-fp16", "w2-3", "padded-13", "wo-16-fp16"])
def test_nf4_frag_gluon_real_size(N, K, M, dtype):
    """The Gluon NF4 fragment-order GEMV (experiment "nf4_frag") at 7B sizes: within one rounding (plus fp32 sums'
    rounding) of the fp32 reference on the kernel's weights (so the shared pair table is filled and read as the
    emulated asm reads it); a replayed graph gives the eager bits."""
    from codellama_rt.kernels import nf4_frag
    from codellama_rt.kernels.nf4_format import quantize_nf4
    from codellama_rt.kernels.nf4_frag_format import dequantize_nf4_frag, to_nf4_frag

    fw = to_nf4_frag(quantize_nf4(torch.randn(N, K, device=DEV, dtype=dtype) / K ** 0.5))
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    y = nf4_frag.nf4_frag_linear(x, fw)
    ref = nf4_frag.nf4_frag_linear_ref(x, fw)
    w32 = dequantize_nf4_frag(fw, torch.float32)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    bound = ulp * ref.float().abs() + 16 * 2.0 ** -24 * K ** 0.5 * (x.float().abs() @ w32.abs().t())
    assert ((y.float() - ref.float()).abs() <= bound).all()
    assert torch.equal(_replayed(lambda: nf4_frag.nf4_frag_linear(x, fw)), y)


@pytest.mark.experiment
def test_int4_dequant_gemm_real_size():
    """The experiment "int4_dequant_gemm" at 7B w13's size: the dequantized weight bitwise `dequantize_int4`'s,
    512 prefill rows exactly `int4_linear_ref`'s result (the same cuBLAS call on the same weight)."""
    from codellama_rt.kernels.int4 import int4_linear, int4_linear_ref, quantize_int4
    from codellama_rt.kernels.int4_dequant import dequantize_int4_triton
    from codellama_rt.kernels.int4_format import dequantize_int4
    from codellama_rt.kernels.options import KernelOptions

    N, K = 22016, 4096
    w = quantize_int4(torch.randn(N, K, device=DEV, dtype=torch.bfloat16) / K ** 0.5, group_size=128)
    assert torch.equal(dequantize_int4_triton(w, torch.bfloat16), dequantize_int4(w, torch.bfloat16))
    x = torch.randn(512, K, device=DEV, dtype=torch.bfloat16)
    got = int4_linear(x, w, options=KernelOptions(experiments={"int4_dequant_gemm"}))
    assert torch.equal(got, int4_linear_ref(x, w))


@pytest.mark.experiment
def test_nf4_dequant_gemm_real_size():
    """The experiment "nf4_dequant_gemm" at 7B w13's size: the dequantized weight bitwise `dequantize_nf4`'s
    (bitsandbytes'), 512 prefill rows exactly `nf4_linear_ref`'s result (the same cuBLAS call on the same weight)."""
    from codellama_rt.kernels import ops
    from codellama_rt.kernels.nf4 import nf4_linear_ref
    from codellama_rt.kernels.nf4_dequant import dequantize_nf4_triton
    from codellama_rt.kernels.nf4_format import dequantize_nf4, quantize_nf4
    from codellama_rt.kernels.options import KernelOptions

    N, K = 22016, 4096
    w = quantize_nf4(torch.randn(N, K, device=DEV, dtype=torch.bfloat16) / K ** 0.5)
    assert torch.equal(dequantize_nf4_triton(w), dequantize_nf4(w))
    x = torch.randn(512, K, device=DEV, dtype=torch.bfloat16)
    got = ops.linear_nf4(x, w, options=KernelOptions(experiments={"nf4_dequant_gemm"}))
    assert torch.equal(got, nf4_linear_ref(x, w))


@pytest.mark.parametrize("F_,K", [(11008, 4096), (22016, 8192)], ids=["7B", "34B"])
def test_gemv_swiglu_real_size(F_, K):
    """w13's GEMV with the SwiGLU epilogue: bitwise the unfused kernels' result, and what the backend runs."""
    import torch.nn.functional as F

    from codellama_rt.kernels.gemv import SWIGLU_CUDA_LAUNCH, gemv, gemv_swiglu, linear_swiglu, linear_swiglu_ref
    from codellama_rt.kernels.swiglu import swiglu

    w13 = torch.randn(2 * F_, K, device=DEV, dtype=torch.bfloat16) / K ** 0.5 * 3
    x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
    y = gemv_swiglu(x, w13)
    assert torch.equal(linear_swiglu(x, w13), y)
    assert torch.equal(y, swiglu(*gemv(x, w13, SWIGLU_CUDA_LAUNCH).chunk(2, dim=-1)))
    assert_close(y, linear_swiglu_ref(x, w13))
    x2 = x.expand(2, K)
    assert torch.equal(linear_swiglu(x2, w13), swiglu(*F.linear(x2, w13).chunk(2, dim=-1)))


@pytest.mark.experiment
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "first-layer"])
@pytest.mark.parametrize("N,K,swiglu", [(12288, 4096, False), (22016, 4096, True), (57344, 8192, True)],
                         ids=["7B-wqkv", "7B-w13", "70B-w13"])
def test_norm_gemv_real_size(N, K, swiglu, residual):
    """The RMSNorm prologue at real sizes: against the exact result no worse than the unfused reference,
    the residual stream exact, and what the backend runs once the experiment "norm_gemv" is on."""
    import torch.nn.functional as F

    from codellama_rt.kernels.gemv import norm_gemv, norm_linear, norm_linear_ref
    from codellama_rt.kernels.options import KernelOptions

    g = torch.Generator(device=DEV).manual_seed(N)
    w = torch.randn(N, K, device=DEV, generator=g, dtype=torch.bfloat16) / K ** 0.5
    x = torch.randn(1, K, device=DEV, generator=g, dtype=torch.bfloat16)
    r = (3 * torch.randn(1, K, device=DEV, generator=g)).to(torch.bfloat16) if residual else None
    nw = (1 + 0.3 * torch.randn(K, device=DEV, generator=g)).to(torch.bfloat16)
    y, h = norm_gemv(x, r, nw, 1e-5, w, swiglu)
    ref, h_ref = norm_linear_ref(x, r, nw, 1e-5, w, swiglu)
    assert torch.equal(h, h_ref)
    h64 = h.double()
    exact = F.linear(h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double(), w.double())
    if swiglu:
        gate, up = exact.chunk(2, dim=-1)
        exact = F.silu(gate) * up
    assert_error_within_torch(y, ref, exact, torch.bfloat16)
    y2, h2 = norm_linear(x, r, nw, 1e-5, w, swiglu, options=KernelOptions(experiments={"norm_gemv"}))
    assert torch.equal(y2, y) and torch.equal(h2, h)
    assert torch.equal(norm_linear(x, r, nw, 1e-5, w, swiglu)[1], h)  # unfused: the rms_norm kernel's h


def test_triton_backend_end_to_end_bf16(tmp_path, tiny_tokenizer):
    import codellama_rt as cl
    from codellama_rt.model.config import ModelArgs
    from codellama_rt.tiny import write_random_checkpoint

    args = ModelArgs(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=2816, vocab_size=1000, max_seq_len=4096)
    path = write_random_checkpoint(tmp_path / "m", args, tiny_tokenizer)
    tri = cl.load(path, backend="triton", device=DEV, dtype=torch.bfloat16)
    ref = cl.load(path, backend="reference", device=DEV, dtype=torch.float32)
    ids = tri.tokenizer.encode("def fibonacci(n):\n" * 40)
    a, b = tri.logits(ids), ref.logits(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() < 5e-2
