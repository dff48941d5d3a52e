"""4-bit weights in the runtime: NF4 (bitsandbytes-compatible, double quant) and int4 group-wise (GPTQ
layout). Loading bitsandbytes / GPTQ / own checkpoints, quantizing at load, the `quantize` CLI round trip,
memory accounting, errors, and the triton backend on quantized models.

transformers + bitsandbytes (optional) are the oracle for NF4: a tiny model quantized by transformers on
the CPU and saved by it is what `load` must read, and its logits are what ours must match.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import codellama_rt as cl
from codellama_rt import CheckpointError
from codellama_rt.api import load_model
from codellama_rt.cli import main
from codellama_rt.model.config import ModelArgs
from codellama_rt.kernels import cpu_native
from codellama_rt.kernels.int4 import quantize_int4
from codellama_rt.kernels.nf4 import quantize_nf4
from codellama_rt.kernels.int8_format import quantize_int8
from codellama_rt.quant import linear as quant_linear
from codellama_rt.quant.linear import (QuantLinear, model_weight_bytes, projection_names, quantize_model,
                                quantize_weight, quantized_modules, set_module, weight_bytes)
from codellama_rt.checkpoint.writer import part_tensors
from conftest import write_hf_checkpoint

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n"
# tiny shapes every format accepts: int4 groups of 32/64 divide dim 128 and ffn 192; out dims are multiples of 8
SHAPES = dict(dim=128, n_heads=4, n_kv_heads=2, ffn=192, n_layers=2)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def min_cosine(a, b) -> float:
    """Per-position cosine similarity of logit vectors, the worst position."""
    return F.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).min().item()


@pytest.fixture(scope="module")
def fp32_ckpt(tmp_path_factory, tiny_tokenizer):
    return write_hf_checkpoint(tmp_path_factory.mktemp("q") / "fp32", tiny_tokenizer, **SHAPES, seed=3)[0]


@pytest.fixture(scope="module")
def ids(fp32_ckpt):
    return cl.load(fp32_ckpt).tokenizer.encode(PROMPT)


def _is_proj(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in PROJ)


def write_bnb_like(src: Path, out: Path) -> Path:
    """What transformers + bitsandbytes save for nf4 with double quant, made with our quantizer: every
    projection quantized on its own (q, k, v separately) and stored under bitsandbytes' tensor names."""
    out.mkdir()
    sd = load_file(src / "model.safetensors")
    tensors = {}
    for name, t in sd.items():
        if _is_proj(name):
            tensors.update(part_tensors(name[:-len(".weight")], quantize_nf4(t)))
        else:
            tensors[name] = t
    # clone: the NF4 codebook is one shared tensor, and safetensors refuses shared storage
    save_file({k: v.clone() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                     "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
    return out


def _pack_cols(v: torch.Tensor) -> torch.Tensor:
    """[rows, cols] values 0..15 -> int32 [rows, cols // 8], lowest nibble first (GPTQ's qzeros packing)."""
    v = v.to(torch.int64).reshape(v.shape[0], -1, 8)
    packed = sum(v[..., j] << (4 * j) for j in range(8))
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def write_gptq(src: Path, out: Path, group_size: int) -> Path:
    """A GPTQ v1 checkpoint (qzeros hold zero - 1, fp16 scales, trivial g_idx) of `src`, from quantize_int4."""
    out.mkdir()
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        if not _is_proj(name):
            tensors[name] = t
            continue
        w = quantize_int4(t, group_size=group_size, dtype=torch.float16)
        zeros = w.unpack()[1]
        assert zeros.min() >= 1, "a zero point of 0 has no GPTQ v1 encoding"
        prefix = name[:-len(".weight")]
        tensors.update({f"{prefix}.qweight": w.qweight, f"{prefix}.qzeros": _pack_cols(zeros.int() - 1),
                        f"{prefix}.scales": w.scales,
                        f"{prefix}.g_idx": torch.arange(t.shape[1], dtype=torch.int32) // group_size})
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                                     "sym": False, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
    return out


def quantize_cli(src, out, method, *extra) -> Path:
    assert main(["quantize", "--model", str(src), "--method", method, "--out", str(out), *map(str, extra)]) == 0
    return Path(out)


# ---- (a) NF4 vs transformers + bitsandbytes --------------------------------------------------

@pytest.fixture(scope="module")
def bnb_saved(fp32_ckpt, tmp_path_factory):
    """(directory saved by transformers' 4-bit model, that model) — skipped where bnb 4-bit cannot run."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(fp32_ckpt, quantization_config=config).eval()
    except (ImportError, ValueError, RuntimeError, NotImplementedError) as e:
        pytest.skip(f"transformers + bitsandbytes cannot run 4-bit on this machine: {e}")
    for m in model.modules():
        # bitsandbytes' AVX512-BF16 CPU path repacks the weight on the first forward with absmax rounded to
        # bf16 (about 0.4% off, and a save after it re-quantizes that rounded absmax): keep the standard
        # dequantize-then-matmul path, the one its CUDA kernels and our kernels compute
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    out = tmp_path_factory.mktemp("bnb") / "bnb"
    model.save_pretrained(out)
    try:
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"bitsandbytes cannot run 4-bit matmuls on this machine: {e}")
    shutil.copy(fp32_ckpt / "tokenizer.model", out / "tokenizer.model")
    return out, model


def test_bnb_checkpoint_logits_match_transformers(bnb_saved, ids):
    directory, hf_model = bnb_saved
    # fp32 prefill like bitsandbytes' CPU path (the cpu backend's default multiplies prefill rows in bf16)
    ours = cl.load(directory, kernel_options={"cpu_bf16_prefill": False})
    wqkv = ours.module.layers[0].attn.wqkv
    assert isinstance(wqkv, QuantLinear) and len(wqkv.parts) == 3  # q, k, v keep their own quant states
    assert not isinstance(ours.module.output, QuantLinear)           # transformers keeps lm_head dense
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits.float()
    got = ours.logits(ids)
    assert rel_err(got, want) < 1e-3


def test_our_quantizer_is_bitsandbytes(bnb_saved, fp32_ckpt, tmp_path, ids):
    """Quantizing each projection with quantize_nf4 gives bitsandbytes' own tensors, byte for byte."""
    directory, _ = bnb_saved
    real = load_file(directory / "model.safetensors")
    mine = load_file(write_bnb_like(fp32_ckpt, tmp_path / "like") / "model.safetensors")
    assert set(mine) == set(real)
    for name, t in real.items():
        if name.endswith(".quant_state.bitsandbytes__nf4"):
            a, b = (json.loads(bytes(x.tolist())) for x in (mine[name], t))
            assert a == b, name
        else:
            assert mine[name].dtype == t.dtype and mine[name].shape == t.shape, name
            assert torch.equal(mine[name], t), name


def test_quantize_at_load_equals_bnb(bnb_saved, fp32_ckpt, ids):
    """load(fp32, quantize="nf4") vs the bnb checkpoint: the same 4-bit codes everywhere, and single-part
    projections identical in every tensor. Fused wqkv / w13 are quantized as one weight here, so their
    double-quant statistics (8-bit absmax over blocks of 256) differ slightly from bnb's per-part ones."""
    bnb = cl.load(bnb_saved[0])
    ours = cl.load(fp32_ckpt, quantize="nf4")

    def layout(q):  # the parts in bitsandbytes' layout (a cpu model holds them in the native kernels')
        return [p.to_nf4() if p.format == "nf4_cpu" else p for p in q.parts]

    for name, q in quantized_modules(ours.module).items():
        mine, ref = layout(q), layout(bnb.module.get_submodule(name))
        assert len(mine) == 1
        assert torch.equal(mine[0].codes, torch.cat([p.codes for p in ref])), name
        if len(ref) == 1:
            for field in ("absmax", "code", "nested_absmax", "nested_code"):
                assert torch.equal(getattr(mine[0], field), getattr(ref[0], field)), (name, field)
            assert mine[0].nested_offset == ref[0].nested_offset
    assert rel_err(ours.logits(ids), bnb.logits(ids)) < 3e-3


def test_bnb_like_checkpoint_loads_without_bitsandbytes(fp32_ckpt, tmp_path, ids):
    """The bitsandbytes layout is read by our own code: a checkpoint in that layout made by quantize_nf4
    loads (no bitsandbytes involved) and gives the logits of the same parts quantized at load."""
    model = cl.load(write_bnb_like(fp32_ckpt, tmp_path / "like"))
    assert len(model.module.layers[1].mlp.w13.parts) == 2
    dense = cl.load(fp32_ckpt)
    for name in projection_names(dense.module, head=False):  # the same parts, quantized one source tensor each
        w = dense.module.get_submodule(name).weight
        rows = [p.shape[0] for p in model.module.get_submodule(name).parts]
        set_module(dense.module, name, QuantLinear([quantize_nf4(x) for x in w.split(rows)]))
    assert torch.equal(model.logits(ids), dense.logits(ids))
    assert rel_err(model.logits(ids), cl.load(fp32_ckpt).logits(ids)) < 0.15  # and it is a 4-bit model


# ---- (b) int4 --------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_int4_cosine_vs_fp32(tmp_path, tiny_tokenizer, group_size, seed):
    path, _ = write_hf_checkpoint(tmp_path / "c", tiny_tokenizer, **SHAPES, seed=seed)
    ref = cl.load(path)
    ids = ref.tokenizer.encode(PROMPT)
    q = load_model(path, quantize="int4", group_size=group_size)
    assert all(p.group_size == group_size for m in quantized_modules(q.module).values() for p in m.parts)
    cos = min_cosine(q.logits(ids), ref.logits(ids))
    assert cos > 0.98, cos


def test_nf4_cosine_vs_fp32(fp32_ckpt, ids):
    assert min_cosine(cl.load(fp32_ckpt, quantize="nf4").logits(ids), cl.load(fp32_ckpt).logits(ids)) > 0.98


@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_checkpoint_loads_and_matches(fp32_ckpt, tmp_path, ids, group_size):
    model = cl.load(write_gptq(fp32_ckpt, tmp_path / "gptq", group_size))
    wqkv = model.module.layers[0].attn.wqkv
    assert isinstance(wqkv, QuantLinear) and len(wqkv.parts) == 1  # q, k, v merged (exact in GPTQ's layout)
    # the same weights quantized by quantize_int4 (fp16 scales) and swapped in by hand
    dense = cl.load(fp32_ckpt)
    for name in projection_names(dense.module, head=False):
        w = dense.module.get_submodule(name).weight
        set_module(dense.module, name,
                   QuantLinear([quantize_int4(w, group_size=group_size, dtype=torch.float16).to(dtype=torch.float32)]))
    assert torch.equal(model.logits(ids), dense.logits(ids))
    assert min_cosine(model.logits(ids), cl.load(fp32_ckpt).logits(ids)) > 0.98


# ---- (c) quantize CLI round trip ---------------------------------------------------------------

@pytest.mark.parametrize("method,extra", [("nf4", []), ("int4", ["--group-size", 64]),
                                          ("nf4", ["--quantize-head"])], ids=["nf4", "int4-g64", "nf4-head"])
def test_quantize_cli_roundtrip(fp32_ckpt, tmp_path, ids, capsys, method, extra):
    out = quantize_cli(fp32_ckpt, tmp_path / "out", method, *extra)
    assert "wrote" in capsys.readouterr().out
    assert (out / "tokenizer.model").read_bytes() == (fp32_ckpt / "tokenizer.model").read_bytes()
    assert (out / "generation_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "codellama-rt"
    head = "--quantize-head" in extra
    want = load_model(fp32_ckpt, quantize=method, group_size=64 if method == "int4" else None, quantize_head=head)
    got = cl.load(out)
    assert isinstance(got.module.output, QuantLinear) == head
    assert torch.equal(got.logits(ids), want.logits(ids))
    assert weight_bytes(got.module) == weight_bytes(want.module)


def test_quantize_cli_roundtrip_multipart_and_tied(fp32_ckpt, tmp_path, tiny_tokenizer):
    """A bitsandbytes-layout source (3 parts per wqkv) re-saved keeps its parts; a tied model with a
    quantized head keeps its embedding dense."""
    src = write_bnb_like(fp32_ckpt, tmp_path / "like")
    out = quantize_cli(src, tmp_path / "out", "nf4")
    a, b = cl.load(src), cl.load(out)
    assert len(b.module.layers[0].attn.wqkv.parts) == 3
    assert torch.equal(a.logits([1, 5, 9, 200]), b.logits([1, 5, 9, 200]))

    tied, _ = write_hf_checkpoint(tmp_path / "tied", tiny_tokenizer, **SHAPES, tie=True)
    out = quantize_cli(tied, tmp_path / "tied-out", "int4", "--group-size", 32, "--quantize-head")
    want = load_model(tied, quantize="int4", group_size=32, quantize_head=True)
    got = cl.load(out)
    assert isinstance(got.module.output, QuantLinear) and not got.module.tok_embeddings.is_meta
    assert torch.equal(got.logits([1, 5, 9, 200]), want.logits([1, 5, 9, 200]))


def test_requantizing_a_checkpoint_with_a_quantized_head_keeps_it(fp32_ckpt, tmp_path, capsys, ids):
    """Its lm_head has no dense weight left to write: the new checkpoint keeps it quantized (it used to write
    the quantized head under a config saying dense, a checkpoint that did not load)."""
    first = quantize_cli(fp32_ckpt, tmp_path / "first", "int8", "--quantize-head")
    again = quantize_cli(first, tmp_path / "again", "int8")
    config = json.loads((again / "config.json").read_text())
    assert config["quantization_config"]["quantize_head"] is True
    assert torch.equal(cl.load(again).logits(ids), cl.load(first).logits(ids))


def test_a_failed_quantize_leaves_no_out_directory(fp32_ckpt, tmp_path, capsys):
    q8 = quantize_cli(fp32_ckpt, tmp_path / "q8", "int8")
    for model, out in ((tmp_path / "missing", tmp_path / "new" / "out"), (q8, tmp_path / "empty")):
        if out.name == "empty":
            out.mkdir()
        assert main(["quantize", "--model", str(model), "--method", "nf4", "--out", str(out)]) == 2
        assert not out.exists() if out.name == "out" else not any(out.iterdir())
    capsys.readouterr()


def test_quantize_cli_refuses_nonempty_out(fp32_ckpt, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert main(["quantize", "--model", str(fp32_ckpt), "--method", "nf4", "--out", str(tmp_path / "out")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


# ---- the module swap and memory ------------------------------------------------------------------

def test_quantize_model_swaps_projections_only(fp32_ckpt):
    model = cl.load(fp32_ckpt)
    quantize_model(model.module, "nf4")
    names = set(quantized_modules(model.module))
    assert names == set(projection_names(model.module, head=False))
    assert model.module.tok_embeddings.dtype == torch.float32 and not isinstance(model.module.output, QuantLinear)
    quantize_model(model.module, "nf4", quantize_head=True)  # already-quantized projections are left alone
    assert set(quantized_modules(model.module)) == names | {"output"}


@pytest.mark.parametrize("method, rows", [("int4", 8 * 13), ("int8", 101), ("int4", 8)])
def test_large_weights_quantize_in_row_chunks_to_the_same_part(monkeypatch, method, rows):
    """quantize_weight bounds the quantizers' temporaries by quantizing rows a chunk at a time: the part is
    the one quantizing the whole weight gives (rows are independent), chunks and a shorter last one joined."""
    w = torch.randn(rows, 128, dtype=torch.bfloat16) * torch.linspace(0.1, 3, rows)[:, None].bfloat16()
    monkeypatch.setattr(quant_linear, "QUANTIZE_CHUNK", 3 * 128)  # int8: 3 rows a chunk; int4: 8
    got = quantize_weight(w, method, group_size=64)
    want = quantize_int4(w, group_size=64) if method == "int4" else quantize_int8(w)
    assert got.shape == want.shape and got.format == method
    for field in ("qweight", "qzeros", "scales") if method == "int4" else ("qweight", "scales"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    with pytest.raises(ValueError, match="multiple of 8"):  # the quantizer's own error, for the whole weight
        quantize_weight(torch.randn(8 * 13 + 4, 128), "int4", group_size=64)


@pytest.mark.parametrize("method", ["int4", "int8", "nf4"])
def test_quantize_at_load_reads_a_chunk_of_rows_at_a_time(fp32_ckpt, monkeypatch, method):
    """A projection quantized at load is read from the checkpoint a chunk of rows at a time (across its q, k, v
    tensors), never whole, and quantized to exactly the parts of its dense weight (NF4: whole blocks at a time,
    its double quantization once every block is in)."""
    from codellama_rt.checkpoint.tensor_files import SafetensorsReader
    from codellama_rt.kernels import nf4_format

    dense = load_model(fp32_ckpt, backend="reference")
    monkeypatch.setattr(quant_linear, "QUANTIZE_CHUNK", 24 * 64)  # 24 rows of the tiny model's 64 inputs
    monkeypatch.setattr(nf4_format, "QUANTIZE_CHUNK", 24 * 64)
    reads = []
    get_part = SafetensorsReader.get_part
    monkeypatch.setattr(SafetensorsReader, "get_part", lambda self, name, dim, start, length: reads.append(
        length) or get_part(self, name, dim, start, length))
    model = load_model(fp32_ckpt, backend="reference", quantize=method, group_size=32 if method == "int4" else None,
                       quantize_head=True)
    assert reads and max(reads) <= 24
    for name, q in quantized_modules(model.module).items():
        want = quantize_weight(dense.module.get_submodule(name).weight.detach(), method, group_size=32)
        [got] = q.parts
        fields = {"int4": ("qweight", "qzeros", "scales"), "int8": ("qweight", "scales"),
                  "nf4": ("codes", "absmax", "nested_absmax")}[method]
        for field in fields:
            assert torch.equal(getattr(got, field), getattr(want, field)), (name, field)
        assert getattr(got, "nested_offset", 0) == getattr(want, "nested_offset", 0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_quantized_buffers_move_with_the_model(fp32_ckpt, backend):
    model = load_model(fp32_ckpt, quantize="int4", group_size=32, backend=backend)
    q = model.module.layers[0].mlp.w13
    native = backend == "cpu" and cpu_native.available()  # held in the native kernels' layout
    fields = ("codes", "scales", "zs") if native else ("qweight", "qzeros", "scales")
    assert {n for n, _ in q.named_buffers()} == {f"p0_{f}" for f in fields}
    model.module.to("meta")
    assert all(getattr(q.parts[0], f).is_meta for f in fields)


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_weight_bytes_match_shape_formula(fp32_ckpt, method):
    model = load_model(fp32_ckpt, quantize=method, group_size=64 if method == "int4" else None)
    measured = weight_bytes(model.module)
    assert measured == model_weight_bytes(model.args, bytes_per_elem=4, method=method, group_size=64,
                                          cpu_layout=cpu_native.available())  # a cpu model's int4: held once
    assert measured < weight_bytes(cl.load(fp32_ckpt).module)


# ---- (e) info ------------------------------------------------------------------------------------

def _info_rows(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(["info", *map(str, argv)]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        key, value = line.split("  ", 1)
        rows[key.strip()] = value.strip()
    return rows


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_info_7b_quantized_memory(capsys, method):
    rows = _info_rows(capsys, "--model", "CodeLlama-7b", "--dtype", "bfloat16", "--quantize", method)
    assert rows["weight memory (bfloat16)"] == "12.55 GiB"
    key = next(k for k in rows if k.startswith(f"weight memory ({method}"))
    gb = float(rows[key].split("(")[1].split(" GB")[0])
    assert gb <= 3.9, rows[key]
    expect = model_weight_bytes(ModelArgs.from_preset("CodeLlama-7b"), bytes_per_elem=2, method=method)
    assert gb == round(expect / 1e9, 2)


def test_info_quantized_checkpoint(capsys, fp32_ckpt, tmp_path):
    out = quantize_cli(fp32_ckpt, tmp_path / "out", "int4", "--group-size", 32)
    rows = _info_rows(capsys, "--model", out, "--dtype", "float32")
    assert rows["quantization"] == "int4 (codellama-rt, group_size=32)"
    measured = weight_bytes(cl.load(out).module)
    assert rows["weight memory (int4 g32 + float32)"].startswith(f"{measured / 2 ** 30:.2f} GiB")
    assert _info_rows(capsys, "--model", out, "--quantize", "int4", "--dtype", "float32") == rows  # as loading
    for flags in (["--quantize", "nf4"], ["--quantize", "int4", "--group-size", "64"]):  # what loading refuses
        assert main(["info", "--model", str(out), *flags]) == 2
        assert "is already quantized as int4" in capsys.readouterr().err


# ---- (d) bad inputs --------------------------------------------------------------------------------

def _expect(path, file, tensor, *fragments, **kw):
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kw)
    msg = str(info.value)
    assert str(file) in msg, msg
    if tensor is not None:
        assert f"'{tensor}'" in msg, msg
    for f in fragments:
        assert f in msg, msg


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory: Path, **qc):
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(qc)
    (directory / "config.json").write_text(json.dumps(config))


def _drop(directory: Path, name: str):
    sd = load_file(directory / "model.safetensors")
    del sd[name]
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})


def test_bad_unknown_quant_method(fp32_ckpt, tmp_path):
    d = _copy(fp32_ckpt, tmp_path / "d")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (d / "config.json").write_text(json.dumps(config))
    _expect(d, d / "config.json", None, "'awq'")
    assert main(["info", "--model", str(d)]) == 2


def test_bad_bnb_missing_absmax(fp32_ckpt, tmp_path):
    d = write_bnb_like(fp32_ckpt, tmp_path / "d")
    _drop(d, "model.layers.1.mlp.up_proj.weight.absmax")
    _expect(d, d / "model.safetensors", "model.layers.1.mlp.up_proj.weight.absmax", "missing")


def test_bad_bnb_shape_disagrees(fp32_ckpt, tmp_path):
    d = write_bnb_like(fp32_ckpt, tmp_path / "d")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 256
    (d / "config.json").write_text(json.dumps(config))
    _expect(d, d / "model.safetensors", "model.layers.0.mlp.gate_proj.weight.quant_state.bitsandbytes__nf4",
            "[256, 128]")


def test_bad_bnb_fp4(fp32_ckpt, tmp_path):
    d = write_bnb_like(fp32_ckpt, tmp_path / "d")
    _edit_config(d, bnb_4bit_quant_type="fp4")
    _expect(d, d / "config.json", None, "fp4")


def test_bad_gptq_missing_qzeros(fp32_ckpt, tmp_path):
    d = write_gptq(fp32_ckpt, tmp_path / "d", 32)
    _drop(d, "model.layers.0.self_attn.k_proj.qzeros")
    _expect(d, d / "model.safetensors", "model.layers.0.self_attn.k_proj.qzeros", "missing")


def test_bad_gptq_group_size_does_not_divide(fp32_ckpt, tmp_path):
    d = write_gptq(fp32_ckpt, tmp_path / "d", 32)
    _edit_config(d, group_size=48)
    _expect(d, d / "model.safetensors", "model.layers.0.self_attn.q_proj.qweight", "group_size=48",
            "does not divide")


def test_bad_gptq_act_order(fp32_ckpt, tmp_path):
    d = write_gptq(fp32_ckpt, tmp_path / "d", 32)
    _edit_config(d, desc_act=True)
    _expect(d, d / "config.json", None, "desc_act")
    d2 = write_gptq(fp32_ckpt, tmp_path / "d2", 32)
    sd = load_file(d2 / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.g_idx"] = sd["model.layers.1.mlp.down_proj.g_idx"].flip(0).contiguous()
    save_file(sd, d2 / "model.safetensors", metadata={"format": "pt"})
    _expect(d2, d2 / "model.safetensors", "model.layers.1.mlp.down_proj.g_idx", "act-order")


def test_bad_own_format(fp32_ckpt, tmp_path):
    d = quantize_cli(fp32_ckpt, tmp_path / "nf4", "nf4")
    _drop(d, "layers.1.attn.wqkv.0.weight.absmax")
    _expect(d, d / "model.safetensors", "layers.1.attn.wqkv.0.weight.absmax", "missing")
    d = quantize_cli(fp32_ckpt, tmp_path / "int4", "int4", "--group-size", 32)
    _edit_config(d, group_size=40)
    _expect(d, d / "model.safetensors", "layers.0.attn.wqkv.0.qweight", "does not divide")
    _edit_config(d, group_size=32, method="int3")
    _expect(d, d / "config.json", None, "int3")


def test_bad_quantize_requests(fp32_ckpt, tmp_path):
    # a group of 128 does not divide ffn 192: named with the source tensor
    _expect(fp32_ckpt, fp32_ckpt / "model.safetensors", "model.layers.0.mlp.down_proj.weight", "group_size=128",
            quantize="int4", group_size=128)
    # without a group size, int4 takes the largest that divides every width (64 here)
    auto = cl.load(fp32_ckpt, quantize="int4")
    assert {p.group_size for q in quantized_modules(auto.module).values() for p in q.parts} == {64}
    d = write_bnb_like(fp32_ckpt, tmp_path / "d")
    with pytest.raises(ValueError, match="already quantized"):
        cl.load(d, quantize="int4")
    cl.load(d, quantize="nf4")  # asking for what it already is: loads as stored


# ---- (f) triton backend (interpreter on CPU) on quantized models ----------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_triton_backend_greedy_tokens_match_reference(fp32_ckpt, method):
    kw = dict(quantize=method, group_size=64 if method == "int4" else None, max_seq_len=64)
    ref = load_model(fp32_ckpt, backend="reference", **kw)
    tri = load_model(fp32_ckpt, backend="triton", **kw)
    ids = ref.tokenizer.encode("import os")
    assert rel_err(tri.logits(ids), ref.logits(ids)) < 2e-3
    got = tri.generate("import os", max_new_tokens=6)
    want = ref.generate("import os", max_new_tokens=6)
    assert len(want.token_ids) == 6 and got.token_ids == want.token_ids
