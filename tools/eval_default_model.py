#!/usr/bin/env python
"""Evaluate the embedded default model on held-out standard-library files and write its model card.

    python tools/eval_default_model.py [--model runtime/default_model]

Loads the shipped files through `codellama_rt.load` (reference backend, fp32 on the CPU) and measures:
- held-out loss (nats/token, bits/byte) against the unigram baseline of the training tokens;
- completion: greedy continuation of held-out function headers, cut where the function ends, and the
  share that `ast.parse` accepts;
- infilling: held-out functions with one line removed (PSM and SPM), the share whose exact line is
  recovered, and how every infill ended (<EOT> or the token limit); for scale, how often greedy
  continuation of the prefix alone gives the line, and the teacher-forced cost of the true line and of
  `<EOT>` after it in each order; then the same lines removed from their whole files (cut to fit the
  context), as an editor sends a hole;
- copying: held-out functions asked for again under a new name after their file (`copy_edit.copy_probe`), the
  share of each re-emitted before the first difference.
Writes evaluation.json and README.md (the model card, with training.json) next to the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import codellama_rt as cl
# the tools' shared modules, beside this script: running it puts its directory on sys.path
from corpus import (HeldOutFunction, corpus_split, function_end, header, held_out_functions, parses, plain_tokens,
                    read_source, rows)
from probes import infill_probe, probe_case

import copy_edit

# ---- held-out loss ----------------------------------------------------------------------------

def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> torch.Tensor:
    """fp64 [vocab_size] log-probabilities of the add-one-smoothed unigram distribution of the tokens."""
    counts = np.bincount(train_tokens, minlength=vocab_size) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


@torch.inference_mode()
def held_out_loss(model, train_files, held_files, chunk_chars: int) -> dict:
    """Mean next-token loss of the model and of the unigram (add-one) baseline on the same targets,
    per token and per byte of held-out source (bytes counted pro rata for the tokens scored)."""
    tok = model.tokenizer
    held = plain_tokens(held_files, tok, chunk_chars)
    data = rows(held, model.args.max_seq_len - 1)
    log_unigram = unigram_log_probs(plain_tokens(train_files, tok, chunk_chars), tok.vocab_size)
    nll, uni, n = 0.0, 0.0, 0
    for i in range(0, len(data), 4):
        batch = data[i:i + 4]
        logits = model.logits(batch[:, :-1])
        targets = batch[:, 1:]
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()
        uni -= log_unigram[targets].sum().item()
        n += targets.numel()
    scored_bytes = sum(len(read_source(f).encode()) for f in held_files) * n / len(held)
    return {"tokens": n, "model_nats_per_token": nll / n, "unigram_nats_per_token": uni / n,
            "model_bits_per_byte": nll / math.log(2) / scored_bytes,
            "unigram_bits_per_byte": uni / math.log(2) / scored_bytes}


def completion_eval(model, funcs: list[HeldOutFunction], n: int, max_new_tokens: int) -> dict:
    picked = [f.src for f in random.Random(0).sample(funcs, min(n, len(funcs)))]
    ok, examples, reasons = 0, [], Counter()
    for src in picked:
        prompt = header(src)
        c = model.generate(prompt, max_new_tokens=max_new_tokens)
        program = function_end(prompt + c.text, prompt.count("\n"), c.finish_reason == "length")
        valid = parses(program)
        ok += valid
        reasons[c.finish_reason, valid] += 1
        examples.append({"prompt": prompt, "completion": program[len(prompt):], "parses": valid})
    return {"functions": len(picked), "parse_ok": ok, "share": ok / len(picked), "max_new_tokens": max_new_tokens,
            "finish_reasons": {r: {"ended": reasons[r, True] + reasons[r, False], "parse_ok": reasons[r, True]}
                               for r in sorted({r for r, _ in reasons})}, "examples": examples[:5]}


def infill_eval(model, funcs: list[HeldOutFunction], n: int, max_new_tokens: int) -> dict:
    picked = random.Random(1).sample(funcs, min(n, len(funcs)))
    holes = [function_hole(f.src, k) for k, f in enumerate(picked)]
    result = _infill_runs(model, holes, max_new_tokens, examples=5)
    # The same holes in their files, as an editor sends them: the file around the line, cut to fit.
    budget = model.args.max_seq_len - max_new_tokens
    result["in_file"] = _infill_runs(model, [in_file_hole(f, k, model.tokenizer, budget)
                                             for k, f in enumerate(picked)], max_new_tokens, examples=0)
    result["in_file"]["context_tokens"] = budget
    cases = [probe_case(model.tokenizer, *hole) for hole in holes]
    # teacher-forced: the removed line's cost per order and of <EOT> after it (as the training probe)
    result["scores"] = dict(infill_probe(lambda ids: model.logits(ids)[0], [c for c in cases if c],
                                         model.tokenizer.eot_id), holes=sum(c is not None for c in cases))
    result["max_new_tokens"] = max_new_tokens
    return result


def copy_eval(model, funcs: list[HeldOutFunction], n: int, max_chars: int) -> dict:
    """Held-out functions asked for again under a new name after their file (`copy_edit.copy_probe`), in the
    edit benchmark's wording and in one the training mix never has."""
    picked = random.Random(2).sample(funcs, min(n, len(funcs)))

    def continue_ids(ids: list[int], k: int) -> list[int]:
        return model.generate([ids], max_new_tokens=k)[0].token_ids

    return {name: copy_edit.copy_probe(continue_ids, model.tokenizer, picked, request, max_chars)
            for name, request in (("benchmark_request", copy_edit.PROBE_REQUEST),
                                  ("unseen_request", copy_edit.UNSEEN_REQUEST))}


