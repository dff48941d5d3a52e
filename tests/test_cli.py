"""The command line (`codellama_rt.cli.main`, run in-process): its output equals the Python API's, and bad
arguments or bad input exit with status 2 and exactly one line on stderr naming the problem."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

import codellama_rt
from codellama_rt.cli import main
from conftest import write_hf_checkpoint

PROMPT = "def fibonacci(n):"
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    """One tiny HF checkpoint (written by transformers) shared by the module; returns (dir, hf_model)."""
    return write_hf_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", tiny_tokenizer)


@pytest.fixture(scope="module")
def model(ckpt):
    return codellama_rt.load(ckpt[0])


def run(capsys, *argv, stdin=None, monkeypatch=None):
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress bar)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys, *argv, **kw) -> str:
    code, out, err = run(capsys, *argv, **kw)
    assert code == 0, err
    assert err == ""
    return out


# ---- generate ------------------------------------------------------------------------------

def test_generate_greedy_equals_api(capsys, ckpt, model):
    out = ok(capsys, "generate", "--model", ckpt[0], "--max-new-tokens", 12, PROMPT)
    want = model.generate(PROMPT, max_new_tokens=12)
    assert len(want.token_ids) == 12 and want.text  # a real completion, not an empty one
    assert out == want.text + "\n"


def test_generate_sampling_flags_equal_api(capsys, ckpt, model):
    flags = ["--temperature", 0.7, "--top-p", 0.9, "--top-k", 20, "--seed", 3]
    out = ok(capsys, "generate", "--model", ckpt[0], "--max-new-tokens", 12, *flags, PROMPT)
    want = model.generate(PROMPT, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20, seed=3)
    assert out == want.text + "\n"
    # --seed reaches the sampler's generator
    other = ok(capsys, "generate", "--model", ckpt[0], "--max-new-tokens", 12, *flags[:-1], 4, PROMPT)
    assert other == model.generate(PROMPT, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=20,
                                   seed=4).text + "\n"


@pytest.mark.parametrize("flags", [["--speculate", "lookup", "--num-speculative-tokens", 4],
                                   ["--speculate", "draft", "--draft-quantize", "int8"],
                                   ["--speculate", "lookup", "--temperature", 0.7, "--seed", 3]])
def test_generate_speculative_flags_equal_plain(capsys, ckpt, model, flags):
    """--speculate lookup / draft (the model itself quantized as the draft): plain decoding's text."""
    sampling = dict(temperature=0.7, seed=3) if "--seed" in flags else {}
    out = ok(capsys, "generate", "--model", ckpt[0], "--max-new-tokens", 16, *flags, PROMPT)
    assert out == model.generate(PROMPT, max_new_tokens=16, **sampling).text + "\n"


def test_generate_draft_without_a_draft_model_is_a_usage_error(capsys, ckpt):
    code, out, err = run(capsys, "generate", "--model", ckpt[0], "--speculate", "draft", PROMPT)
    assert code == 2 and "draft model" in err and out == ""


def test_generate_repetition_penalty_equals_api(capsys, ckpt, model):
    out = ok(capsys, "generate", "--model", ckpt[0], "--max-new-tokens", 12, "--repetition-penalty", 1.3, PROMPT)
    assert out == model.generate(PROMPT, max_new_tokens=12, repetition_penalty=1.3).text + "\n"


def test_generate_repeated_stop(capsys, ckpt, model):
    full = model.generate(PROMPT, max_new_tokens=24).text
    assert len(full) >= 6
    stop = full[3:5]  # occurs in the greedy text: generation must cut before its first occurrence
    never = "\x00never\x00"
    out = ok(capsys, "generate", "--model", ckpt[0], "--max-new-tokens", 24, "--stop", never, "--stop", stop, PROMPT)
    want = model.generate(PROMPT, max_new_tokens=24, stop=[never, stop])
    assert want.finish_reason == "stop"
    assert out == want.text + "\n"
    assert out[:-1] == full[:full.find(stop)]


