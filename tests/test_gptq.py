"""GPTQ (`codellama_rt.quant.gptq`, `quantize --gptq`, `export-lite --gptq`) for int4, int8 and NF4: the core
against round-to-nearest where the answer is known (no correlation between inputs: the same weights), its
objective where it is not (a projection's output error on its calibration inputs), the whole-model driver on the
default model (next-token distributions closer to the dense model's than round-to-nearest's on text it was not
calibrated on), the calibration text, int8 checkpoints, the CLI round trips and their errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import codellama_rt as cl
from codellama_rt.api import load_model
from codellama_rt.cli import main
from codellama_rt.kernels.int4_format import dequantize_int4, quantize_int4
from codellama_rt.kernels.int8_format import dequantize_int8, quantize_int8
from codellama_rt.kernels.nf4_format import dequantize_nf4, quantize_nf4
from codellama_rt.quant.gptq import calibration_tokens, gptq_int4, gptq_int8, gptq_nf4, quantize_gptq
from codellama_rt.quant.linear import QuantLinear, projection_names, quantize_model, quantized_modules
from conftest import write_hf_checkpoint

SHAPES = dict(dim=128, n_heads=4, n_kv_heads=2, ffn=192, n_layers=2)


def _int4_fields(w):
    return w.qweight, w.qzeros, w.scales


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uncorrelated_inputs_give_round_to_nearest(group_size, dtype):
    """H = c I: no column's error can be compensated by another, so GPTQ is round-to-nearest, bit for bit."""
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(group_size)).to(dtype)
    got = gptq_int4(w, 3.0 * torch.eye(256), group_size=group_size)
    want = quantize_int4(w, group_size=group_size)
    for a, b in zip(_int4_fields(got), _int4_fields(want)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uncorrelated_inputs_give_round_to_nearest_int8(dtype):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(1)).to(dtype)
    got, want = gptq_int8(w, torch.eye(200)), quantize_int8(w)
    assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    scale = torch.rand(d, generator=g) * 3 + 0.1  # uneven input magnitudes, as after an RMSNorm's weight
    return (torch.randn(n, d, generator=g) @ mix) * scale


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gptq_lowers_output_error_on_its_calibration_inputs(group_size):
    """||X W^T - X Q^T|| (the objective) at most 0.8 x round-to-nearest's on correlated X; the grid is still
    quantize_int4's (the same scales and zero points: only the 4-bit codes differ)."""
    x = _correlated_inputs(2048, 256, seed=group_size)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(7)) * 0.05
    q_gptq, q_rtn = gptq_int4(w, x.t() @ x, group_size=group_size), quantize_int4(w, group_size=group_size)
    gptq, rtn = dequantize_int4(q_gptq, torch.float32), dequantize_int4(q_rtn, torch.float32)
    err_gptq, err_rtn = (x @ (w - gptq).t()).norm(), (x @ (w - rtn).t()).norm()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    assert torch.equal(q_gptq.scales, q_rtn.scales) and torch.equal(q_gptq.qzeros, q_rtn.qzeros)
    assert not torch.equal(q_gptq.qweight, q_rtn.qweight)