def _infill_runs(model, holes: list[tuple[str, str, str]], max_new_tokens: int, examples: int) -> dict:
    """Greedy PSM and SPM infills of (prefix, line, suffix) holes: exact lines, first lines right, how each
    ended; and, for scale, how often greedy continuation of the prefix alone gives the line."""
    result = {}
    for order in ("psm", "spm"):
        exact, first, reasons, shown = 0, 0, Counter(), []
        for prefix, line, suffix in holes:
            c = model.infill(prefix, suffix, suffix_first=order == "spm", max_new_tokens=max_new_tokens)
            hit = c.text.rstrip("\n") == line.rstrip("\n")
            exact += hit
            # the removed line comes first (alone, or followed by more)
            first += c.text.split("\n")[0] == line.rstrip("\n")
            reasons[c.finish_reason] += 1
            if len(shown) < examples:
                shown.append({"line": line, "infill": c.text, "exact": hit, "finish_reason": c.finish_reason})
        result[order] = {"cases": len(holes), "exact_line": exact, "share": exact / len(holes),
                         "first_line_right": first, "finish_reasons": dict(reasons), "examples": shown}
    result["prefix_only_next_line"] = sum(
        model.generate(prefix, max_new_tokens=max_new_tokens).text.split("\n")[0] == line.rstrip("\n")
        for prefix, line, _ in holes)
    return result


def _hole_index(src: str, k: int) -> int:
    """The line removed in infill case k: a body line of >= 3 characters, picked with seed k."""
    lines = src.splitlines(keepends=True)
    first_body = len(header(src).splitlines())
    return random.Random(k).choice([i for i in range(first_body, len(lines)) if len(lines[i].strip()) >= 3])


def function_hole(src: str, k: int) -> tuple[str, str, str]:
    """(prefix, removed line, suffix) of infill case k in the function alone (dedented)."""
    lines = src.splitlines(keepends=True)
    i = _hole_index(src, k)
    return "".join(lines[:i]), lines[i], "".join(lines[i + 1:])


def in_file_hole(f: HeldOutFunction, k: int, tok, budget: int, prefix_share: float = 0.7) -> tuple[str, str, str]:
    """The same line as `function_hole(f.src, k)` removed from f's file: (prefix, line, suffix) with the
    prefix cut at a line start and the suffix at a line end so the infill prompt is at most `budget` tokens
    (the prefix takes up to `prefix_share` of it, the suffix what the prefix leaves)."""
    at = f.first_line + _hole_index(f.src, k)
    lines = f.file_lines
    cost = [len(tok.encode(line, add_bos=False)) for line in lines]
    room = budget - 8  # BOS, PRE, SUF, MID and SentencePiece's seams between lines
    while True:
        start, used = at, 0
        while start > 0 and used + cost[start - 1] <= room * prefix_share:
            start -= 1
            used += cost[start]
        end = at + 1
        while end < len(lines) and used + cost[end] <= room:
            used += cost[end]
            end += 1
        prefix, suffix = "".join(lines[start:at]), "".join(lines[at + 1:end])
        if len(tok.encode_infill(prefix, suffix)) <= budget and len(tok.encode_infill(prefix, suffix,
                                                                                      suffix_first=True)) <= budget:
            return prefix, lines[at], suffix
        room -= 16


