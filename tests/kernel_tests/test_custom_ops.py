"""The `codellama_rt::` custom ops (kernels/ops.py) under `torch.library.opcheck` on tiny CPU shapes (the
kernels run in Triton's interpreter): schema (declared mutations, no aliasing), fake implementations
(shapes, strides, dtypes), autograd registration and AOT dispatch with dynamic shapes; and each backend
function against the launcher it wraps."""
from __future__ import annotations

import pytest
import torch

from codellama_rt.kernels import ops
from codellama_rt.kernels.int4_format import quantize_int4
from codellama_rt.kernels.int8_format import quantize_int8
from codellama_rt.kernels.nf4_format import quantize_nf4
from codellama_rt.kernels.options import KernelOptions
from codellama_rt.kernels.rotary import rope_tables

# opcheck's sub-tests; all of them run for every op (none is impossible under the interpreter)
TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
OPTS = ops.encode_options(KernelOptions())
B, H, HKV, T, D = 1, 2, 1, 3, 16


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _qkv(t=T, dtype=torch.float32):
    """q [B, H, t, D], k, v [B, Hkv, t, D] as the model's transposed views of one fused qkv output."""
    qkv = torch.randn(B, t, (H + 2 * HKV) * D, generator=_g()).to(dtype)
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], dim=-1)
    return (q.view(B, t, H, D).transpose(1, 2), k.view(B, t, HKV, D).transpose(1, 2),
            v.view(B, t, HKV, D).transpose(1, 2))


def _decode_args(experiments=""):
    q, k, v = _qkv(t=1)
    cos, sin = rope_tables(D, 64, 1e4)
    S = 40
    caches = [torch.randn(B, HKV, S, D, generator=_g(1)) for _ in range(2)]
    lengths = torch.full((B,), 37, dtype=torch.long)
    return (q, k, v, cos, sin, (lengths - 1)[:, None], *caches, lengths - 1, lengths, experiments, True)


def _nf4_args(rows):
    w = quantize_nf4(torch.randn(32, 64, generator=_g()), double_quant=True)
    x = torch.randn(rows, 64, generator=_g(1))
    return (x, w.codes, w.absmax, w.code, w.nested_absmax, w.nested_code, 32, 64, w.dtype, w.blocksize,
            w.nested_blocksize, float(w.nested_offset))


def _int4_args(rows, experiments=""):
    w = quantize_int4(torch.randn(16, 64, generator=_g()), group_size=32)
    x = torch.randn(rows, 64, generator=_g(1))
    return (x, w.qweight, w.qzeros, w.scales, 16, 64, 32, experiments, True)


def _int8_args():
    w = quantize_int8(torch.randn(16, 48, generator=_g()))
    return (torch.randn(3, 48, generator=_g(1)), w.qweight, w.scales)


