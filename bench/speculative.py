"""Speculative decoding (issue 22): plain greedy decoding against verify passes, in one run, on this machine.

    python bench/speculative.py [--model DIR] [--new-tokens 128] [--k 8] [--rounds 3] [--device cpu] [--out FILE]

Rows, each with tokens/s of the decode phase (first token to last; the prompt's prefill is the same in every
row and left out), the ratio to plain decoding of the same prompts, mean accepted proposals per verify pass,
and whether the tokens equal plain greedy decoding's (they must):
- oracle: a proposer that knows plain decoding's continuation (every proposal accepted): what the verify
  machinery itself yields at k proposals per pass, whatever the model;
- lookup on a code-editing workload: the prompt holds a file, then asks for one of its functions again with a
  name changed (the output re-emits text of the prompt);
- lookup on free completion: short code prompts whose continuation is not in the prompt (its cost);
- draft-int4: the free-completion prompts drafted by the model itself quantized to int4 (at load, or the
  checkpoint --draft-int4 names);
- draft-self (the oracle prompts drafted by the model itself: what drafting costs when every proposal is right),
  with its one-id steps eager, and draft-self-graphs with them as `DraftRun`s (the experiment "draft_graphs":
  one CUDA graph a proposal on a GPU; eager runs on a CPU).
Rows named "-fixed" propose num_speculative_tokens ids every pass (the adaptive length off): the machinery at k.
With --random (random weights at a preset's shapes, random token prompts) only the oracle and draft-self rows run.
With --lite DIR (a lite model, `codellama-rt export-lite`) the oracle, edit and free rows run through
codellama_rt.lite instead (greedy prompt lookup; tokens/s from the completion's decode time), torch not imported.
Medians of `--rounds` rounds; every row of a round runs back to back, so ratios compare like with like.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import queue
import statistics
import time
from pathlib import Path

EDIT_FILES = ["runtime/engine/slots.py", "runtime/engine/speculation.py", "runtime/tokenizer/detokenize.py",
              "runtime/engine/sampling.py", "runtime/bench/common.py"]
WINDOW = 1800  # characters of the file kept before the request (the default model's context is 1024 tokens)


def edit_prompts(root: Path) -> list[str]:
    """Each file of EDIT_FILES (present in `root`), then a request to write its first function again under a
    new name, and that function's first line renamed: the continuation repeats the function's body."""
    prompts = []
    for name in EDIT_FILES:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text()
        start = text.find("\ndef ")
        if start < 0:
            continue
        end = text.find("\n\n\n", start + 1)
        text = text[:end if end > 0 else None][-WINDOW:]  # the file up to its first function's end
        line = text[text.find("\ndef ") + 1:]
        line = line[:line.index("\n")]
        fn = line[4:line.index("(")]
        prompts.append(f"{text}\n\n\n# {fn}, renamed to {fn}_v2:\n{line.replace(fn, fn + '_v2', 1)}\n")
    return prompts


class Oracle:
    """Proposes the known continuation: `ids` (plain decoding's tokens) past what was sampled so far."""

    def __init__(self, ids: list[int]):
        self.ids, self.done = ids, 0

    def extend(self, ids) -> None:
        self.done += len(ids)

    def propose(self, n: int) -> list[int]:
        return self.ids[self.done:self.done + n]


def decode_rate(engine, ids: list[int], params, stops: dict):
    """(generated ids, tokens/s after the first token, the Completion) of one request driven on this thread."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(ids, params, stops, sink=events.put, background=False)
    first, count = None, 0
    while True:
        event = engine.next_event(events)
        if isinstance(event, BaseException):
            raise event
        now = time.perf_counter()
        if hasattr(event, "finish_reason"):
            rate = (count - first[1]) / (now - first[0]) if first and count > first[1] else 0.0
            return event.token_ids, rate, event
        if event.token_ids:
            count += len(event.token_ids)
            if first is None:
                first = (now, count)


@contextlib.contextmanager
def fixed_length(on: bool):
    """With `on`, every pass proposes num_speculative_tokens ids (the room allowing): no adaptive length."""
    from codellama_rt.engine.speculation import Speculation

    limit = Speculation.limit
    if on:
        Speculation.limit = lambda self, room, cost: max(0, min(self.k, room))
    try:
        yield
    finally:
        Speculation.limit = limit


ROWS = {  # name: (prompt set, proposer, fixed length)
    "oracle": ("oracle", "oracle", False), "oracle-fixed": ("oracle", "oracle", True),
    "edit": ("edit", "lookup", False), "free": ("free", "lookup", False),
    "draft-int4": ("free", "draft", False), "draft-int4-fixed": ("free", "draft", True),
    "draft-self": ("oracle", "draft", True), "draft-self-graphs": ("oracle", "draft", True),
}


def self_draft(model):
    """A DraftModel of `model` itself: its module (weights shared) with a KV cache of its own."""
    from codellama_rt.engine.draft import DraftModel

    e = model.engine
    return DraftModel(model.module, max_batch=e.max_batch, vocab_limit=e.vocab_limit)


def random_model(preset: str, device: str, new_tokens: int):
    """A Model with random weights at `preset`'s shapes (bf16 on CUDA) and four 128-id prompts."""
    from codellama_rt.api import random_model as build
    from codellama_rt.bench.measure import IdTokenizer, random_prompts
    from codellama_rt.model.config import ModelArgs

    args = ModelArgs.from_preset(preset)
    model = build(args, IdTokenizer(args.vocab_size), device=device, max_seq_len=128 + new_tokens + 32)
    return model, {"oracle": random_prompts(args.vocab_size, 4, 128, seed=0)}


def run_rows(model, prompts: dict, rows: list, new_tokens: int, k: int, drafts: dict) -> dict:
    """One round: per row name, [(plain tok/s, speculative tok/s, accepted per pass, passes, equal)] per prompt.
    `drafts`: the DraftModel of the draft-int4 rows ("int4") and of the draft-self rows ("self"), where run."""
    from codellama_rt.engine.sampling import SamplingParams

    engine, stops = model.engine, model.stop_tokens()
    plain = SamplingParams(max_new_tokens=new_tokens)
    lookup = engine.speculator.proposers["lookup"]
    out = {}
    for row in rows:
        prompt_set, proposer, fixed = ROWS[row]
        spec = SamplingParams(max_new_tokens=new_tokens, speculate="draft" if proposer == "draft" else "lookup",
                              num_speculative_tokens=k)
        if proposer == "draft":
            engine.speculator.draft = drafts["self" if row.startswith("draft-self") else "int4"]
            engine.speculator.draft.ensure(engine.cache.max_seq_len)  # (made before the engine's cache)
        draft = engine.speculator.draft
        if row.startswith("draft-self"):  # the draft's one-id steps eager or as runs (graphs on a GPU)
            draft.use_runs = row.endswith("-graphs")
            draft.graphed = draft.use_runs and draft.module.device.type == "cuda"
            draft._runs.clear()
        results = []
        for text in prompts[prompt_set]:
            ids = list(text) if isinstance(text, list) else model.tokenizer.encode(text)
            want, plain_rate, _ = decode_rate(engine, ids, plain, stops)
            if proposer == "oracle":
                engine.speculator.proposers["lookup"] = lambda request, want=want: Oracle(want)
            try:
                with fixed_length(fixed):
                    got, rate, done = decode_rate(engine, ids, spec, stops)
            finally:
                engine.speculator.proposers["lookup"] = lookup
            stats = done.speculation
            results.append((plain_rate, rate, stats.mean_accepted, stats.verifies, got == want))
        out[row] = results
    return out


def run_rows_lite(model, prompts: dict, rows: list, new_tokens: int, k: int) -> dict:
    """run_rows for a LiteModel (rows without a draft model)."""
    from codellama_rt.lite.model import LiteStream, _Sampling

    def rate(c) -> float:
        return (len(c.token_ids) - 1) / c.decode_seconds if len(c.token_ids) > 1 else 0.0

    out = {}
    for row in rows:
        prompt_set, proposer, fixed = ROWS[row]
        results = []
        for text in prompts[prompt_set]:
            ids = model.tokenizer.encode(text)
            plain = model.generate(ids, max_new_tokens=new_tokens)
            sampling = _Sampling(max_new_tokens=new_tokens, speculate="lookup", num_speculative_tokens=k)
            run = LiteStream(model, ids, "text", sampling,
                             proposer=Oracle(plain.token_ids) if proposer == "oracle" else None)
            with fixed_length(fixed):
                for _ in run:
                    pass
            done = run.completion
            results.append((rate(plain), rate(done), done.speculation.mean_accepted, done.speculation.verifies,
                            done.token_ids == plain.token_ids))
        out[row] = results
    return out


def summarize(rounds: list[dict]) -> list[dict]:
    rows = []
    for row in rounds[0]:
        per_round = [r[row] for r in rounds]
        plain = statistics.median(sum(p[0] for p in res) / len(res) for res in per_round)
        spec = statistics.median(sum(p[1] for p in res) / len(res) for res in per_round)
        ratio = statistics.median(sum(p[1] for p in res) / sum(p[0] for p in res) for res in per_round)
        accepted = [p[2] for p in per_round[0]]
        rows.append(dict(row=row, prompts=len(per_round[0]), plain_tok_s=plain, speculative_tok_s=spec,
                         ratio=ratio, mean_accepted_per_verify=sum(accepted) / len(accepted),
                         verifies=sum(p[3] for p in per_round[0]),
                         equal_to_plain=all(p[4] for res in per_round for p in res)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=8, help="num_speculative_tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--random", default=None, metavar="PRESET", help="random weights at a preset's shapes (e.g. "
                    "CodeLlama-7b; bf16 on CUDA) instead of --model: oracle rows only, random token prompts")
    ap.add_argument("--lite", type=Path, default=None, metavar="DIR",
                    help="a lite model directory: the oracle, edit and free rows through codellama_rt.lite")
    ap.add_argument("--draft-int4", type=Path, default=None, metavar="DIR",
                    help="the draft-int4 rows' draft: this int4 checkpoint (e.g. `quantize --method int4 --gptq`'s) "
                    "instead of the model quantized at load")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    if a.lite is not None:
        return main_lite(a)

    import torch
    import codellama_rt as cl

    from codellama_rt.bench.prompts import CODE_PROMPTS
    from codellama_rt.engine.sampling import SamplingParams

    rows = a.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; expected some of {', '.join(ROWS)}")
    if a.device == "cpu" and "draft-self-graphs" in rows:  # runs go through the module graph there, not the
        rows.remove("draft-self-graphs")                    # native step: nothing a CPU user would run
        print("draft-self-graphs: skipped on a CPU (a GPU path)")
    drafts = {}
    if a.random is not None:
        model, prompts = random_model(a.random, a.device, a.new_tokens)
        rows = [r for r in rows if r.startswith(("oracle", "draft-self"))]
    else:
        draft = None
        if any("draft-int4" in r for r in rows):
            draft = cl.load(a.draft_int4, device=a.device) if a.draft_int4 else \
                cl.load(a.model, device=a.device, quantize="int4")
        model = cl.load(a.model, device=a.device, draft=draft)
        drafts["int4"] = model.engine.speculator.draft
        edits = edit_prompts(Path(__file__).resolve().parent.parent)
        prompts = {"oracle": list(CODE_PROMPTS[:4]) + edits[:1], "edit": edits, "free": list(CODE_PROMPTS)}
    if any(r.startswith("draft-self") for r in rows):
        drafts["self"] = self_draft(model)
    decode_rate(model.engine, [1, 2, 3, 4], SamplingParams(max_new_tokens=8), {})  # warm-up
    rounds = [run_rows(model, prompts, rows, a.new_tokens, a.k, drafts) for _ in range(a.rounds)]
    rows = summarize(rounds)
    result = dict(device=a.device, model=a.random or str(a.model or "default"), threads=torch.get_num_threads(),
                  draft_int4=str(a.draft_int4) if a.draft_int4 else "quantized at load",
                  new_tokens=a.new_tokens, k=a.k, rounds=a.rounds, rows=rows)
    _print(rows)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))