# ---- model card -------------------------------------------------------------------------------

def phases(training: dict) -> list[dict]:
    """The training records in order: a run that continued another (`--init-from`) carries it."""
    earlier = phases(training["continues"]) if "continues" in training else []
    return earlier + [training]


def _probe_cells(p: dict | None) -> str:
    """The PSM and SPM probe cells of a log row ('-' where a phase's probe did not score them)."""
    psm = f"{p['psm_nats_per_char']:.3f} / {p['prefix_only_nats_per_char']:.3f} / {p['eot_nats']:.2f}" if p else "-"
    spm = f"{p['spm_nats_per_char']:.3f} / {p['spm_eot_nats']:.2f}" if p and "spm_eot_nats" in p else "-"
    return f"{psm} | {spm} |"


LOG_HEADER = ("| step | minutes | train loss | held-out loss (48-row sample) | infill probe, PSM: middle nats/char "
              "with suffix / prefix only / `<EOT>` nats | SPM: middle nats/char / `<EOT>` nats |")


def phase_text(k: int, r: dict) -> str:
    o, opt = r["objective"], r["optimizer"]
    log = "\n".join(f"| {e['step']} | {e['minutes']:.1f} | {e['train_loss']:.3f} | {e['held_out_loss']:.3f} | "
                    + _probe_cells(e.get("infill_probe")) for e in r["log"])
    packing = ("rows start at an example: whole examples, then the head of the next one (its tail dropped)"
               if o.get("packing") else "examples concatenated and cut into rows (a row may start inside one)")
    return f"""### Phase {k}

    {r['command']}

- Objective: with probability {o['fim_rate']} a chunk is split into prefix/middle/suffix ({o['split']}) and
  written in SPM order with probability {o.get('spm_share', 0.5)}, else PSM; otherwise plain text after BOS.
  Chunks {'lose' if o.get('trim_chunks') else 'keep'} the blank lines they start with; {packing}.{_unlikelihood(r)}
- {r['steps']} AdamW steps of {opt['batch_rows']} x {opt['seq_len']} tokens ({r['tokens'] / 1e6:.1f}M tokens,
  {r['epochs_started']} passes over the data), lr {opt['adamw_lr']} with {opt['warmup']} warmup steps and cosine
  decay to 10%, weight decay {opt['weight_decay']}, fp32 weights with bf16 autocast, {r['threads']} CPU threads
  (torch {r['torch']}): {r['train_minutes']} minutes of steps, {r.get('wall_minutes', '?')} minutes wall clock in
  {r.get('sessions', 1)} session(s). Final training loss {r['final_train_loss']:.3f}; held-out loss (all
  held-out files, fp32 weights) {r['held_out_loss_fp32_train_model']:.3f}.

{LOG_HEADER}
|---|---|---|---|---|---|
{log}
"""


def _unlikelihood(r: dict) -> str:
    """The phase's unlikelihood term against repetition loops, if it had one, with its logged repeat share."""
    u = r["objective"].get("unlikelihood")
    if not u:
        return ""
    shares = ", ".join(f"{e['greedy_repeated_ngram_share']:.0%} at step {e['step']}" for e in r["log"])
    return f"""
- Against repetition loops: each step also greedily continues {u['continuations_per_step']} prompts of
  {u['prompt_tokens']} training-source tokens by {u['new_tokens']} tokens and adds {u['weight']} x the mean over
  generated tokens of -log(1 - p) for those inside a repeated {u['ngram']}-gram (sequence-level unlikelihood,
  Welleck et al. 2019), plus the next-token loss of those prompts' real continuations. Share of greedy
  tokens inside a repeated {u['ngram']}-gram (smoothed): {shares}."""


def _plain_next_line(inf: dict) -> str:
    """The prefix-only baseline and the teacher-forced scores, when the evaluation has them."""
    if "scores" not in inf:
        return ""
    sc = inf["scores"]
    return (f"; for scale, greedy continuation of the prefix alone (no suffix) gives the removed line in "
            f"{inf['prefix_only_next_line']}/{inf['psm']['cases']}. Teacher-forced, the removed lines cost "
            f"{sc['psm_nats_per_char']:.3f} (PSM) / {sc['spm_nats_per_char']:.3f} (SPM) / "
            f"{sc['prefix_only_nats_per_char']:.3f} (prefix alone) nats per character, and `<EOT>` right "
            f"after the true line {sc['eot_nats']:.2f} (PSM) / {sc['spm_eot_nats']:.2f} (SPM) nats")


