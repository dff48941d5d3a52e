"""How often int8 / int4 / NF4 weights pick fp32's greedy tokens (issue 21's agreement bar), on the CPU.

    python bench/quant_agreement.py [--model DIR] [--new-tokens 64] [--held-out N [--per-file K]] [--out FILE]

Prompts: the bench's code prompts, and with --held-out N more: K runs of whole lines (up to 600 characters; K = 1
by default, fewer where a file has fewer) from each of N held-out files of the default model's corpus
(tools/corpus.py; seeded), code the default model never trained on. The free-running share swings with a few
near-ties, so each mean comes with its standard error over the prompts (`--held-out 36 --per-file 8`: ~290
prompts, about +-0.02). For each prompt: fp32's greedy continuation of `--new-tokens` tokens, then per
quantized row
- free-running: the row's own greedy continuation; the share of positions before its first difference
  from fp32's (one near-tie flips everything after it);
- teacher-forced: at each position of fp32's continuation, whether the row's argmax given fp32's prefix
  equals fp32's token (one full forward of prompt + continuation; no cascade);
- KL: in that forward, KL(fp32 || row) of the next-token distributions, mean over the continuation's positions.
Rows: int8, int4 (its default group size) and NF4, each rounded to nearest and by GPTQ (`codellama-rt quantize
--gptq`'s defaults: 128 windows of 512 tokens of the standard library), with the lm_head dense (what
`quantize=` loads), and the same with the lm_head quantized (what bench/cpu_peer.py compares with llama.cpp).
"""
from __future__ import annotations

import argparse
from pathlib import Path

ROWS = [(w + gptq, head) for head in (False, True) for w in ("int8", "int4", "nf4")
        for gptq in ("", "-gptq")]  # (weights, quantize_head)


def prefix_share(got: list, want: list) -> float:
    """Share of `want`'s positions before the first position where `got` differs."""
    from codellama_rt.bench.common import shared_prefix

    return shared_prefix(got, want) / len(want) if want else 1.0


def continuation_logits(model, prompt_ids: list, want: list):
    """fp32 [len(want), vocab]: model's logits predicting each of `want`'s tokens after prompt + want[:i]."""
    full = prompt_ids + want
    return model.logits(full)[0, len(prompt_ids) - 1:len(full) - 1]


def teacher_forced(model, prompt_ids: list, want: list) -> float:
    """Share of `want`'s positions where model's argmax after prompt + want[:i] is want[i]."""
    pred = continuation_logits(model, prompt_ids, want).argmax(-1).tolist()
    return sum(p == w for p, w in zip(pred, want)) / len(want)


def mean_kl(ref_logits, logits) -> float:
    """Mean over rows of KL(softmax(ref_logits) || softmax(logits)), both [positions, vocab]."""
    p, q = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def held_out_prompts(n: int, seed: int = 1, per_file: int = 1) -> list[str]:
    """per_file distinct runs of whole lines (<= 600 characters; fewer where a file has fewer) from each of n
    held-out files of the default model's corpus."""
    import random
    import sys

    corpus = sys.modules.get("corpus")  # (tests load it by path: tests/tool_modules.py)
    if corpus is None:
        tools = str(Path(__file__).resolve().parent.parent / "tools")
        sys.path.insert(0, tools)
        try:
            import corpus
        finally:
            sys.path.remove(tools)

    rng = random.Random(seed)
    held = corpus.corpus_split()[1]
    if n > len(held):
        raise ValueError(f"--held-out {n}: the corpus holds out {len(held)} files")
    if per_file < 1:
        raise ValueError(f"--per-file {per_file}: must be at least 1")
    out = []
    for f in rng.sample(held, n):
        runs = corpus.chunks(corpus.read_source(f), 600)
        out += [rng.choice(runs)] if per_file == 1 else rng.sample(runs, min(per_file, len(runs)))
    return out