def main_lite(a) -> None:
    import os

    from codellama_rt.bench.prompts import CODE_PROMPTS
    from codellama_rt.lite import LiteModel

    rows = [r for r in a.rows.split(",") if r in ("oracle", "oracle-fixed", "edit", "free")]
    model = LiteModel(a.lite)
    edits = edit_prompts(Path(__file__).resolve().parent.parent)
    prompts = {"oracle": list(CODE_PROMPTS[:4]) + edits[:1], "edit": edits, "free": list(CODE_PROMPTS)}
    model.generate([1, 2, 3, 4], max_new_tokens=8)  # warm-up
    rows = summarize([run_rows_lite(model, prompts, rows, a.new_tokens, a.k) for _ in range(a.rounds)])
    result = dict(device="cpu", model=f"lite {a.lite}", threads=model.threads or os.cpu_count(),
                  new_tokens=a.new_tokens, k=a.k, rounds=a.rounds, rows=rows)
    _print(rows)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))


def _print(rows: list) -> None:
    print(f"{'row':16} {'prompts':>7} {'plain tok/s':>12} {'spec tok/s':>11} {'ratio':>6} {'acc/verify':>10} "
          f"{'verifies':>8} {'equal':>6}")
    for r in rows:
        print(f"{r['row']:16} {r['prompts']:7d} {r['plain_tok_s']:12.0f} {r['speculative_tok_s']:11.0f} "
              f"{r['ratio']:6.2f} {r['mean_accepted_per_verify']:10.2f} {r['verifies']:8d} "
              f"{str(r['equal_to_plain']):>6}")


if __name__ == "__main__":
    main()