def test_gptq_int8_lowers_output_error_on_its_calibration_inputs():
    x = _correlated_inputs(2048, 256, seed=8)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(7)) * 0.05
    q_gptq, q_rtn = gptq_int8(w, x.t() @ x), quantize_int8(w)
    err_gptq = (x @ (w - dequantize_int8(q_gptq, torch.float32)).t()).norm()
    err_rtn = (x @ (w - dequantize_int8(q_rtn, torch.float32)).t()).norm()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    assert torch.equal(q_gptq.scales, q_rtn.scales) and q_gptq.qweight.abs().max() <= 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gptq_nf4_is_a_bitsandbytes_weight_with_lower_output_error(dtype):
    """NF4: the absmax, double quantization and codebook of `quantize_nf4` (bitsandbytes' own, bit for bit), only
    the codes GPTQ's; H = I gives round-to-nearest's codes but for near-ties (the grid is the double-quantized
    absmax); on correlated X the output error is at most 0.8 x round-to-nearest's."""
    w = (torch.randn(48, 256, generator=torch.Generator().manual_seed(7)) * 0.05).to(dtype)
    rtn = quantize_nf4(w)
    ident = gptq_nf4(w, torch.eye(256))
    x = _correlated_inputs(2048, 256, seed=9)
    got = gptq_nf4(w, x.t() @ x)
    for q in (ident, got):
        assert q.dtype == dtype and q.shape == rtn.shape and q.codes.shape == rtn.codes.shape
        for field in ("absmax", "nested_absmax", "code", "nested_code"):
            assert torch.equal(getattr(q, field), getattr(rtn, field)), field
        assert q.nested_offset == rtn.nested_offset
    assert (ident.codes == rtn.codes).float().mean() > 0.99
    wf = w.float()
    err_gptq = (x @ (wf - dequantize_nf4(got, torch.float32)).t()).norm()
    err_rtn = (x @ (wf - dequantize_nf4(rtn, torch.float32)).t()).norm()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    with pytest.raises(ValueError, match="not a multiple of the NF4 block"):
        gptq_nf4(torch.randn(8, 96), torch.eye(96))


def test_inputs_that_are_always_zero_get_zero_weights():
    x = _correlated_inputs(512, 64, seed=1)
    x[:, [3, 40]] = 0
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    q = dequantize_int4(gptq_int4(w, x.t() @ x, group_size=32), torch.float32)
    assert torch.isfinite(q).all() and (q[:, [3, 40]] == 0).all()


def test_gptq_int4_errors():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match=r"H has shape \(32, 32\), expected \(64, 64\)"):
        gptq_int4(w, torch.eye(32), group_size=32)
    with pytest.raises(ValueError, match="group_size=128 must be one of"):
        gptq_int4(w, torch.eye(64), group_size=128)
    with pytest.raises(ValueError, match="damp=0"):
        gptq_int4(w, torch.eye(64), group_size=32, damp=0)
    with pytest.raises(ValueError, match=r"gptq_int8: H has shape"):
        gptq_int8(w, torch.eye(32))


def _kl_from_dense(model, dense, rows) -> float:
    """Mean over positions of KL(dense || model) of the next-token distributions."""
    p, q = dense.logits(rows).log_softmax(-1), model.logits(rows).log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.slow
def test_default_model_logits_closer_to_dense_than_round_to_nearest():
    """GPTQ on 64 windows of the standard library's text; measured on code it never saw (this package's own):
    KL from the dense model's next-token distributions 0.71 x round-to-nearest's when written."""
    dense = load_model(None, device="cpu", dtype="float32", backend="reference")
    held = calibration_tokens(dense.tokenizer, [Path(cl.__file__).parent / "api.py"], rows=8, seq_len=128)
    rtn = load_model(None, device="cpu", dtype="float32", backend="reference", quantize="int4", quantize_head=True)
    gptq = load_model(None, device="cpu", dtype="float32", backend="reference")
    calib = calibration_tokens(gptq.tokenizer, rows=64, seq_len=256)
    quantize_gptq(gptq.module, calib, group_size=64, quantize_head=True)
    assert set(quantized_modules(gptq.module)) == set(projection_names(gptq.module, head=True))
    assert {p.group_size for q in quantized_modules(gptq.module).values() for p in q.parts} == {64}
    assert _kl_from_dense(gptq, dense, held) < 0.85 * _kl_from_dense(rtn, dense, held)