def mean_and_error(values: list) -> tuple[float, float]:
    """(mean, standard error of the mean) of values (error 0 for fewer than two)."""
    import statistics

    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def measure(model_path, new_tokens: int, held_out: int = 0, per_file: int = 1) -> dict:
    import tempfile

    from codellama_rt.bench.prompts import CODE_PROMPTS

    prompts = list(CODE_PROMPTS) + (held_out_prompts(held_out, per_file=per_file) if held_out else [])
    with tempfile.TemporaryDirectory(prefix="quant-agreement-") as d:
        return _measure(model_path, new_tokens, prompts, Path(d))


def _measure(model_path, new_tokens: int, prompts: list, tmp: Path) -> dict:
    from codellama_rt.api import load_model

    def load(quantize=None, head=False):
        if quantize and quantize.endswith("-gptq"):  # written and loaded back, as `quantize --gptq` gives it
            from codellama_rt.api import default_model_path, int4_group_size
            from codellama_rt.checkpoint.writer import save_quantized
            from codellama_rt.quant.gptq import calibration_tokens, quantize_gptq

            method, out = quantize[:-len("-gptq")], tmp / f"{quantize}-{head}"
            m = load_model(model_path, device="cpu", dtype="float32")
            g = int4_group_size(m.args)
            quantize_gptq(m.module, calibration_tokens(m.tokenizer), method=method, group_size=g, quantize_head=head)
            save_quantized(m, out, method=method, group_size=g, quantize_head=head,
                           source_dir=m.path or default_model_path())
            return load_model(out, device="cpu", dtype="float32")
        return load_model(model_path, device="cpu", dtype="float32", quantize=quantize, quantize_head=head)

    ref = load()
    ids = [ref._ids(p) for p in prompts]
    want = [c.token_ids for c in ref.generate(ids, max_new_tokens=new_tokens)]
    ref_logits = [continuation_logits(ref, i, w) for i, w in zip(ids, want)]
    rows = []
    for quantize, head in ROWS:
        m = load(quantize, head)
        got = [c.token_ids for c in m.generate(ids, max_new_tokens=new_tokens)]
        free = [prefix_share(g, w) for g, w in zip(got, want)]
        forced = [teacher_forced(m, i, w) for i, w in zip(ids, want)]
        kl = [mean_kl(r, continuation_logits(m, i, w)) for r, i, w in zip(ref_logits, ids, want)]
        free_mean, free_error = mean_and_error(free)
        rows.append(dict(weights=quantize, quantized_head=head, free_running=free_mean, free_running_error=free_error,
                         teacher_forced=sum(forced) / len(forced), kl=sum(kl) / len(kl),
                         free_running_per_prompt=free,
                         teacher_forced_per_prompt=forced))
    return {"prompts": len(prompts), "new_tokens": new_tokens, "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="HF-layout directory (default: the embedded model)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--held-out", type=int, default=0, metavar="N",
                   help="more prompts from N held-out files of the default model's corpus")
    p.add_argument("--per-file", type=int, default=1, metavar="K", help="prompts from each held-out file")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    from codellama_rt.bench.common import emit_json, environment

    doc = {"meta": {**environment(), "model": str(a.model or "default"), "held_out": a.held_out,
                    "per_file": a.per_file},
           **measure(a.model, a.new_tokens, a.held_out, a.per_file)}
    if a.out:
        emit_json(doc, a.out)
    print(f"| weights | lm_head | free-running greedy agreement | teacher-forced agreement | KL from fp32 |  "
          f"({doc['prompts']} prompts x {a.new_tokens} tokens)")
    print("|---|---|---|---|---|")
    for r in doc["rows"]:
        print(f"| {r['weights']} | {'quantized' if r['quantized_head'] else 'dense'} | {r['free_running']:.3f} "
              f"+-{r['free_running_error']:.3f} | "
              f"{r['teacher_forced']:.3f} | {r['kl']:.5f} |")
    return doc


if __name__ == "__main__":
    main()