def test_generate_prompt_from_stdin(capsys, monkeypatch, ckpt, model):
    prompt = "import os\n\ndef walk(path):"
    out = ok(capsys, "generate", "--model", ckpt[0], "--max-new-tokens", 12, "-", stdin=prompt,
             monkeypatch=monkeypatch)
    assert out == model.generate(prompt, max_new_tokens=12).text + "\n"
    assert out != model.generate("-", max_new_tokens=12).text + "\n"


# ---- infill --------------------------------------------------------------------------------

def test_infill_prefix_suffix_equals_api(capsys, ckpt, model):
    out = ok(capsys, "infill", "--model", ckpt[0], "--max-new-tokens", 10, "--prefix", PREFIX, "--suffix", SUFFIX)
    want = model.infill(PREFIX, SUFFIX, max_new_tokens=10)
    assert want.text
    assert out == want.text + "\n"


def test_infill_file_equals_prefix_suffix(capsys, tmp_path, ckpt, model):
    f = tmp_path / "hole.py"
    f.write_text(PREFIX + "<FILL_ME>" + SUFFIX, encoding="utf-8")
    via_file = ok(capsys, "infill", "--model", ckpt[0], "--max-new-tokens", 10, "--file", f)
    via_flags = ok(capsys, "infill", "--model", ckpt[0], "--max-new-tokens", 10, "--prefix", PREFIX,
                   "--suffix", SUFFIX)
    assert via_file == via_flags == model.infill(PREFIX, SUFFIX, max_new_tokens=10).text + "\n"


def test_infill_suffix_first(capsys, tmp_path, ckpt, model):
    want = model.infill(PREFIX, SUFFIX, suffix_first=True, max_new_tokens=10).text + "\n"
    out = ok(capsys, "infill", "--model", ckpt[0], "--max-new-tokens", 10, "--prefix", PREFIX, "--suffix", SUFFIX,
             "--suffix-first")
    assert out == want
    f = tmp_path / "hole.py"
    f.write_text(PREFIX + "<FILL_ME>" + SUFFIX, encoding="utf-8")
    assert ok(capsys, "infill", "--model", ckpt[0], "--max-new-tokens", 10, "--file", f, "--suffix-first") == want


# ---- info ----------------------------------------------------------------------------------