def _stderr_points(share: float, n: int) -> str:
    """One binomial standard error of a share of n cases, in percentage points."""
    return f"{100 * math.sqrt(share * (1 - share) / n):.0f}"


def _in_file(inf: dict) -> str:
    """The same holes in their files, when the evaluation has them."""
    if "in_file" not in inf:
        return ""
    f = inf["in_file"]
    psm, spm = f["psm"], f["spm"]
    n = psm["cases"]
    return f"""
- The same {n} lines removed from their files, as an editor sends a hole: the file's lines around it, cut
  to fit a {f['context_tokens']}-token prompt (the prefix up to 70% of it): exact line **PSM {psm['exact_line']}/{n},
  SPM {spm['exact_line']}/{n}**; first line right PSM {psm['first_line_right']}, SPM
  {spm['first_line_right']}; the prefix alone continues with the line in {f['prefix_only_next_line']}/{n}.
  PSM infills {_endings(psm['finish_reasons'])}; SPM infills {_endings(spm['finish_reasons'])}."""


def _endings(reasons: dict) -> str:
    ok = set(reasons) <= {"eot", "length"}
    return ("ended at `<EOT>` or the token limit" if ok else "did NOT all end at `<EOT>` or the limit") + \
        f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})"


def _copying(copy: dict | None, training: dict) -> str:
    if not copy:
        return ""
    b, u = copy["benchmark_request"], copy["unseen_request"]
    trained = any("copy_edit" in r["objective"] for r in phases(training))
    unseen = (", a wording the copy/edit examples never use." if trained else
              ".\n  No training phase had a copy/edit objective (tools/copy_edit.py).")
    return f"""
- Copying: {b['functions']} held-out functions asked for again under a new name after their file (greedy):
  **{b['reemitted_share']:.0%}** of each re-emitted before the first difference on average, {b['whole_functions']}
  whole, with bench/speculative.py's request `{b['request'].strip()}`; **{u['reemitted_share']:.0%}**
  ({u['whole_functions']} whole) with `{u['request'].strip()}`{unseen}"""


