"""Our CPU decode and prefill beside llama.cpp's (issue 21's peer), same weights, batch 1, greedy, no stop
token, each runtime in a child process of its own (peak RSS per child).

    python bench/cpu_peer.py [--model DIR | --random 57m] --llama-python PY --llama-src DIR [--threads 2] [--out FILE]

--llama-python: a Python with llama-cpp-python installed (built from source in a venv of its own; see
DEVELOPERS' notes for the CMAKE_ARGS that avoid the AMX int8 path); --llama-src: its source tree's
vendor/llama.cpp (for convert_hf_to_gguf.py and gguf-py, run with this interpreter). Without them only our
rows are measured. The checkpoint is converted to GGUF f32 and f16 by llama.cpp's converter, and q8_0 /
q4_0 by llama.cpp's own quantizer; llama.cpp gets an f32 KV cache (its f16 default flips near-ties, so token
agreement would measure the cache, not the weights). Our rows: fp32, bf16, int8, int4 and nf4 (quantized at
load, the lm_head with them as llama.cpp's quantizer does, unless --dense-head), int4-bf16; lite-fp32, lite-int8,
lite-int4, lite-nf4: the same weights written by export_lite and run by codellama_rt.lite, torch never imported.

--random 57m / 300m / 1b: instead of a checkpoint, random weights of the issue's larger shapes (dim 512, 8 layers,
ffn 1376; dim 1024, 16 layers, GQA 4, ffn 2752) or TinyLlama's (~1.1B: dim 2048, 22 layers, GQA 8, ffn 5632),
CodeLlama's 32016-token vocabulary and tokenizer (from ../shared/tokenizers or --tokenizer), written to a
temporary directory (their greedy ids are noise: compare speed and memory only).

Measured per row: decode tokens/s over `--new-tokens` greedy tokens after a short prompt ((n - 1) / (last -
first token time)), prefill tokens/s of a `--prefill-tokens` prompt (tokens / time to its first token), peak
RSS of the child (medians over --repeat rounds of every row, the largest RSS), and the generated ids
(agreement with our fp32 reported against llama.cpp's f32), and the mean agreement over the 64-id
continuations of `codellama_rt.bench.prompts.CODE_PROMPTS` (first round only), each runtime's rows against its
own full width (ours fp32, llama.cpp's f32): one prompt's figure mostly says where its first near-tie falls.
llama.cpp's quantizer keeps `output.weight` at q6_K in a q4_0 file (our int4 rows quantize the lm_head to int4
as well). Rows named int4-bf16 / nf4-bf16 run the 4-bit weights with bf16 activations; int8 / int4 round
decode rows to int16 / int8 blocks where the native kernels are built for AVX2
(`KernelOptions.cpu_integer_activations`), int8-fp32x / int4-fp32x keep fp32 products.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

AGREEMENT_TOKENS = 64  # ids of each continuation of CODE_PROMPTS (agreement beyond the one timed prompt's)
TIMEOUT_S = 900
RANDOM_SHAPES = {  # ModelArgs fields of --random's checkpoints
    "57m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1376, vocab_size=32016),
    "300m": dict(dim=1024, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=2752, vocab_size=32016),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, vocab_size=32016),  # TinyLlama's
}
SHARED_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "codellama-tokenizer.model"

# Each child's own peak RSS: VmHWM of its address space. (ru_maxrss would not do: Linux carries the spawning
# process's peak across exec, so every child would report at least this script's RSS.)
PEAK_RSS = r'''
import resource

def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (not Linux: the rusage figure)
'''

OURS = PEAK_RSS + r'''
import json, sys, time, queue
import torch
import codellama_rt as cl
from codellama_rt.engine.events import Completion
from codellama_rt.engine.sampling import SamplingParams
a = json.loads(sys.argv[1])
from codellama_rt.api import load_model
m = load_model(a["model"], device="cpu", dtype=a["dtype"], quantize=a["quantize"], threads=a["threads"],
               max_seq_len=a["n_ctx"], quantize_head=a["quantize_head"], kernel_options=a["kernel_options"])
eng = m.engine

def run(ids, n):
    events = queue.SimpleQueue()
    t0 = time.perf_counter()
    eng.submit(ids, SamplingParams(max_new_tokens=n), {}, sink=events.put, background=False)
    stamps, out = [], []
    while True:
        e = eng.next_event(events)
        if isinstance(e, BaseException):
            raise e
        if isinstance(e, Completion):
            return t0, stamps, e.token_ids
        for _ in e.token_ids:
            stamps.append(time.perf_counter())

run(a["ids"], 4)
run(a["long_ids"][::-1][:64], 1)  # warm-up; the one slot's cache then shares no prefix with long_ids
t0, stamps, _ = run(a["long_ids"], 1)
prefill = len(a["long_ids"]) / (stamps[0] - t0)
t0, stamps, ids = run(a["ids"], a["new_tokens"])
decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
rss = peak_rss_mb()
more = [run(p, a["agree_tokens"])[2] for p in a["agree_prompts"]]
print(json.dumps({"decode_tok_s": decode, "prefill_tok_s": prefill, "peak_rss_mb": rss, "ids": ids,
                  "agree_ids": more}))
'''

# codellama_rt.lite (no torch in the process): the same measurements from the completion's own clocks (the prompt's
# logits; the new tokens' steps: n - 1 steps between the first token and the last)
LITE = PEAK_RSS + r'''
import json, sys
a = json.loads(sys.argv[1])
from codellama_rt.lite import LiteModel
m = LiteModel(a["lite"], threads=a["threads"])
m.generate(a["ids"], max_new_tokens=4, ignore_eos=True)
m.generate(a["long_ids"][::-1][:64], max_new_tokens=1)
prefill = m.generate(a["long_ids"], max_new_tokens=1, ignore_eos=True)
c = m.generate(a["ids"], max_new_tokens=a["new_tokens"], ignore_eos=True)
rss = peak_rss_mb()
more = [m.generate(p, max_new_tokens=a["agree_tokens"], ignore_eos=True).token_ids for p in a["agree_prompts"]]
assert "torch" not in sys.modules
print(json.dumps({"decode_tok_s": (len(c.token_ids) - 1) / c.decode_seconds,
                  "prefill_tok_s": len(a["long_ids"]) / prefill.prefill_seconds, "peak_rss_mb": rss,
                  "ids": c.token_ids, "agree_ids": more}))
'''

LLAMA = PEAK_RSS + r'''
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama
a = json.loads(sys.argv[1])
if a.get("quantize_to"):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": 7, "q4_0": 2}[a["quantize_to"]]
    rc = llama_cpp.llama_model_quantize(a["gguf"].encode(), a["out"].encode(), params)
    print(json.dumps({"rc": rc}))
    sys.exit(0)
llm = Llama(model_path=a["gguf"], n_ctx=a["n_ctx"], n_batch=512, n_threads=a["threads"], n_threads_batch=a["threads"],
            type_k=0, type_v=0, verbose=False)  # 0: GGML_TYPE_F32 (an f32 KV cache)

def last_logits():
    # Llama.scores is filled only with logits_all=True; the context holds the last token's logits
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

def greedy(ids, n):
    llm.reset()
    llm.eval(ids)
    stamps, out = [], []
    for _ in range(n):
        tok = int(np.argmax(last_logits()))
        stamps.append(time.perf_counter())
        out.append(tok)
        llm.eval([tok])
    return stamps, out

greedy(a["ids"], 4)
llm.reset(); llm.eval(a["long_ids"][::-1][:64])
llm.reset()
t0 = time.perf_counter()
llm.eval(a["long_ids"])
prefill = len(a["long_ids"]) / (time.perf_counter() - t0)
stamps, ids = greedy(a["ids"], a["new_tokens"])
decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
rss = peak_rss_mb()
more = [greedy(p, a["agree_tokens"])[1] for p in a["agree_prompts"]]
print(json.dumps({"decode_tok_s": decode, "prefill_tok_s": prefill, "peak_rss_mb": rss, "ids": ids,
                  "agree_ids": more}))
'''


def child(python: str, code: str, args: dict, env=None) -> dict:
    """Run `code` with `python` and `args` (JSON); its last stdout line, parsed. A failure raises naming it."""
    done = subprocess.run([python, "-c", code, json.dumps(args)], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(python).name} child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def convert(model: Path, src: Path, outtype: str, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py of `model` to `out` as `outtype` (f32 | f16), run by this Python."""
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    done = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype,
                           "--outfile", str(out)], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {done.stderr[-3000:]}")
    return out