def test_calibration_tokens_are_seeded_windows_of_the_files(tmp_path):
    tok = cl.load().tokenizer
    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        (src / f"m{k}.py").write_text("".join(f"def f{k}_{i}(x):\n    return x * {i}\n\n" for i in range(40)))
    (src / "image.bin").write_bytes(bytes(range(256)))  # not UTF-8: skipped
    (src / "nul.txt").write_text("x = 1\0")                # a NUL byte: skipped
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main\n" * 50)  # hidden: never read
    rows = calibration_tokens(tok, [src], rows=6, seq_len=32, seed=5)
    assert rows.shape == (6, 32) and rows.dtype == torch.int64
    assert torch.equal(rows, calibration_tokens(tok, [src], rows=6, seq_len=32, seed=5))
    assert not torch.equal(rows, calibration_tokens(tok, [src], rows=6, seq_len=32, seed=6))
    texts = [tok.encode((src / f"m{k}.py").read_text(), add_bos=True) for k in range(3)]
    streams = [sum((texts[k] for k in order), []) for order in ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0],
                                                                 [2, 0, 1], [2, 1, 0])]
    for r in rows.tolist():  # a window of the files joined in some order
        assert any(any(s[i:i + 32] == r for i in range(len(s) - 31)) for s in streams)
    with pytest.raises(ValueError, match="need at least"):
        calibration_tokens(tok, [src], rows=1000, seq_len=32)
    with pytest.raises(ValueError, match="neither a file nor a directory"):
        calibration_tokens(tok, [tmp_path / "missing"], rows=1, seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files under"):
        calibration_tokens(tok, [tmp_path / "empty"], rows=1, seq_len=8)
    for bad in (dict(rows=0), dict(rows=-1), dict(rows=True), dict(seq_len=0), dict(seq_len=-3)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.* is invalid"):
            calibration_tokens(tok, [src], **{"rows": 2, "seq_len": 8, **bad})
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "a.bin").write_bytes(b"\xff\xfe\x00" * 100)
    with pytest.raises(ValueError, match=r"1 file\(s\) \(1 skipped: not UTF-8 text\) give 0 tokens"):
        calibration_tokens(tok, [tmp_path / "binary"], rows=1, seq_len=8)


@pytest.fixture(scope="module")
def fp32_ckpt(tmp_path_factory, tiny_tokenizer):
    return write_hf_checkpoint(tmp_path_factory.mktemp("gptq") / "fp32", tiny_tokenizer, **SHAPES, seed=3)[0]


@pytest.mark.parametrize("method", ["int4", "int8", "nf4"])
def test_quantize_cli_gptq_roundtrip(fp32_ckpt, tmp_path, capsys, method):
    """The written checkpoint loads back to exactly what quantize_gptq makes in memory from the same tokens."""
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.py").write_text(Path(torch.__file__).read_text())
    out = tmp_path / "out"
    argv = ["quantize", "--model", str(fp32_ckpt), "--method", method, "--gptq", "--calibration", str(calib),
            "--calibration-rows", "4", "--calibration-len", "64", "--quantize-head", "--out", str(out)]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    want = load_model(fp32_ckpt)
    tokens = calibration_tokens(want.tokenizer, [calib], rows=4, seq_len=64)
    quantize_gptq(want.module, tokens, method=method, group_size=64, quantize_head=True)
    got = cl.load(out)
    assert isinstance(got.module.output, QuantLinear)
    assert {q.format for q in quantized_modules(got.module).values()} <= {method, method + "_cpu"}
    ids = got.tokenizer.encode("def add(a, b):\n    return a + b\n")
    assert torch.equal(got.logits(ids), want.logits(ids))
    rtn = load_model(fp32_ckpt, quantize=method, quantize_head=True)
    assert not torch.equal(got.logits(ids), rtn.logits(ids))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["gptq"] == {"calibration": "1 file(s)", "rows": 4, "seq_len": 64, "damp": 0.01, "act_order": True,
                          "static_groups": True}
    assert main(["info", "--model", str(out)]) == 0
    assert "GPTQ on 4 x 64 tokens of 1 file(s)" in capsys.readouterr().out


def test_quantize_cli_gptq_tied_head(tmp_path, tiny_tokenizer, capsys):
    """A tied model with --quantize-head: the lm_head gets its own GPTQ copy, the embedding stays the dense one,
    and the file loads back to what quantize_gptq makes in memory."""
    tied, _ = write_hf_checkpoint(tmp_path / "tied", tiny_tokenizer, **SHAPES, tie=True)
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.py").write_text(Path(torch.__file__).read_text())
    assert main(["quantize", "--model", str(tied), "--method", "int4", "--gptq", "--calibration", str(calib),
                 "--calibration-rows", "4", "--calibration-len", "64", "--quantize-head",
                 "--out", str(tmp_path / "out")]) == 0
    got, dense = cl.load(tmp_path / "out"), cl.load(tied)
    assert isinstance(got.module.output, QuantLinear)
    assert torch.equal(got.module.tok_embeddings, dense.module.tok_embeddings)
    want = load_model(tied)
    quantize_gptq(want.module, calibration_tokens(want.tokenizer, [calib], rows=4, seq_len=64), group_size=64,
                  quantize_head=True)
    assert torch.equal(want.module.tok_embeddings, dense.module.tok_embeddings)
    assert torch.equal(got.logits([1, 5, 9, 200]), want.logits([1, 5, 9, 200]))


@pytest.mark.parametrize("head", [False, True])
def test_int8_checkpoint_roundtrip(fp32_ckpt, tmp_path, head):
    """`quantize --method int8` (round to nearest) writes what `load(quantize="int8")` holds; it loads as stored,
    also when asked for int8 again."""
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(fp32_ckpt), "--method", "int8", "--out", str(out)]
                + (["--quantize-head"] if head else [])) == 0
    want = load_model(fp32_ckpt, quantize="int8", quantize_head=head)
    ids = want.tokenizer.encode("def add(a, b):\n    return a + b\n")
    for got in (cl.load(out), cl.load(out, quantize="int8")):
        assert isinstance(got.module.output, QuantLinear) == head
        assert torch.equal(got.logits(ids), want.logits(ids))