def _info(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def test_info_checkpoint_dir(capsys, ckpt):
    directory, hf_model = ckpt
    rows = _info(ok(capsys, "info", "--model", directory, "--dtype", "float32"))
    n = hf_model.num_parameters()  # transformers' own count of the checkpoint it wrote
    assert rows["parameters"].startswith(f"{n:,} ")
    # tiny model: 2 layers x 4 kv heads x head_dim 16, K and V, fp32 -> 2*2*4*16*4 bytes = 1 KiB per token
    kv = next(v for k, v in rows.items() if k.startswith("KV cache"))
    assert "(1 KiB per token)" in kv
    assert "KV cache (1 x 512 tokens)" in rows
    assert str(directory) in rows["model"]


def test_info_preset_7b(capsys):
    rows = _info(ok(capsys, "info", "--model", "CodeLlama-7b", "--dtype", "bfloat16"))
    assert rows["parameters"] == "6,738,546,688 (6.74 B)"
    assert rows["weight memory (bfloat16)"] == "12.55 GiB"
    # bf16 K and V for 32 layers x 32 heads x 128: 512 KiB per token, 8 GiB for the 16k context
    assert rows["KV cache (1 x 16384 tokens)"] == "8.00 GiB (512 KiB per token)"


def test_info_preset_batch_and_context(capsys):
    rows = _info(ok(capsys, "info", "--model", "CodeLlama-34b", "--dtype", "float16", "--max-batch-size", 4,
                    "--max-seq-len", 4096))
    assert rows["parameters"] == "33,743,970,304 (33.74 B)"
    # GQA: 48 layers x 8 kv heads x 128, fp16: 192 KiB per token; 4 x 4096 tokens = 3 GiB
    assert rows["KV cache (4 x 4096 tokens)"] == "3.00 GiB (192 KiB per token)"


def _write_meta_checkpoint(directory, *, dim=64, n_layers=2, n_heads=4, vocab=1000, ffn=192, n_shards=2) -> int:
    """A Meta-layout directory (params.json with vocab_size -1, as Llama 2 / CodeLlama-34B ship it, and
    model-parallel consolidated.NN.pth shards); returns the number of parameters of the unsplit tensors."""
    g = torch.Generator().manual_seed(0)
    full = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(n_layers):
        a, m = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        full.update({f"{a}.wq.weight": (dim, dim), f"{a}.wk.weight": (dim, dim), f"{a}.wv.weight": (dim, dim),
                     f"{a}.wo.weight": (dim, dim), f"{m}.w1.weight": (ffn, dim), f"{m}.w3.weight": (ffn, dim),
                     f"{m}.w2.weight": (dim, ffn), f"layers.{i}.attention_norm.weight": (dim,),
                     f"layers.{i}.ffn_norm.weight": (dim,)})
    split = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    shards = [{} for _ in range(n_shards)]
    for name, shape in full.items():
        t = torch.randn(shape, generator=g) * 0.02
        d = split.get(name.split(".")[-2])
        pieces = [t] * n_shards if d is None else t.chunk(n_shards, dim=d)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone().contiguous()
    directory.mkdir(parents=True)
    for r, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{r:02d}.pth")
    (directory / "params.json").write_text(json.dumps(
        {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "multiple_of": 32, "ffn_dim_multiplier": None,
         "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": -1}))
    return sum(torch.Size(s).numel() for s in full.values())


def test_info_meta_layout_vocab_from_embeddings(capsys, tmp_path):
    n = _write_meta_checkpoint(tmp_path / "meta")
    rows = _info(ok(capsys, "info", "--model", tmp_path / "meta"))
    assert rows["ffn dim / vocab"] == "192 / 1000"
    assert rows["parameters"].startswith(f"{n:,} ")


@pytest.mark.slow
def test_info_module_entry_point_subprocess():
    proc = subprocess.run([sys.executable, "-m", "codellama_rt", "info", "--model", "CodeLlama-34b"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "33,743,970,304" in proc.stdout


# ---- chat ----------------------------------------------------------------------------------

def test_chat_two_turns(capsys, monkeypatch, ckpt, model):
    out = ok(capsys, "chat", "--model", ckpt[0], "--max-new-tokens", 8,
             stdin="Write a function.\n\nNow test it.\n", monkeypatch=monkeypatch)
    first = model.chat([{"role": "user", "content": "Write a function."}], max_new_tokens=8).text
    second = model.chat([{"role": "user", "content": "Write a function."},
                         {"role": "assistant", "content": first},
                         {"role": "user", "content": "Now test it."}], max_new_tokens=8).text
    assert first and second
    assert out == first + "\n" + second + "\n"


# ---- bad input: exit 2, one line on stderr naming the problem ----------------------------------

def bad(capsys, *argv, stdin=None, monkeypatch=None) -> str:
    code, out, err = run(capsys, *argv, stdin=stdin, monkeypatch=monkeypatch)
    assert code == 2, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("codellama-rt: error: "), err
    return lines[0]


@pytest.mark.parametrize("flags, names", [
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--max-new-tokens", "-1"], "max_new_tokens"),
    (["--stop", ""], "stop"),
    (["--dtype", "float64"], "float64"),
    (["--backend", "nonsense"], "nonsense"),
    (["--quantize", "bogus"], "bogus"),
    (["--max-seq-len", "0"], "max_seq_len"),
    (["--temperature", "warm"], "temperature"),
    (["--experiments", "bogus"], "--experiments: unknown experiment(s) bogus"),
    (["--experiments", "attn_rope,fast"], "--experiments: unknown experiment(s) fast"),
])
def test_bad_generate_flags(capsys, ckpt, flags, names):
    line = bad(capsys, "generate", "--model", ckpt[0], *flags, PROMPT)
    assert names in line


def test_kernel_flags_reach_load_with_the_environment_as_default(capsys, monkeypatch, ckpt, model):
    """--experiments / --pdl / --no-pdl become load's kernel_options; unset, CODELLAMA_RT_EXPERIMENTS and
    CODELLAMA_RT_PDL fill them in; a bad variable exits 2 naming it."""
    from codellama_rt import KernelOptions, api

    seen = []

    def load_model(*args, kernel_options=None, **kwargs):
        seen.append(kernel_options)
        return model

    monkeypatch.setattr(api, "load_model", load_model)
    monkeypatch.delenv("CODELLAMA_RT_EXPERIMENTS", raising=False)
    monkeypatch.delenv("CODELLAMA_RT_PDL", raising=False)
    gen = ["generate", "--model", ckpt[0], "--max-new-tokens", 2]
    ok(capsys, *gen, PROMPT)
    ok(capsys, *gen, "--experiments", "attn_rope, norm_gemv", "--no-pdl", PROMPT)
    monkeypatch.setenv("CODELLAMA_RT_EXPERIMENTS", "attn_one_pass")
    monkeypatch.setenv("CODELLAMA_RT_PDL", "0")
    ok(capsys, *gen, PROMPT)
    ok(capsys, *gen, "--experiments", "", "--pdl", PROMPT)
    assert seen == [KernelOptions(), KernelOptions({"attn_rope", "norm_gemv"}, pdl=False),
                    KernelOptions({"attn_one_pass"}, pdl=False), KernelOptions()]
    monkeypatch.setenv("CODELLAMA_RT_EXPERIMENTS", "bogus")
    assert "CODELLAMA_RT_EXPERIMENTS: unknown experiment(s) bogus" in bad(capsys, *gen, PROMPT)


def test_bad_device_cuda_without_cuda(capsys, ckpt):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    line = bad(capsys, "generate", "--model", ckpt[0], "--device", "cuda", PROMPT)
    assert "cuda" in line.lower()


def test_bad_model_nonexistent(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    line = bad(capsys, "generate", "--model", missing, PROMPT)
    assert str(missing) in line


def test_bad_model_truncated_safetensors(capsys, tmp_path, hf_checkpoint):
    directory, _ = hf_checkpoint()
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    line = bad(capsys, "generate", "--model", directory, "--max-new-tokens", 4, PROMPT)
    assert str(weights) in line
    assert "truncated" in line


def test_bad_info_model(capsys, tmp_path):
    line = bad(capsys, "info", "--model", tmp_path / "nope")
    assert "nope" in line
    line = bad(capsys, "info", "--model", "codellama-7b")  # preset names are exact
    assert "codellama-7b" in line


@pytest.mark.parametrize("argv, names", [
    (["bogus"], "bogus"),
    (["generate"], "prompt"),
    ([], "command"),
])
def test_bad_usage(capsys, argv, names):
    line = bad(capsys, *argv)
    assert names in line


def test_bad_prompt_longer_than_context(capsys, ckpt):
    long_prompt = " ".join(["print(x)"] * 20)
    line = bad(capsys, "generate", "--model", ckpt[0], "--max-seq-len", 16, long_prompt)
    assert "max_seq_len" in line


def test_bad_infill_missing_suffix(capsys, ckpt):
    line = bad(capsys, "infill", "--model", ckpt[0], "--prefix", PREFIX)
    assert "--suffix" in line


@pytest.mark.parametrize("markers", [0, 2])
def test_bad_infill_file_markers(capsys, tmp_path, ckpt, markers):
    f = tmp_path / "hole.py"
    f.write_text("a = 1\n" + "<FILL_ME>\n" * markers + "b = 2\n", encoding="utf-8")
    line = bad(capsys, "infill", "--model", ckpt[0], "--file", f)
    assert "<FILL_ME>" in line and f"found {markers}" in line


def test_bad_infill_file_missing(capsys, tmp_path, ckpt):
    f = tmp_path / "absent.py"
    line = bad(capsys, "infill", "--model", ckpt[0], "--file", f)
    assert str(f) in line


@pytest.mark.parametrize("flags, names", [
    (["--dtype", "float64"], "float64"),
    (["--max-seq-len", "0"], "max-seq-len"),
    (["--max-seq-len", "-5"], "max-seq-len"),
    (["--max-batch-size", "0"], "max-batch-size"),
])
def test_bad_info_flags(capsys, flags, names):
    line = bad(capsys, "info", "--model", "CodeLlama-7b", *flags)
    assert names in line
