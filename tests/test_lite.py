"""The torch-free runtime (codellama_rt.lite): a lite model written by `export_lite` gives, through the C library
and numpy, bitwise the logits of the torch extension's native step on the same weights (fp32, int8, int4, NF4),
logits near the reference module graph's, the greedy tokens of the same step run in a loop by hand, never imports
torch, and refuses bad files, bad arguments and concurrent calls with errors naming them."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from codellama_rt.errors import CheckpointError
from codellama_rt.kernels import cpu_native

lite = pytest.importorskip("codellama_rt.lite")
try:
    from codellama_rt.lite.native import library

    library()
except RuntimeError as e:  # (no compiler at install time: the torch extension's tests skip the same way)
    pytest.skip(f"lite library not built: {e}", allow_module_level=True)

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="native CPU kernels not built")

PROMPT = [1, 450, 2987, 13, 1753, 7, 300, 11, 2000, 5, 42, 99, 3000, 17]  # (the default model: 4096 ids)


def _load(quantize=None):
    from codellama_rt.api import load_model

    return load_model(None, dtype=torch.float32, device="cpu", quantize=quantize,
                      group_size=64 if quantize == "int4" else None, progress=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """quantize -> (torch Model, lite directory) of the default model."""
    from codellama_rt.lite.export import export_lite

    out = {}
    for q in (None, "int8", "int4", "nf4"):
        model = _load(q)
        d = tmp_path_factory.mktemp(f"lite-{q or 'fp32'}")
        export_lite(model, d)
        out[q] = (model, d)
    return out


def _torch_step(model, ids):
    from codellama_rt.model.native_decoder import native_decoder

    step = native_decoder(model.module)
    a = model.module.args
    cache = torch.zeros(a.n_layers, 2, 1, a.n_kv_heads, len(ids), a.head_dim)
    with torch.inference_mode():
        return step(torch.tensor(ids), torch.arange(len(ids)), cache, torch.zeros(len(ids), dtype=torch.long))


@pytest.mark.parametrize("quantize", [None, "int8", "int4", "nf4"])
def test_logits_bitwise_the_torch_native_step(exported, quantize):
    model, d = exported[quantize]
    got = lite.LiteModel(d).logits(PROMPT)
    assert got.dtype == np.float32 and got.shape == (len(PROMPT), model.args.vocab_size)
    assert np.array_equal(got, _torch_step(model, PROMPT).numpy())


def test_logits_near_the_reference_graph(exported):
    """fp32: the module graph on the reference backend (torch's matmuls, another summation order)."""
    from codellama_rt.api import load_model

    ref = load_model(None, backend="reference", dtype=torch.float32, device="cpu", progress=False)
    want = ref.logits(PROMPT)[0].float().numpy()
    got = lite.LiteModel(exported[None][1]).logits(PROMPT)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_greedy_tokens_equal_the_step_by_hand(exported, quantize):
    """generate's loop (the prompt as prompt rows, then one row a step) gives the tokens of the native step run by
    hand: the prompt as one block, argmax, one token a step."""
    _, d = exported[quantize]
    m = lite.LiteModel(d)
    c = m.generate(PROMPT, max_new_tokens=24)
    dec, n = m.decoder, len(PROMPT)
    cache, slot = dec.new_cache(1, n + 24), np.zeros(1, dtype=np.int64)
    logits = dec.step(np.array(PROMPT), np.arange(n), cache, np.zeros(n, dtype=np.int64), out_rows=1, prompt=True)
    want, eos = [], set(m.config["eos_ids"])
    while len(want) < 24:
        t = int(logits[-1].argmax())
        if t in eos:
            break
        want.append(t)
        logits = dec.step(np.array([t]), np.array([n + len(want) - 1]), cache, slot)
    assert c.token_ids == want and c.prompt_tokens == n
    assert c.finish_reason == ("length" if len(want) == 24 else "eos")
    assert c.text == m.tokenizer.decode(want)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("quantize", [None, "int8", "int4", "nf4"])
def test_prompt_rows_near_decode_rows(exported, quantize, bf16):
    """Prompt rows (prompt=True: the projections a packed GEMM from 16 rows on, another summation order) give the
    decode step's logits to fp32 rounding, or with bf16 prompts (quantized weights, CPUs with AVX512-BF16) to bf16
    rounding; under 16 rows the same bits."""
    m = lite.LiteModel(exported[quantize][1], bf16_prefill=bf16)
    dec = m.decoder
    assert dec.bf16_prompt == (bf16 and dec.bf16_prompt)  # (off when asked off; on where the CPU has it)
    ids = np.array((PROMPT * 5)[:70])
    slots = np.zeros(len(ids), dtype=np.int64)
    rows = dec.step(ids, np.arange(len(ids)), dec.new_cache(1, 70), slots)
    prompt = dec.step(ids, np.arange(len(ids)), dec.new_cache(1, 70), slots, prompt=True)
    tol = 3e-2 if dec.bf16_prompt and quantize else 1e-5  # (bf16: 8 bits of mantissa, errors through 8 layers)
    assert np.abs(prompt - rows).max() / np.abs(rows).max() < tol
    few = ids[:9]
    assert np.array_equal(dec.step(few, np.arange(9), dec.new_cache(1, 9), slots[:9], prompt=True), rows[:9])


def test_long_prompt_in_chunks_equals_one_block(exported, monkeypatch):
    """A prompt longer than PREFILL_CHUNK runs in several steps: the next-token logits of one block, bitwise (a
    packed GEMM's row does not depend on the other rows either; 80 = 32 + 32 + 16, each chunk a GEMM)."""
    from codellama_rt.lite import model as lite_model

    m = lite.LiteModel(exported[None][1])
    ids = (PROMPT * 6)[:80]
    dec = m.decoder
    whole = dec.step(np.array(ids), np.arange(80), dec.new_cache(1, 80), np.zeros(80, dtype=np.int64), out_rows=1,
                     prompt=True)
    monkeypatch.setattr(lite_model, "PREFILL_CHUNK", 32)
    run = lite_model.LiteStream(m, ids, "text", lite_model._Sampling())
    assert np.array_equal(run._prefill(dec.new_cache(1, 80)), whole[-1])


def test_threads_do_not_change_the_logits(exported):
    from codellama_rt.lite.native import set_threads

    d = exported["int8"][1]
    before = lite.LiteModel(d).logits(PROMPT)
    try:
        assert set_threads(1) == 1
        assert np.array_equal(lite.LiteModel(d).logits(PROMPT), before)
    finally:
        set_threads(torch.get_num_threads())


def test_threads_hold_for_every_thread(exported):
    """threads= is the process's, not only the calling thread's (OpenMP's own setting is per thread)."""
    from codellama_rt.lite.native import set_threads

    seen = []
    try:
        lite.LiteModel(exported["int8"][1], threads=1)
        worker = threading.Thread(target=lambda: seen.append(library().clrt_set_threads(0)))
        worker.start()
        worker.join()
    finally:
        set_threads(torch.get_num_threads())
    assert seen == [1]


def test_sampling_stop_and_stream(exported):
    d = exported[None][1]
    m = lite.LiteModel(d)
    greedy = m.generate("def add(a, b):", max_new_tokens=16)
    # top_k = 1 at any temperature is greedy (a known answer); a seed repeats a sampled run
    assert m.generate("def add(a, b):", max_new_tokens=16, temperature=0.8, top_k=1, seed=3).token_ids == \
        greedy.token_ids
    s1 = m.generate("def add(a, b):", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    s2 = m.generate("def add(a, b):", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert s1.token_ids == s2.token_ids
    run = m.stream("def add(a, b):", max_new_tokens=16)
    assert "".join(run) == greedy.text and run.completion.token_ids == greedy.token_ids
    with pytest.raises(RuntimeError, match="once"):
        list(run)
    if len(greedy.text.strip()) > 2:
        cut = greedy.text.strip()[1:3]
        stopped = m.generate("def add(a, b):", max_new_tokens=16, stop=[cut])
        assert stopped.finish_reason == "stop" and stopped.text == greedy.text[:greedy.text.find(cut)]


def test_infill_stops_at_eot(exported):
    m = lite.LiteModel(exported[None][1])
    if m.tokenizer.eot_id is None:
        pytest.skip("the default model's vocabulary has no infilling pieces")
    c = m.infill("def add(a, b):\n    ", "\n", max_new_tokens=32)
    assert c.finish_reason in ("eot", "eos", "length") and m.tokenizer.eot_id not in c.token_ids


def test_no_torch_in_the_process(exported):
    code = ("import sys\nfrom codellama_rt.lite import LiteModel\n"
            f"c = LiteModel({str(exported['int4'][1])!r}).generate('def f(x):', max_new_tokens=8)\n"
            "assert len(c.token_ids) >= 1 or c.finish_reason == 'eos'\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cli(exported):
    r = subprocess.run([sys.executable, "-m", "codellama_rt.lite", str(exported[None][1]), "def f(x):",
                        "--max-new-tokens", "8", "--stats"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "new tokens" in r.stderr, r.stderr
    want = lite.LiteModel(exported[None][1]).generate("def f(x):", max_new_tokens=8).text
    assert r.stdout == want + "\n"
    r = subprocess.run([sys.executable, "-m", "codellama_rt.lite", "/nonexistent-dir", "x"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "not found" in r.stderr


# ---- errors -------------------------------------------------------------------------------------

def test_bad_arguments(exported):
    m = lite.LiteModel(exported[None][1])
    V = m.config["vocab_size"]
    for kwargs, match in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                          (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop"),
                          (dict(nucleus=0.5), "nucleus"), (dict(seed=-1), "seed"), (dict(top_k=True), "top_k")]:
        with pytest.raises((ValueError, TypeError), match=match):
            m.generate("x", **kwargs)
    with pytest.raises(ValueError, match=f"token id {V}"):
        m.generate([1, V])
    with pytest.raises(ValueError, match="no tokens"):
        m.generate([])
    with pytest.raises(ValueError, match="context"):
        m.generate([1] * m.max_seq_len)
    with pytest.raises(ValueError, match="str or a list"):
        m.generate(3.5)
    if m.tokenizer.eot_id is not None:
        with pytest.raises(ValueError, match="context"):
            m.infill("x = 1\n" * 2000, "\n")
    with pytest.raises(ValueError, match="threads"):
        lite.LiteModel(exported[None][1], threads=0)


def test_concurrent_calls_raise(exported):
    m = lite.LiteModel(exported[None][1])
    run = iter(m.stream("def f(x):", max_new_tokens=64))
    next(run)  # the stream holds the model now
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, m.generate, "y")))
    t.start()
    t.join()
    assert errors and "one generation at a time" in str(errors[0].value)
    run.close()
    assert m.generate("y", max_new_tokens=2).prompt_tokens > 0  # released


def test_step_checks(exported):
    m = lite.LiteModel(exported[None][1])
    dec = m.decoder
    cache = dec.new_cache(1, 8)
    one = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="position 8 outside the cache"):
        dec.step(one, np.array([8]), cache, one)
    with pytest.raises(ValueError, match="slot 1 outside"):
        dec.step(one, one, cache, np.array([1]))
    with pytest.raises(ValueError, match="int64"):
        dec.step(one.astype(np.int32), one, cache)
    with pytest.raises(ValueError, match="cache must be"):
        dec.step(one, one, cache[:, :1])
    with pytest.raises(ValueError, match="logits for 1 .. B rows"):
        dec.step(one, one, cache, one, out_rows=2)


def test_decode_one_is_step(exported):
    dec = lite.LiteModel(exported["int4"][1]).decoder
    caches = [dec.new_cache(1, 20) for _ in range(2)]
    one = np.zeros(1, dtype=np.int64)
    for p, t in enumerate(PROMPT):
        got = dec.decode_one(t, p, caches[0]).copy()
        assert np.array_equal(got, dec.step(np.array([t]), np.array([p]), caches[1], one)[0])
    assert np.array_equal(caches[0], caches[1])
    with pytest.raises(ValueError, match="position 20 outside"):
        dec.decode_one(1, 20, caches[0])
    with pytest.raises(ValueError, match="cache must be"):
        dec.decode_one(1, 0, caches[0][:, :1])


def _rewrite(src, dst, edit_header=None, edit_config=None):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if edit_config:
        config = json.loads(header["__metadata__"]["codellama_rt_lite"])
        edit_config(config)
        header["__metadata__"]["codellama_rt_lite"] = json.dumps(config)
    if edit_header:
        edit_header(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.mkdir(exist_ok=True)
    (dst / "lite.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    (dst / "tokenizer.model").write_bytes((src.parent / "tokenizer.model").read_bytes())
    return dst


def test_bad_files(exported, tmp_path):
    src = exported["int8"][1] / "lite.safetensors"
    with pytest.raises(CheckpointError, match="not found"):
        lite.LiteModel(tmp_path / "missing")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "lite.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        lite.LiteModel(tmp_path / "short")
    bad = _rewrite(src, tmp_path / "nometa", edit_header=lambda h: h.pop("__metadata__"))
    with pytest.raises(CheckpointError, match="not a lite model file"):
        lite.LiteModel(bad)
    bad = _rewrite(src, tmp_path / "version", edit_config=lambda c: c.update(version=99))
    with pytest.raises(CheckpointError, match="version 99"):
        lite.LiteModel(bad)
    bad = _rewrite(src, tmp_path / "config", edit_config=lambda c: c.pop("layers"))
    with pytest.raises(CheckpointError, match="layers missing"):
        lite.LiteModel(bad)
    bad = _rewrite(src, tmp_path / "dtype", edit_header=lambda h: h["embedding"].update(dtype="F16"))
    with pytest.raises(CheckpointError, match="'embedding'"):
        lite.LiteModel(bad)
    bad = _rewrite(src, tmp_path / "shape-type", edit_header=lambda h: h["embedding"].update(shape=[-1, "x"]))
    with pytest.raises(CheckpointError, match="non-negative"):
        lite.LiteModel(bad)
    bad = _rewrite(src, tmp_path / "offsets",
                   edit_header=lambda h: h["embedding"].update(data_offsets=[0, 10 ** 12]))
    with pytest.raises(CheckpointError, match="data offsets"):
        lite.LiteModel(bad)

    def wide(c):
        c["projections"][0][0]["N"] += 4

    bad = _rewrite(src, tmp_path / "shape", edit_config=wide)
    with pytest.raises(ValueError, match="proj.0.0.*tensor 'w'"):
        lite.LiteModel(bad)

    def drop(c):
        c["projections"].pop()

    bad = _rewrite(src, tmp_path / "missing-head", edit_config=drop)
    with pytest.raises(ValueError, match="32 projections for 8 layers"):
        lite.LiteModel(bad)
    bad = _rewrite(src, tmp_path / "ffn", edit_config=lambda c: c.update(ffn_dim=700))
    with pytest.raises(ValueError, match=r"projection 2: .* do not make the model's \[1400, 256\]"):
        lite.LiteModel(bad)
    for edit, message in ((dict(norm_eps=float("nan")), "norm_eps=nan"), (dict(norm_eps=-1e-5), "norm_eps"),
                          (dict(eos_ids=None), "eos_ids=None"), (dict(eos_ids=[10 ** 9]), "eos_ids")):
        bad = _rewrite(src, tmp_path / "cfg", edit_config=lambda c: c.update(edit))
        with pytest.raises(CheckpointError, match=message):
            lite.LiteModel(bad)
    deep = tmp_path / "deep"
    deep.mkdir()
    text = b"[" * 200_000
    (deep / "lite.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match="not a lite model file"):
        lite.LiteModel(deep)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "lite.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):  # (never blocks opening it)
        lite.LiteModel(fifo)


@pytest.mark.parametrize("quantize, tensor", [("int4", "zs"), ("nf4", "levels")])
def test_a_missing_optional_tensor_is_an_error(exported, tmp_path, quantize, tensor):
    """int4's zero points and NF4's levels are optional in the layout: the file lists each part's tensors, so
    one gone is named (it ran as another format before); a file without the lists still loads, as written."""
    src = exported[quantize][1] / "lite.safetensors"
    bad = _rewrite(src, tmp_path / "gone", edit_header=lambda h: h.pop(f"proj.5.0.{tensor}"))
    with pytest.raises(ValueError, match=f"tensor 'proj.5.0.{tensor}' missing"):
        lite.LiteModel(bad)

    def unlisted(c):
        for parts in c["projections"]:
            for p in parts:
                p.pop("tensors")

    old = _rewrite(src, tmp_path / "old", edit_config=unlisted)
    assert np.array_equal(lite.LiteModel(old).logits(PROMPT), lite.LiteModel(exported[quantize][1]).logits(PROMPT))


def test_file_tensors_start_on_cache_lines(tmp_path):
    """lite.file.write: every tensor's data 64-byte aligned in the mapping (odd sizes padded by `__pad.` entries,
    which read() skips), the same arrays back, and a file the safetensors package reads too (no holes)."""
    from safetensors.numpy import load_file

    from codellama_rt.lite.file import ALIGN, PAD_PREFIX, read, write

    arrays = {"a": np.arange(5, dtype=np.float32), "b": np.arange(-7, 6, dtype=np.int8).reshape(1, 13),
              "c": np.arange(3 * 85, dtype=np.uint8).reshape(3, 85), "d": np.ones((2, 3), dtype=np.float32)}
    config = {"version": 1, "dim": 4, "n_heads": 1, "n_kv_heads": 1, "head_dim": 4, "ffn_dim": 4, "vocab_size": 4,
              "layers": 1, "max_seq_len": 4, "norm_eps": 1e-5, "projections": []}
    write(tmp_path / "y.safetensors", arrays, config)
    stored = load_file(str(tmp_path / "y.safetensors"))
    assert any(k.startswith(PAD_PREFIX) for k in stored)
    for name, a in arrays.items():
        assert np.array_equal(stored[name], a) and stored[name].dtype == a.dtype
    got = read(tmp_path / "y.safetensors")
    assert sorted(got.arrays) == sorted(arrays) and got.config == config
    for name, a in arrays.items():
        assert np.array_equal(got.arrays[name], a) and got.arrays[name].ctypes.data % ALIGN == 0
    with pytest.raises(ValueError, match="float64"):
        write(tmp_path / "z.safetensors", {"e": np.zeros(3)}, config)
    assert not (tmp_path / "z.safetensors").exists() and not (tmp_path / "z.safetensors.tmp").exists()


def test_cache_starts_on_a_cache_line(exported):
    from codellama_rt.lite.native import aligned_zeros

    for shape, dtype in (((3, 5), np.float32), ((7,), np.int64), ((1000, 33), np.float32)):
        a = aligned_zeros(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.ctypes.data % 64 == 0 and not a.any()
        assert a.flags.c_contiguous and a.flags.writeable
    assert aligned_zeros((2, 0, 4)).shape == (2, 0, 4)  # (an empty cache: new_cache(1, 0) before a first prompt)
    cache = lite.LiteModel(exported[None][1]).decoder.new_cache(1, 9)
    assert cache.ctypes.data % 64 == 0 and cache.shape[4] == 9


def test_export_refuses_what_the_step_cannot_run():
    from codellama_rt.api import load_model
    from codellama_rt.lite.export import export_lite

    model = load_model(None, dtype=torch.bfloat16, device="cpu", progress=False)
    with pytest.raises(ValueError, match="fp32"):
        export_lite(model, "/nonexistent/never-written")


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_prompt_rows_of_odd_shapes(tiny_tokenizer, tmp_path, quantize):
    """Odd widths through the packed GEMM: K = 85 (w2: tails of the 16-wide transposes and of bf16 pairs), N = 1000
    (a part-filled 64-wide panel), K = 288 past one 256-input block, head_dim 24 (attention's scalar path)."""
    from codellama_rt.api import load_model
    from codellama_rt.lite.export import export_lite
    from codellama_rt.model.config import ModelArgs
    from codellama_rt.tiny import write_random_checkpoint

    args = ModelArgs(dim=288, n_layers=2, n_heads=12, n_kv_heads=4, ffn_dim=85, vocab_size=1000, max_seq_len=256)
    ck = write_random_checkpoint(tmp_path / "ck", args, tiny_tokenizer)
    model = load_model(ck, dtype=torch.float32, device="cpu", quantize=quantize, progress=False)
    export_lite(model, tmp_path / "lite")
    for bf16 in (False, True):
        dec = lite.LiteModel(tmp_path / "lite", bf16_prefill=bf16).decoder
        ids = np.arange(3, 3 + 7 * 40, 7) % 1000
        slots = np.zeros(len(ids), dtype=np.int64)
        rows = dec.step(ids, np.arange(len(ids)), dec.new_cache(1, len(ids)), slots)
        prompt = dec.step(ids, np.arange(len(ids)), dec.new_cache(1, len(ids)), slots, prompt=True)
        tol = 3e-2 if dec.bf16_prompt and quantize else 1e-5
        assert np.abs(prompt - rows).max() / np.abs(rows).max() < tol


@pytest.mark.parametrize("heads", [(2, 2), (8, 2)])
def test_prompt_attention_blocks(tiny_tokenizer, tmp_path, heads):
    """Prompt rows' attention (keys transposed per block, csrc/attention.h's attend_prompt) against decode rows' to
    fp32 rounding: head_dim 64 with one query head per kv head and 16 with four, two slots' prompts in one step
    (two blocks), a block continuing a cached prefix (its first row at position 23), and rows whose key counts are
    not whole 16-key tiles."""
    from codellama_rt.api import load_model
    from codellama_rt.lite.export import export_lite
    from codellama_rt.model.config import ModelArgs
    from codellama_rt.tiny import write_random_checkpoint

    n_heads, n_kv = heads
    args = ModelArgs(dim=128, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=96, vocab_size=1000,
                     max_seq_len=128)
    ck = write_random_checkpoint(tmp_path / "ck", args, tiny_tokenizer)
    export_lite(load_model(ck, dtype=torch.float32, device="cpu", progress=False), tmp_path / "lite")
    dec = lite.LiteModel(tmp_path / "lite").decoder
    ids, other = (np.arange(64) * 37 + 5) % 1000, (np.arange(26) * 91 + 11) % 1000
    first, second = np.arange(23), np.arange(23, 23 + 41)  # slot 0: a cached prefix, then 41 rows; slot 1: 26 rows
    tok = np.concatenate([ids[second], other])
    pos = np.concatenate([second, np.arange(26)])
    slots = np.concatenate([np.zeros(41, dtype=np.int64), np.ones(26, dtype=np.int64)])
    out = {}
    for prompt in (False, True):
        cache = dec.new_cache(2, 128)
        dec.step(ids[first], first, cache, np.zeros(23, dtype=np.int64))  # (decode rows either way)
        out[prompt] = dec.step(tok, pos, cache, slots, prompt=prompt)
    assert np.abs(out[True] - out[False]).max() / np.abs(out[False]).max() < 1e-5
    if lite.native.isa() != "plain":  # (a plain build has no packed prompt path: the same bits there)
        assert not np.array_equal(out[True], out[False])  # another summation order: the prompt path did run


def test_export_lite_command(tmp_path, capsys):
    """`codellama-rt export-lite`: the default model in int8, which then generates what export_lite's model does;
    a file where the directory should be is refused (exit 2, naming --out), as is an int4 group size for int8."""
    from codellama_rt.cli import main

    assert main(["export-lite", "--quantize", "int8", "--out", str(tmp_path / "lite")]) == 0
    assert "python -m codellama_rt.lite" in capsys.readouterr().out
    got = lite.LiteModel(tmp_path / "lite").logits(PROMPT)
    assert np.array_equal(got, _torch_step(_load("int8"), PROMPT).numpy())
    (tmp_path / "file").write_text("x")
    assert main(["export-lite", "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["export-lite", "--quantize", "int8", "--group-size", "32", "--out", str(tmp_path / "g")]) == 2
    assert "--group-size applies to --quantize int4 only" in capsys.readouterr().err
    model_dir = tmp_path / "a-model"  # another model's directory: its tokenizer.model must not be replaced
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "tokenizer.model").write_bytes(b"theirs")
    assert main(["export-lite", "--out", str(model_dir)]) == 2
    assert "holds other files (config.json)" in capsys.readouterr().err
    assert (model_dir / "tokenizer.model").read_bytes() == b"theirs"
    assert main(["export-lite", "--quantize", "int8", "--out", str(tmp_path / "lite")]) == 0  # an earlier export


# ---- speculative decoding ---------------------------------------------------------------------------

class _Fixed:
    """A proposer that proposes from a fixed continuation (an oracle: plain decoding's own; or wrong ids)."""

    def __init__(self, prompt_len: int, continuation: list, offset: int = 0):
        self.n, self.base, self.cont, self.offset = 0, prompt_len, continuation, offset

    def extend(self, ids) -> None:
        self.n += len(ids)

    def propose(self, k: int) -> list:
        return [(t + self.offset) % 4096 for t in self.cont[self.n:self.n + k]]


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_speculation_gives_plain_greedy_tokens(exported, quantize):
    """Verify passes (rows of one slot at consecutive positions: each row's logits a decode step's) accept exactly
    what plain greedy decoding would emit: with every proposal right (an oracle), with every one wrong, and with
    prompt lookup; stop strings, EOS and max_new_tokens landing inside a block end it there."""
    from codellama_rt.lite import model as lite_model

    m = lite.LiteModel(exported[quantize][1])
    edit = "def add(a, b):\n    return a + b\n\n\ndef add2(a, b):\n    return a + b\n\n\n# again:\ndef add"
    for prompt in ["def f(x):", "import os\nimport sys\n", edit]:
        for kw in [dict(max_new_tokens=40), dict(max_new_tokens=13), dict(max_new_tokens=40, ignore_eos=True)]:
            plain = m.generate(prompt, **kw)
            ids = m._ids(prompt)
            for offset, k in [(0, 8), (0, 3), (1, 8)]:  # the oracle at two widths, then every proposal wrong
                run = lite_model.LiteStream(m, ids, "text", lite_model._Sampling(**kw, num_speculative_tokens=k),
                                            proposer=_Fixed(len(ids), plain.token_ids + [2] * 16, offset))
                text = "".join(run)
                got = run.completion
                assert (got.token_ids, got.finish_reason, text) == (plain.token_ids, plain.finish_reason,
                                                                     plain.text), (prompt, kw, offset)
                sp = got.speculation  # (how many a pass proposes adapts to this CPU's pass costs)
                assert sp.accepted == (sp.proposed if offset == 0 else 0)
            looked = m.generate(prompt, speculate="lookup", **kw)
            assert looked.token_ids == plain.token_ids and looked.speculation is not None
        if plain.text.strip():
            stop = plain.text.strip()[:2]
            want = m.generate(prompt, max_new_tokens=40, stop=[stop])
            run = lite_model.LiteStream(m, ids, "text", lite_model._Sampling(max_new_tokens=40, stop=(stop,)),
                                        proposer=_Fixed(len(ids), plain.token_ids))
            assert "".join(run) == want.text and run.completion.finish_reason == want.finish_reason


def test_speculation_arguments(exported):
    m = lite.LiteModel(exported[None][1])
    with pytest.raises(ValueError, match="greedy decoding only"):
        m.generate("x", speculate="lookup", temperature=0.7)
    with pytest.raises(ValueError, match="no draft model"):
        m.generate("x", speculate="draft")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        m.generate("x", speculate="lookup", num_speculative_tokens=0)
    assert m.generate("x", max_new_tokens=4).speculation is None