def _int8_ckpt(fp32_ckpt, directory, edit) -> Path:
    from safetensors.torch import load_file, save_file

    assert main(["quantize", "--model", str(fp32_ckpt), "--method", "int8", "--out", str(directory)]) == 0
    sd = load_file(directory / "model.safetensors")
    edit(sd)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("edit,tensor,message", [
    (lambda sd: sd["layers.0.attn.wo.0.qweight"].view(-1)[5:6].fill_(-128), "layers.0.attn.wo.0.qweight", "-128"),
    (lambda sd: sd["layers.1.mlp.w2.0.scales"].view(-1)[0:1].fill_(0.0), "layers.1.mlp.w2.0.scales",
     "positive and finite"),
    (lambda sd: sd.update({"layers.0.mlp.w13.0.scales": sd["layers.0.mlp.w13.0.scales"][:-1].clone()}),
     "layers.0.mlp.w13.0.scales", "has shape"),
    (lambda sd: sd.update({"layers.0.attn.wqkv.0.qweight": sd["layers.0.attn.wqkv.0.qweight"].float()}),
     "layers.0.attn.wqkv.0.qweight", "dtype"),
], ids=["code-128", "zero-scale", "scales-shape", "float-codes"])
def test_bad_int8_checkpoints(fp32_ckpt, tmp_path, edit, tensor, message):
    d = _int8_ckpt(fp32_ckpt, tmp_path / "d", edit)
    with pytest.raises(cl.CheckpointError) as info:
        cl.load(d)
    msg = str(info.value)
    assert f"'{tensor}'" in msg and message in msg and "model.safetensors" in msg, msg