def _cases():
    x = torch.randn(2, 3, 16, generator=_g())
    r = torch.randn(2, 3, 16, generator=_g(1))
    nw = 1 + 0.1 * torch.randn(16, generator=_g(2))
    w = torch.randn(24, 16, generator=_g(3))
    w13 = torch.randn(48, 16, generator=_g(4))
    gate_up = torch.randn(2, 64, generator=_g(5))
    cos, sin = rope_tables(D, 64, 1e4)
    q, k, v = _qkv()
    positions = torch.arange(T).expand(B, T)
    kc, vc = _qkv(t=8)[1:]
    return {
        "rms_norm residual": (ops._rms_norm_op, (x, nw, 1e-5, r, *OPTS)),
        "rms_norm bf16 no residual": (ops._rms_norm_op, (x.bfloat16(), nw.bfloat16(), 1e-5, None, *OPTS)),
        "rotary": (ops._rotary_op, (q, k, cos, sin, positions, *OPTS)),
        "attention_prefill": (ops._attention_prefill_op, (q, k, v, 0)),
        "attention_prefill cached prefix": (ops._attention_prefill_op, (q, kc, vc, 5)),
        "attention_verify": (ops._attention_verify_op, (q, kc, vc, torch.tensor([4]))),
        "attention_verify idle row": (ops._attention_verify_op, (q, kc, vc, torch.tensor([7]))),
        "rotary_attention_decode": (ops._rotary_attention_decode_op, _decode_args()),
        "rotary_attention_decode attn_rope+one_pass": (ops._rotary_attention_decode_op,
                                                       _decode_args("attn_one_pass,attn_rope")),
        "swiglu": (ops._swiglu_op, (*gate_up.chunk(2, dim=-1), *OPTS)),
        "linear": (ops._linear_op, (x[:1, :1], w, *OPTS)),
        "linear_swiglu": (ops._linear_swiglu_op, (x, w13, *OPTS)),
        "norm_linear residual swiglu": (ops._norm_linear_op, (x, r, nw, 1e-5, w13, True, *OPTS)),
        "norm_linear no residual": (ops._norm_linear_op, (x, None, nw, 1e-5, w, False, *OPTS)),
        "nf4_linear gemv": (ops._nf4_linear_op, _nf4_args(1)),
        "nf4_linear gemm": (ops._nf4_linear_op, _nf4_args(3)),
        "int4_linear gemv split-K one-pass": (ops._int4_linear_op, _int4_args(1, "int4_one_pass")),
        "int4_linear gemm": (ops._int4_linear_op, _int4_args(17)),
        "int8_linear": (ops._int8_linear_op, _int8_args()),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    op, args = CASES[case]
    torch.library.opcheck(op, args, test_utils=TESTS)


def test_every_backend_op_has_a_custom_op():
    from codellama_rt.model.backends import BACKENDS, _OPS

    tri = BACKENDS["triton"]  # (but the native CPU layout's projections: only cpu-backend models hold such weights)
    assert {getattr(tri, name).__module__ for name in _OPS if not name.endswith("_cpu")} == {ops.__name__}
    names = {case.split()[0] for case in CASES}
    assert names == {"rms_norm", "rotary", "attention_prefill", "attention_verify", "rotary_attention_decode", "swiglu",
                     "linear", "linear_swiglu", "norm_linear", "nf4_linear", "int4_linear", "int8_linear"}
    for name in names:
        assert hasattr(torch.ops.codellama_rt, name), name


def test_mutating_ops_declare_their_mutations():
    schemas = {name: str(getattr(torch.ops.codellama_rt, name).default._schema)
               for name in ("rotary", "rotary_attention_decode")}
    assert "Tensor(a0!) q, Tensor(a1!) k," in schemas["rotary"], schemas["rotary"]
    assert "Tensor(a0!) q," in schemas["rotary_attention_decode"]
    assert "Tensor(a6!) k_cache, Tensor(a7!) v_cache," in schemas["rotary_attention_decode"]


def test_options_round_trip():
    for opts in (KernelOptions(), KernelOptions(experiments={"attn_rope", "int4_mma"}, pdl=False)):
        assert ops._options(*ops.encode_options(opts)) == opts
    assert ops.encode_options(KernelOptions(experiments={"int4_mma", "attn_rope"})) == ("attn_rope,int4_mma", True)


@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "through-op"])
def test_backend_functions_keep_the_launchers_results_and_aliases(through_op, monkeypatch):
    """The functions in the triton row give the launchers' values, and return the inputs the launchers
    returned (h = x without a residual; the rotated q and k themselves), both in eager mode (the launcher
    called directly) and through the op (what torch.compile traces; forced here)."""
    from codellama_rt.kernels import gemv, rms_norm, rotary

    if through_op:
        monkeypatch.setattr(ops, "_eager", lambda: False)

    x = torch.randn(2, 3, 16, generator=_g())
    nw = 1 + 0.1 * torch.randn(16, generator=_g(2))
    y, h = ops.rms_norm(x, nw, 1e-5)
    assert h is x and torch.equal(y, rms_norm.rms_norm(x, nw, 1e-5)[0])
    w = torch.randn(24, 16, generator=_g(3))
    y, h = ops.norm_linear(x, None, nw, 1e-5, w)
    assert h is x and torch.equal(y, gemv.norm_linear(x, None, nw, 1e-5, w)[0])
    cos, sin = rope_tables(D, 64, 1e4)
    q, k, _ = _qkv()
    q2, k2, _ = _qkv()
    positions = torch.arange(T).expand(B, T)
    rq, rk = ops.rotary(q, k, cos, sin, positions)
    assert rq is q and rk is k
    rotary.rotary(q2, k2, cos, sin, positions)
    assert torch.equal(q, q2) and torch.equal(k, k2)
    with pytest.raises(TypeError, match="Int4Weight"):
        ops.linear_int4(x, w)
    with pytest.raises(TypeError, match="NF4Weight"):
        ops.linear_nf4(x, w)


def test_eager_calls_skip_the_op_dispatch(monkeypatch):
    """Outside tracing the backend functions call the launchers directly: a custom op's dispatch costs
    host time on every eager call, which the ops exist only to hide from torch.compile."""
    def refuse(*args, **kwargs):
        raise AssertionError("the custom op was dispatched in eager mode")

    for name in ("_rms_norm_op", "_linear_op", "_swiglu_op", "_norm_linear_op"):
        monkeypatch.setattr(ops, name, refuse)
    x = torch.randn(2, 16, generator=_g())
    w = torch.randn(8, 16, generator=_g(1))
    nw = torch.ones(16)
    ops.rms_norm(x, nw, 1e-5)
    ops.linear(x, w)
    ops.swiglu(x, x)
    ops.norm_linear(x, None, nw, 1e-5, w)