def model_card(training: dict, ev: dict) -> str:
    m, lo = training["model"], ev["held_out"]
    comp, inf = ev["completion"], ev["infill"]
    c = training["corpus"]
    runs = phases(training)
    c0 = runs[0]["corpus"]
    comp_err = _stderr_points(comp["share"], comp["functions"])
    psm_end, spm_end = _endings(inf["psm"]["finish_reasons"]), _endings(inf["spm"]["finish_reasons"])
    with_tests = [k + 1 for k, r in enumerate(runs) if r["corpus"].get("with_test_suites")]
    tests_text = ""
    if with_tests:
        ct = runs[with_tests[0] - 1]["corpus"]
        tests_text = (f"\n  Phase(s) {', '.join(map(str, with_tests))} also train on the standard library's own test "
                      f"suites ({ct['with_test_suites']}): {ct['train_files'] - c0['train_files']} files "
                      f"({(ct['train_bytes'] - c0['train_bytes']) / 1e6:.1f} MB) more.")
    return f"""# The embedded default model

A {m['parameters'] / 1e6:.2f}M-parameter CodeLlama-architecture model (Llama-2 blocks: RMSNorm, GQA
{m['n_heads']} query / {m['n_kv_heads']} key-value heads of {m['head_dim']}, SwiGLU {m['ffn_dim']}, rotary
theta {m['rope_theta']:g}; dim {m['dim']}, {m['n_layers']} layers, context {m['max_seq_len']}) trained by this
project on Python's standard library, with CodeLlama's infilling objective, so `codellama_rt.load()` and
`codellama-rt generate` / `infill` work with no download. It writes stdlib-flavoured Python; it is a
test fixture and a demo, not a coding assistant.

Files: `config.json`, `model.safetensors` (bf16), `tokenizer.model` (SentencePiece BPE,
{training['tokenizer']['vocab_size']} pieces, byte fallback, `▁<PRE>`/`▁<SUF>`/`▁<MID>`/`▁<EOT>` control pieces),
`generation_config.json`, `training.json` (every setting and loss log of every phase), `evaluation.json`.

## How it was trained

- Corpus: `.py` files of the standard library of Python {training['python']} (the interpreter running the
  script), without {', '.join(c['excluded_dirs'])}; {c0['train_files']} files ({c0['train_bytes'] / 1e6:.1f} MB)
  for training, {c['held_out_files']} ({c['held_out_bytes'] / 1e6:.2f} MB) held out by `{c['held_out']}`.{tests_text}
- Examples: source cut into ~{training['objective']['chunk_chars']}-character runs of whole lines; infilling
  examples are built exactly as `Tokenizer.encode_infill` builds prompts, followed by the middle (no
  leading space) and `<EOT>`, and packed into rows without attention masking between them. The infill
  probe scores 24 one-line holes in held-out chunks: a middle cheaper with its suffix in view (PSM) than
  after its prefix alone means the model uses the suffix; the SPM columns score the same holes in SPM
  order ('-' for phases trained before the probe scored SPM).
- {len(runs)} phase(s), {sum(r['train_minutes'] for r in runs):.0f} minutes of training steps in all on a
  2-core CPU; the tokenizer is trained on the training files first (seconds).

{chr(10).join(phase_text(k + 1, r) for k, r in enumerate(runs))}
## How good it is (`python tools/eval_default_model.py`, shipped bf16 weights, fp32 compute)

- Held-out loss: **{lo['model_nats_per_token']:.3f} nats/token** ({lo['model_bits_per_byte']:.2f} bits/byte) on
  {lo['tokens']} tokens of the held-out files, against **{lo['unigram_nats_per_token']:.3f}** nats/token
  ({lo['unigram_bits_per_byte']:.2f} bits/byte) for the unigram distribution of the training tokens.
- Completion: greedy continuation ({comp['max_new_tokens']} new tokens at most) of {comp['functions']} held-out
  function headers, cut where the function ends: **{comp['parse_ok']}/{comp['functions']}
  ({comp['share']:.0%})** parse with `ast.parse` (± {comp_err} points, one standard error).
  How the generations ended: {', '.join(f"{k}: {v['ended']} ({v['parse_ok']} parse)"
                                        for k, v in comp.get('finish_reasons', {}).items())}.
- Infilling: {inf['psm']['cases']} held-out functions with one line removed (greedy, {inf['max_new_tokens']}
  new tokens at most); exact line recovered **PSM {inf['psm']['exact_line']}/{inf['psm']['cases']}
  ({inf['psm']['share']:.0%}), SPM {inf['spm']['exact_line']}/{inf['spm']['cases']} ({inf['spm']['share']:.0%})**.
  The first line of the infill is the removed line in PSM {inf['psm']['first_line_right']}, SPM
  {inf['spm']['first_line_right']} cases{_plain_next_line(inf)}. PSM infills {psm_end}; SPM infills
  {spm_end}.{_in_file(inf)}{_copying(ev.get("copy"), training)}

Evaluation took {ev['seconds'] / 60:.1f} minutes.
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(cl.default_model_path()))
    p.add_argument("--functions", type=int, default=150)
    p.add_argument("--infill", type=int, default=60)
    p.add_argument("--copies", type=int, default=60, help="held-out functions asked for again (copy probe)")
    a = p.parse_args(argv)
    t0 = time.time()
    training = json.loads((a.model / "training.json").read_text())
    model = cl.load(a.model, backend="reference", dtype=torch.float32, device="cpu")
    train_files, held_files = corpus_split()
    funcs = held_out_functions(held_files)
    ev = {"held_out": held_out_loss(model, train_files, held_files, training["objective"]["chunk_chars"])}
    print("held-out:", ev["held_out"], flush=True)
    ev["completion"] = completion_eval(model, funcs, a.functions, max_new_tokens=128)
    print("completion:", {k: v for k, v in ev["completion"].items() if k != "examples"}, flush=True)
    ev["infill"] = infill_eval(model, funcs, a.infill, max_new_tokens=48)
    print("infill:", {k: {kk: vv for kk, vv in v.items() if kk != "examples"} if isinstance(v, dict) else v
                      for k, v in ev["infill"].items()}, flush=True)
    ev["copy"] = copy_eval(model, funcs, a.copies, training["objective"]["chunk_chars"])
    print("copy:", ev["copy"], flush=True)
    ev["held_out_functions"] = len(funcs)
    ev["seconds"] = round(time.time() - t0, 1)
    (a.model / "evaluation.json").write_text(json.dumps(ev, indent=2) + "\n")
    (a.model / "README.md").write_text(model_card(training, ev))
    print(f"wrote {a.model / 'evaluation.json'} and {a.model / 'README.md'}")


if __name__ == "__main__":
    main()