@pytest.mark.parametrize("extra,message", [
    (["--method", "int4", "--calibration-rows", "8"], "apply with --gptq only"),
    (["--method", "int4", "--gptq", "--calibration-rows", "0"], "--calibration-rows 0: must be at least 1"),
    (["--method", "int4", "--gptq", "--calibration-len", "100000"], "the model's context is"),
    (["--method", "int4", "--gptq", "--calibration", "/nonexistent/x"], "neither a file nor a directory"),
    (["--method", "int4", "--gptq", "--group-size", "128"], "group_size=128 must be one of"),
])
def test_quantize_cli_gptq_errors(fp32_ckpt, tmp_path, capsys, extra, message):
    assert main(["quantize", "--model", str(fp32_ckpt), *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_export_lite_gptq_writes_the_gptq_model(fp32_ckpt, tmp_path, capsys):
    """`export-lite --quantize int8 --gptq` writes the lite file that export_lite writes for the model quantize_gptq
    makes from the same tokens, byte for byte; --gptq without int4 / int8 weights is refused."""
    from codellama_rt.lite.export import export_lite

    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.py").write_text(Path(torch.__file__).read_text())
    flags = ["--calibration", str(calib), "--calibration-rows", "4", "--calibration-len", "64"]
    assert main(["export-lite", "--model", str(fp32_ckpt), "--quantize", "int8", "--gptq", *flags,
                 "--out", str(tmp_path / "got")]) == 0
    want = load_model(fp32_ckpt, device="cpu", dtype=torch.float32)
    quantize_gptq(want.module, calibration_tokens(want.tokenizer, [calib], rows=4, seq_len=64), method="int8")
    export_lite(want, tmp_path / "want")
    assert (tmp_path / "got" / "lite.safetensors").read_bytes() == (tmp_path / "want" / "lite.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["export-lite", "--model", str(fp32_ckpt), "--gptq", "--out", str(tmp_path / "dense")]) == 2
    assert "--gptq applies to quantized weights (int4, int8, nf4), not dense ones" in capsys.readouterr().err


def test_gptq_refuses_quantized_projections(fp32_ckpt):
    model = load_model(fp32_ckpt)
    quantize_model(model.module, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_gptq(model.module, torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        quantize_gptq(model.module, torch.zeros(1, 8, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gptq_refuses_a_model_that_has_generated(fp32_ckpt, backend):
    """After a generation the engine holds state made from the dense weights (the prompt's cached K / V, which a
    later prompt with the same start reuses; the cpu backend's native decoder): swapping the weights under it
    would leave later generations half dense, so GPTQ refuses, and a fresh model quantizes as before."""
    model = load_model(fp32_ckpt, backend=backend, device="cpu", dtype="float32")
    model.generate([1, 5, 9], max_new_tokens=2)
    tokens = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="already generated"):
        quantize_gptq(model.module, tokens, method="int8")
    assert all(type(b.attn.wqkv).__name__ == "Linear" for b in model.module.layers)  # nothing swapped
    fresh = load_model(fp32_ckpt, backend=backend, device="cpu", dtype="float32")
    quantize_gptq(fresh.module, tokens, method="int8")
    assert all(type(b.attn.wqkv).__name__ == "QuantLinear" for b in fresh.module.layers)


@pytest.mark.gpu
@pytest.mark.parametrize("method,ratio", [("int4", 0.85), ("int8", 0.95), ("nf4", 0.85)])
def test_gptq_on_cuda_in_bf16(method, ratio):
    """Where `quantize --gptq` runs by default (CUDA, bf16, the triton backend): the default model's projections
    quantized there, next-token KL from the dense model at most `ratio` x round-to-nearest's (the same in bf16 on
    the CPU's reference backend when written: 0.75 int4, 0.85 int8, whose error is closer to bf16's own, 0.71
    nf4)."""
    dense = load_model(None, device="cuda", dtype="bfloat16")
    held = calibration_tokens(dense.tokenizer, [Path(cl.__file__).parent / "api.py"], rows=8, seq_len=128).cuda()
    rtn = load_model(None, device="cuda", dtype="bfloat16", quantize=method, quantize_head=True)
    gptq = load_model(None, device="cuda", dtype="bfloat16")
    quantize_gptq(gptq.module, calibration_tokens(gptq.tokenizer, rows=64, seq_len=256), method=method,
                  group_size=64, quantize_head=True)
    assert {q.format for q in quantized_modules(gptq.module).values()} == {method}
    assert all(p.device.type == "cuda" for q in quantized_modules(gptq.module).values() for p in q.buffers())
    assert _kl_from_dense(gptq, dense, held) < ratio * _kl_from_dense(rtn, dense, held)