def summarize(runs: list) -> dict:
    """One row from its repeated runs: median decode and prefill speed, the largest peak RSS, the first run's
    ids (and its continuations of CODE_PROMPTS, which only the first run makes)."""
    return {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "ids": runs[0]["ids"],
            "agree_ids": runs[0].get("agree_ids", []),
            "decode_runs": [r["decode_tok_s"] for r in runs], "prefill_runs": [r["prefill_tok_s"] for r in runs]}


def agreement(a: list, b: list) -> float:
    """Share of positions where two greedy continuations agree, up to the first disagreement included."""
    from codellama_rt.bench.common import shared_prefix

    n = min(len(a), len(b))
    return shared_prefix(a, b) / n if n else 0.0


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="HF-layout directory (default: the embedded model)")
    p.add_argument("--random", choices=sorted(RANDOM_SHAPES), default=None,
                   help="random weights of one of the issue's larger shapes instead of --model")
    p.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER, help="tokenizer.model for --random")
    p.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python")
    p.add_argument("--llama-src", type=Path, default=None, help="llama.cpp's source tree (vendor/llama.cpp)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--repeat", type=int, default=3, help="rounds over all rows; each row reports its medians")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--ours", default="fp32,bf16,int8,int4,int4-bf16,nf4",
                   help="our rows: fp32, bf16, int8 / int4 / nf4 (fp32 activations; int8's and int4's decode rows "
                        "in integer blocks on AVX2), int8-fp32x / int4-fp32x (fp32 products), int4-bf16 / nf4-bf16; "
                        "lite-fp32 / lite-int8 / lite-int4 / lite-nf4: codellama_rt.lite (no torch in the process)")
    p.add_argument("--dense-head", action="store_true",
                   help="keep our lm_head dense in the quantized rows (default: quantized too, as llama.cpp does)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if (a.llama_python is None) != (a.llama_src is None):
        p.error("--llama-python and --llama-src go together")
    if a.random and a.model:
        p.error("--random and --model exclude each other")
    if a.random and not a.tokenizer.is_file():
        p.error(f"--random needs a CodeLlama tokenizer.model: {a.tokenizer} does not exist (pass --tokenizer)")
    return a


def random_checkpoint(shape: str, tokenizer: Path, directory: Path) -> Path:
    """An HF-layout directory of random weights with RANDOM_SHAPES[shape] (fp32, seed 0)."""
    from codellama_rt.model.config import ModelArgs
    from codellama_rt.tiny import write_random_checkpoint

    args = ModelArgs(**RANDOM_SHAPES[shape], rope_theta=1e6, max_seq_len=4096)
    return write_random_checkpoint(directory, args, tokenizer)


def export_lite_model(model: Path, weights: str, quantize_head: bool, out: Path) -> Path:
    """A lite model directory of `model` with `weights` (fp32, int8, int4, nf4) for a lite row (our decode rows'
    rounding: integer blocks where the native kernels are built for AVX2)."""
    import torch

    from codellama_rt.api import load_model
    from codellama_rt.kernels import cpu_native
    from codellama_rt.kernels.options import KernelOptions
    from codellama_rt.lite.export import export_lite

    quantize = None if weights == "fp32" else weights
    m = load_model(model, device="cpu", dtype=torch.float32, quantize=quantize, progress=False,
                   quantize_head=quantize is not None and quantize_head)
    export_lite(m, out, integer_activations=cpu_native.integer_activations(KernelOptions()))
    return out


def mean_agreement(a: list, b: list) -> float:
    """`agreement` of each pair of continuations (a[i] with b[i]), averaged."""
    if len(a) != len(b) or not a:
        raise ValueError(f"mean_agreement needs as many continuations on each side (got {len(a)} and {len(b)})")
    return statistics.fmean(agreement(x, y) for x, y in zip(a, b))


def main(argv=None) -> dict:
    a = parse(argv)
    scratch = tempfile.TemporaryDirectory()
    try:
        return _measure(a, scratch.name)
    finally:
        scratch.cleanup()


def _measure(a: argparse.Namespace, scratch: str) -> dict:
    import codellama_rt as cl
    from codellama_rt.api import default_model_path
    from codellama_rt.bench.common import emit_json, environment
    from codellama_rt.bench.prompts import CODE_PROMPTS

    if a.random:
        model = random_checkpoint(a.random, a.tokenizer, Path(scratch) / a.random)
    else:
        model = a.model or default_model_path()
    tok = cl.Tokenizer.from_pretrained(model)
    prompt = CODE_PROMPTS[0]  # the timed one
    ids = tok.encode(prompt)
    long_ids = (tok.encode(prompt * 64))[:a.prefill_tokens]
    base = dict(model=str(model), ids=ids, long_ids=long_ids, new_tokens=a.new_tokens, threads=a.threads,
                n_ctx=max(1024, len(long_ids) + a.new_tokens + 16), agree_tokens=AGREEMENT_TOKENS,
                agree_prompts=[tok.encode(p) for p in CODE_PROMPTS])
    jobs = []  # (runtime, weights, python, code, args)
    lite_dirs = Path(scratch) / "lite"
    for name in a.ours.split(","):
        if name.startswith("lite-"):
            weights = name.removeprefix("lite-")
            out = export_lite_model(model, weights, not a.dense_head, lite_dirs / weights)
            jobs.append(("codellama-rt lite", weights, sys.executable, LITE, dict(base, lite=str(out))))
            continue
        quantize, _, act = name.partition("-")  # int4 | int4-bf16 | nf4 | int4-fp32x ... ; fp32 and bf16: dense
        dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(name) or ("bfloat16" if act == "bf16" else "float32")
        quantize = None if name in ("fp32", "bf16") else quantize
        args = dict(base, dtype=dtype, quantize=quantize, quantize_head=bool(quantize) and not a.dense_head,
                    kernel_options={"cpu_integer_activations": act != "fp32x"})
        jobs.append(("codellama-rt", name, sys.executable, OURS, args))
    with tempfile.TemporaryDirectory() as tmp:
        if a.llama_python:
            f32 = convert(model, a.llama_src, "f32", Path(tmp) / "f32.gguf")
            ggufs = {"f32": f32, "f16": convert(model, a.llama_src, "f16", Path(tmp) / "f16.gguf")}
            for q in ("q8_0", "q4_0"):
                out = Path(tmp) / f"{q}.gguf"
                child(a.llama_python, LLAMA, dict(gguf=str(f32), out=str(out), quantize_to=q))
                ggufs[q] = out
            jobs += [("llama.cpp", name, a.llama_python, LLAMA, dict(base, gguf=str(path)))
                     for name, path in ggufs.items()]
        runs = [[] for _ in jobs]
        for i in range(a.repeat):  # rounds over every row, so a slow spell of this shared machine hits all rows
            for job, got in zip(jobs, runs):
                python, code, args = job[2:]
                got.append(child(python, code, args if i == 0 else dict(args, agree_prompts=[])))
    rows = [dict(runtime=job[0], weights=job[1], **summarize(got)) for job, got in zip(jobs, runs)]
    fp32 = next((r for r in rows if r["weights"] == "fp32" and r["runtime"] != "llama.cpp"), None)
    f32 = next((r for r in rows if r["weights"] == "f32" and r["runtime"] == "llama.cpp"), None)
    for r in rows:  # (issue 21's bar is over a 64-token continuation: both)
        ref = fp32["ids"] if fp32 else None
        r["agreement_with_our_fp32"] = agreement(r["ids"], ref) if ref else None
        r["agreement_64_with_our_fp32"] = agreement(r["ids"][:64], ref[:64]) if ref else None
        own = f32 if r["runtime"] == "llama.cpp" else fp32  # each runtime's quantized rows against its own full width
        r["mean_agreement_64_with_own_fp32"] = mean_agreement(r["agree_ids"], own["agree_ids"]) if own else None
    name = f"random {a.random}" if a.random else str(model)
    doc = {"meta": {**environment(), "model": name, "threads": a.threads, "new_tokens": a.new_tokens,
                    "repeat": a.repeat,
                    "prefill_tokens": len(long_ids)}, "rows": rows}
    if a.out:
        emit_json(doc, a.out)
    print("| runtime | weights | decode tok/s | prefill tok/s | peak RSS MB | greedy agreement with our fp32 (all "
          f"/ first 64) | mean over {len(CODE_PROMPTS)} prompts, {AGREEMENT_TOKENS} ids, with its own fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        agree, agree64 = r["agreement_with_our_fp32"], r["agreement_64_with_our_fp32"]  # None: no fp32 row of ours
        mean = r["mean_agreement_64_with_own_fp32"]
        print(f"| {r['runtime']} | {r['weights']} | {r['decode_tok_s']:.0f} | {r['prefill_tok_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {'-' if agree is None else f'{agree:.2f} / {agree64:.2f}'} | "
              f"{'-' if mean is None else f'{mean:.2f}'} |")
    return doc


if __name__ == "__main__":
    main()
