#!/usr/bin/env python
"""Train the embedded default model: a small CodeLlama-architecture model on Python's standard library.

    python tools/train_default_model.py --work .train --out runtime/default_model --max-minutes 80
    (run it again with the same arguments to resume from the last checkpoint in --work)

Corpus: the `.py` files of the running interpreter's standard library (no site-packages, tests,
generated codec tables or pydoc topics), split by a hash of each file's relative path into a training
set and a held-out set (`corpus_split`); `--with-tests` adds the standard library's test suites to the
training set (`test_suite_files`). Tokenizer: SentencePiece BPE trained on the training files
(byte fallback, BOS 1 / EOS 2, CodeLlama's `▁<PRE>`/`▁<SUF>`/`▁<MID>`/`▁<EOT>` as control pieces).
Objective: CodeLlama's — each chunk of source is, with probability `--fim-rate`, split into
prefix/middle/suffix and written as PSM or SPM exactly as `Tokenizer.encode_infill` builds prompts
(followed by the middle and `<EOT>`), else kept as plain causal text. Examples are packed into
rows that each start at an example (`pack_rows`). The model is the runtime's own
`Transformer` (reference backend with PyTorch's fused causal attention for speed), trained in fp32 with
bf16 autocast, and exported in HF layout with bf16 weights. `--unlikelihood W` adds sequence-level
unlikelihood against repetition loops (`unlikelihood_loss`); `--copy-rate R` adds R copy/edit examples per
ordinary one (`copy_edit`: a function of the file asked for again with an edit); `--init-from` continues a
finished run or the shipped export with a fresh schedule.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import codellama_rt as cl
from codellama_rt.model.backends import BACKENDS
from codellama_rt.checkpoint.layouts import hf_plan
from codellama_rt.model.config import ModelArgs
from codellama_rt.model.kv_cache import KVCache
from codellama_rt.model.transformer import Decode, Prefill, Transformer
from codellama_rt.tiny import hf_config, train_tokenizer
from codellama_rt.tokenizer.tokenizer import Tokenizer

# the tools' shared modules, beside this script: running it puts its directory on sys.path
from corpus import (EXCLUDED_DIRS, HELD_OUT_PER_MILLE, TEST_DIRS, chunks, corpus_split, function_end, header,
                    held_out_functions, parses, plain_tokens, read_source, rows, test_suite_files)
from probes import infill_probe, infill_probe_cases

import copy_edit

# ---- the infilling objective ----------------------------------------------------------------------

def split_fim(text: str, rng: random.Random, line_share: float = 0.5) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of text: with probability `line_share` around a run of 1-3 whole lines
    (the editor's use), else at two random characters (CodeLlama's character-level split)."""
    if rng.random() < 1 - line_share:
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        return text[:i], text[i:j], text[j:]
    lines = text.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    j = min(len(lines), i + rng.choice((1, 1, 1, 2, 3)))
    return "".join(lines[:i]), "".join(lines[i:j]), "".join(lines[j:])


def encode_example(tok: Tokenizer, text: str, rng: random.Random, fim_rate: float, last: bool,
                   line_share: float = 0.5, spm_share: float = 0.5) -> list[int]:
    """Token ids of one training example: plain (BOS text [EOS at the file's end]) or PSM/SPM infilling."""
    if rng.random() >= fim_rate:
        return tok.encode(text, add_bos=True, add_eos=last)
    prefix, middle, suffix = split_fim(text, rng, line_share)
    spm_order = rng.random() < spm_share
    prompt = tok.encode_infill(prefix, suffix, suffix_first=spm_order)
    return prompt + tok.encode_nospace(middle) + [tok.eot_id]


def epoch_examples(files: list[Path], tok: Tokenizer, seed: int, fim_rate: float, max_chars: int,
                   line_share: float = 0.5, spm_share: float = 0.5, trim: bool = False, copy_rate: float = 0.0,
                   functions: list | None = None, repeat_rate: float = 0.0) -> list[list[int]]:
    """Token ids of every example of one epoch, shuffled with `seed`; with `copy_rate`, that many copy/edit
    examples per chunk example besides (`copy_edit.training_texts` of `functions`, plain causal text); with
    `repeat_rate`, that many random token runs written twice (`copy_edit.repeat_examples`)."""
    rng = random.Random(seed)
    examples = []
    for f in files:
        parts = chunks(read_source(f), max_chars, trim)
        examples += [(p, k == len(parts) - 1) for k, p in enumerate(parts)]
    rng.shuffle(examples)
    out = [encode_example(tok, text, rng, fim_rate, last, line_share, spm_share) for text, last in examples]
    if copy_rate:
        out += [tok.encode(t, add_bos=True) for t in
                copy_edit.training_texts(functions or [], int(copy_rate * len(out)), rng, max_chars)]
    if repeat_rate:
        control = {tok.sp.piece_to_id(p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")}
        out += copy_edit.repeat_examples(int(repeat_rate * len(out)), rng, tok.vocab_size, control)
    if copy_rate or repeat_rate:
        rng.shuffle(out)
    return out


def pack_rows(examples: list[list[int]], seq_len: int) -> torch.Tensor:
    """Rows of seq_len + 1 tokens that each start at an example's first token (BOS): whole examples while
    they fit, then the head of the next one (its tail is dropped). No row starts inside an example, so
    the `<PRE>`/`<SUF>` order that tells PSM from SPM is always in view: int64 [n_rows, seq_len + 1]."""
    width, out, row = seq_len + 1, [], []
    for ex in examples:
        row += ex[:width - len(row)]
        if len(row) == width:
            out.append(row)
            row = []
    return torch.tensor(out, dtype=torch.int64).view(len(out), width)


# ---- model ------------------------------------------------------------------------------------

def _causal_attention(q, k, v, start: int):
    assert start == 0
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


# The reference row of the backend table with PyTorch's fused causal attention (same math, less memory).
TRAIN_BACKEND = dataclasses.replace(BACKENDS["reference"], name="train", attention_prefill=_causal_attention)


def init_model(args: ModelArgs, seed: int) -> Transformer:
    """fp32 Transformer with GPT-2-style init: N(0, 0.02), residual projections scaled by 1/sqrt(2 L)."""
    torch.manual_seed(seed)
    model = Transformer(args, TRAIN_BACKEND, dtype=torch.float32, device="cpu", rope_len=args.max_seq_len)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            torch.nn.init.ones_(p)
        else:
            std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
        p.requires_grad_(True)
    return model


def forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of int64 [B, T] tokens, as in training (bf16 autocast): [B, T, vocab]."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(tokens, Prefill(0))


def loss_on(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of int64 [B, T + 1] rows."""
    logits = forward(model, batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def mean_loss(model: Transformer, data: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(data), batch_size):
        b = data[i:i + batch_size]
        total += loss_on(model, b).item() * len(b)
    return total / len(data)


# ---- unlikelihood against repetition loops -----------------------------------------------------
# Greedy decoding of a small model falls into loops (a docstring sentence or a statement repeated to the
# token limit). Sequence-level unlikelihood (Welleck et al. 2019, "Neural text generation with
# unlikelihood training") trains on the model's own greedy continuations: every generated token that
# lies in an n-gram already seen earlier in the sequence has its probability pushed down with
# -log(1 - p), while the ordinary next-token loss on real code keeps the language model.

def rollout_prompts(files: list[Path], tok: Tokenizer, rng: random.Random, n: int, length: int,
                    def_share: float = 0.5) -> torch.Tensor:
    """n prompts of BOS + `length` - 1 tokens of training source, each from a line start (a `def` line
    with probability `def_share`), dedented as the evaluation's headers are: int64 [n, length]."""
    out = []
    while len(out) < n:
        lines = read_source(rng.choice(files)).splitlines(keepends=True)
        defs = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(("def ", "async def "))]
        starts = defs if defs and rng.random() < def_share else [i for i, ln in enumerate(lines) if ln.strip()]
        if not starts:
            continue
        i = rng.choice(starts)
        indent = len(lines[i]) - len(lines[i].lstrip())
        text = "".join("\n" if not ln.strip() else ln[indent:] if ln[:indent].isspace() else ln
                       for ln in lines[i:i + 40])
        ids = tok.encode(text, add_bos=True)
        if len(ids) >= length:
            out.append(ids[:length])
    return torch.tensor(out, dtype=torch.int64)


@torch.no_grad()
def greedy_rollout(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of int64 [B, P] prompts by `new_tokens` tokens (fp32, KV cache, as the runtime's
    reference backend generates): int64 [B, P + new_tokens]."""
    B, P = prompts.shape
    cache = KVCache(model.args, B, P + new_tokens, torch.float32, "cpu")
    logits = model(prompts, Prefill(0), cache, last_index=torch.full((B,), P - 1))
    out = [prompts]
    for i in range(new_tokens):
        nxt = logits.argmax(-1)
        out.append(nxt[:, None])
        if i + 1 < new_tokens:
            logits = model(nxt[:, None], Decode(torch.full((B,), P + i), P + new_tokens), cache)[:, -1]
    return torch.cat(out, dim=1)


def repeated_ngrams(ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """bool [B, T] of int64 [B, T] ids: positions >= start inside an n-gram that occurs earlier in its row."""
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        seen = set()
        for i in range(len(row) - n + 1):
            gram = tuple(row[i:i + n])
            if gram in seen and i + n > start:
                mask[b, max(i, start):i + n] = True
            seen.add(gram)
    return mask


def unlikelihood_loss(model: Transformer, seqs: torch.Tensor, start: int, n: int) -> tuple[torch.Tensor, float]:
    """Sum over the generated tokens (positions >= start of int64 [B, T] seqs) that repeat an n-gram of
    -log(1 - p(token)), divided by the number of generated tokens; and the share of them marked."""
    mask = repeated_ngrams(seqs, start, n)[:, 1:]
    logits = forward(model, seqs[:, :-1]).float()
    p = logits.log_softmax(-1).gather(-1, seqs[:, 1:, None])[..., 0].exp()
    loss = -(torch.log1p(-p.clamp(max=1 - 1e-5)) * mask).sum() / (seqs[:, start:].numel())
    return loss, mask.sum().item() / seqs[:, start:].numel()


def completion_probe(continue_ids, tok: Tokenizer, headers: list[str], new_tokens: int = 96) -> float | None:
    """Share of function `headers` whose greedy continuation parses once cut where the function ends (as
    tools/eval_default_model.py measures completion): greedy loops show here and not in held-out loss.
    continue_ids(ids, n): the n greedy tokens after the list of token ids `ids`."""
    if not headers:
        return None
    ok = 0
    for h in headers:
        ids = tok.encode(h, add_bos=True)
        new = continue_ids(ids, new_tokens)
        hit_limit = tok.eos_id not in new
        new = new if hit_limit else new[:new.index(tok.eos_id)]
        ok += parses(function_end(tok.decode(ids + new), h.count("\n"), hit_limit))
    return ok / len(headers)


def init_weights(source: Path) -> dict:
    """fp32 weights to start a phase from: a --work directory's checkpoint.pt, or an HF-layout export."""
    if (source / "checkpoint.pt").is_file():
        return torch.load(source / "checkpoint.pt", weights_only=False)["model"]
    return cl.load(source, backend="reference", dtype=torch.float32, device="cpu").module.state_dict()


def lr_at(step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def optimizer(model: Transformer, a) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and n != "tok_embeddings"]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and n != "tok_embeddings")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- export -----------------------------------------------------------------------------------

def export_hf(model: Transformer, tokenizer_model: Path, out: Path, record: dict) -> None:
    """Write config.json, model.safetensors (bf16), tokenizer.model, generation_config.json, training.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    args = model.args
    params = dict(model.named_parameters())
    tensors = {}
    for name, parts in hf_plan(args).items():
        pieces = params[name].detach().split([p.shape[0] for p in parts], dim=0)
        for part, t in zip(parts, pieces):
            tensors[part.name] = t.to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(args)
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": args.bos_id, "eos_token_id": list(args.eos_ids), "max_length": args.max_seq_len},
        indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path(".train"), help="tokenizer, data and checkpoints")
    p.add_argument("--out", type=Path, default=Path("runtime/default_model"), help="HF-layout export")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (checkpointed) after this long")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--fim-rate", type=float, default=0.5)
    p.add_argument("--line-fim", type=float, default=0.5, help="share of infilling examples split around "
                   "whole lines (the rest at random characters)")
    p.add_argument("--spm-share", type=float, default=0.5, help="share of infilling examples in SPM order")
    p.add_argument("--trim-chunks", action="store_true", help="drop the blank lines a chunk starts with (else "
                   "nearly every SPM example's prefix, after <MID>, starts with a blank line)")
    p.add_argument("--init-from", type=Path, default=None, help="another --work directory whose finished "
                   "run this one continues, or an exported model (runtime/default_model): weights and tokenizer; "
                   "new optimizer and schedule")
    p.add_argument("--unlikelihood", type=float, default=0.0, help="weight of the sequence-level unlikelihood "
                   "loss on the model's own greedy continuations (0: off)")
    p.add_argument("--copy-rate", type=float, default=0.0, help="copy/edit examples per ordinary example (a file, "
                   "a request, one of its functions written again with an edit; tools/copy_edit.py)")
    p.add_argument("--repeat-rate", type=float, default=0.0, help="random token runs written twice per ordinary "
                   "example (the pure copying task; tools/copy_edit.py)")
    p.add_argument("--copy-probe", type=int, default=16, help="held-out functions the copy probe asks for again "
                   "at each evaluation (with --copy-rate)")
    p.add_argument("--ul-batch", type=int, default=8, help="greedy continuations per step")
    p.add_argument("--ul-prompt", type=int, default=24, help="prompt tokens of each continuation")
    p.add_argument("--ul-new", type=int, default=96, help="tokens generated per continuation")
    p.add_argument("--ul-ngram", type=int, default=8, help="a generated token inside a repeat of an n-gram "
                   "this long is penalised")
    p.add_argument("--probe-completions", type=int, default=24, help="held-out function headers completed "
                   "greedily at each evaluation; the share that parses is logged (0: off)")
    p.add_argument("--with-tests", action="store_true", help="also train on the standard library's test "
                   "suites (the files that parse; the held-out set is unchanged)")
    p.add_argument("--chunk-chars", type=int, default=1500, help="source is cut into examples this long")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--max-seq-len", type=int, default=1024, help="context written to config.json")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--benchmark", type=int, default=0, help="time this many steps and exit")
    p.add_argument("--max-files", type=int, default=0, help="use only the first N training files (and N/10 "
                   "held-out ones): smoke tests")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    train_files, held_files = corpus_split()
    if a.with_tests:
        train_files = train_files + test_suite_files()
    if a.max_files:
        train_files, held_files = train_files[:a.max_files], held_files[:max(1, a.max_files // 10)]
    tok_path = a.work / "tokenizer.model"
    if a.init_from and not tok_path.is_file():
        tok_path.write_bytes((a.init_from / "tokenizer.model").read_bytes())
    if not tok_path.is_file():
        t0 = time.time()
        made = train_tokenizer(a.work / "sp", vocab_size=a.vocab, corpus=train_files, max_sentences=0)
        made.rename(tok_path)
        print(f"tokenizer: {a.vocab} pieces in {time.time() - t0:.0f} s", flush=True)
    tok = Tokenizer.from_file(tok_path)
    args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, ffn_dim=a.ffn,
                     vocab_size=tok.vocab_size, rope_theta=1e6, max_seq_len=a.max_seq_len)
    model = init_model(args, a.seed)
    previous = None
    if a.init_from:  # a further phase: the finished run's weights, a fresh optimizer and schedule
        model.load_state_dict(init_weights(a.init_from))
        record_file = a.init_from / ("record.json" if (a.init_from / "record.json").is_file() else "training.json")
        previous = json.loads(record_file.read_text())
    opt = optimizer(model, a)
    n_params = sum(p.numel() for p in model.parameters())
    held = rows(plain_tokens(held_files, tok, a.chunk_chars), a.seq_len)
    held_eval = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[:48]]
    probe_cases = infill_probe_cases(held_files, tok, a.chunk_chars, a.max_seq_len)
    funcs = held_out_functions(held_files)  # the evaluation's held-out functions
    probe_headers = [header(f.src) for f in random.Random(0).sample(funcs, min(a.probe_completions, len(funcs)))]
    train_funcs = held_out_functions(train_files, min_lines=4) if a.copy_rate else []
    copy_funcs = (random.Random(1).sample(funcs, min(a.copy_probe, len(funcs))) if a.copy_rate or a.repeat_rate
                  else [])

    def greedy_ids(ids: list[int], n: int) -> list[int]:  # within the context
        n = min(n, args.max_seq_len - len(ids))
        return greedy_rollout(model, torch.tensor([ids]), n)[0, len(ids):].tolist() if n > 0 else []

    ckpt = a.work / "checkpoint.pt"
    state = {"step": 0, "epoch": 0, "row": 0, "seconds": 0.0, "wall_seconds": 0.0, "tokens": 0, "smooth": None,
             "sessions": 0, "log": []}
    if ckpt.is_file() and not a.benchmark:
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        # checkpoints older than the wall-clock field: their step time stands in for it
        state = {"wall_seconds": saved["state"]["seconds"], "smooth": None, "sessions": 1, **saved["state"]}
        print(f"resumed at step {state['step']} ({state['seconds'] / 60:.1f} min so far)", flush=True)

    state["sessions"] += 1
    wall_mark = time.time()

    def save():
        nonlocal wall_mark
        state["wall_seconds"] += time.time() - wall_mark
        wall_mark = time.time()
        state["smooth"], state["ul_smooth"] = smooth, ul_smooth
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "state": state}, tmp)
        tmp.replace(ckpt)

    data, data_epoch = None, None
    session_start = time.time()
    smooth, ul_smooth = state["smooth"], state.get("ul_smooth")
    while state["step"] < a.steps:
        if data_epoch != state["epoch"]:
            t0 = time.time()
            data = pack_rows(epoch_examples(train_files, tok, a.seed * 1000 + state["epoch"], a.fim_rate,
                                            a.chunk_chars, a.line_fim, a.spm_share, a.trim_chunks, a.copy_rate,
                                            train_funcs, a.repeat_rate), a.seq_len)
            data_epoch = state["epoch"]
            print(f"epoch {data_epoch}: {len(data)} rows of {a.seq_len + 1} tokens ({time.time() - t0:.0f} s)",
                  flush=True)
        if state["row"] + a.batch > len(data):
            state["epoch"], state["row"] = state["epoch"] + 1, 0
            continue
        batch = data[state["row"]:state["row"] + a.batch]
        state["row"] += a.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(state["step"], a)
        t0 = time.time()
        loss = loss_on(model, batch)
        total = loss
        if a.unlikelihood:
            real = rollout_prompts(train_files, tok, random.Random(a.seed * 100_003 + state["step"]),
                                   a.ul_batch, a.ul_prompt + a.ul_new)
            ul, repeats = unlikelihood_loss(model, greedy_rollout(model, real[:, :a.ul_prompt], a.ul_new),
                                            a.ul_prompt, a.ul_ngram)
            # the prompts' real continuations, learned as usual: the unlikelihood term alone is met more
            # cheaply by flattening the next-token distributions after short prompts than by ending loops
            anchor = loss_on(model, real)
            total = loss + anchor + a.unlikelihood * ul
            ul_smooth = [repeats, anchor.item()] if ul_smooth is None else \
                [0.95 * s + 0.05 * v for s, v in zip(ul_smooth, (repeats, anchor.item()))]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.time() - t0
        state["step"] += 1
        state["seconds"] += dt
        state["tokens"] += batch[:, 1:].numel()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if a.benchmark:
            print(f"step {state['step']}: loss {loss.item():.3f}, {dt:.2f} s, "
                  f"{batch[:, 1:].numel() / dt:.0f} tok/s ({n_params / 1e6:.2f}M params)", flush=True)
            if state["step"] >= a.benchmark:
                return
            continue
        if state["step"] % 10 == 0:
            print(f"step {state['step']}/{a.steps} loss {smooth:.3f} lr {lr_at(state['step'], a):.2e} "
                  f"{state['tokens'] / state['seconds']:.0f} tok/s {state['seconds'] / 60:.1f} min"
                  + (f"; greedy tokens in repeated {a.ul_ngram}-grams {ul_smooth[0]:.1%}, loss on the real "
                     f"continuations {ul_smooth[1]:.3f}" if a.unlikelihood else ""),
                  flush=True)
        if state["step"] % a.eval_every == 0 or state["step"] == a.steps:
            held_loss = mean_loss(model, held_eval, a.batch)
            probe = infill_probe(lambda ids: forward(model, torch.tensor([ids]))[0], probe_cases, tok.eot_id)
            parses = completion_probe(greedy_ids, tok, probe_headers)
            copies = copy_edit.copy_probe(greedy_ids, tok, copy_funcs, copy_edit.UNSEEN_REQUEST,
                                          a.chunk_chars) if copy_funcs else None
            state["log"].append({"step": state["step"], "train_loss": smooth, "held_out_loss": held_loss,
                                 "infill_probe": probe, "minutes": state["seconds"] / 60,
                                 **({"completion_parse_share": parses} if parses is not None else {}),
                                 **({"copy_probe": copies} if copies else {}),
                                 **({"greedy_repeated_ngram_share": ul_smooth[0],
                                     "rollout_prompts_real_continuation_loss": ul_smooth[1]}
                                    if a.unlikelihood else {})})
            parse_text = ("" if parses is None else
                          f"; greedy completions of {len(probe_headers)} held-out headers parse {parses:.0%}")
            if copies:
                parse_text += (f"; held-out functions asked for again re-emitted {copies['reemitted_share']:.0%} "
                               f"({copies['whole_functions']}/{copies['functions']} whole)")
            print(f"  held-out loss {held_loss:.3f}{parse_text}" + (probe and f"; middle nats/char with suffix "
                  f"{probe['psm_nats_per_char']:.3f} vs prefix only {probe['prefix_only_nats_per_char']:.3f}, "
                  f"<EOT> {probe['eot_nats']:.2f} nats; SPM {probe['spm_nats_per_char']:.3f}, "
                  f"<EOT> {probe['spm_eot_nats']:.2f} nats" or ""), flush=True)
        if state["step"] % a.save_every == 0:
            save()
        if a.max_minutes and time.time() - session_start > a.max_minutes * 60:
            save()
            print(f"time limit: stopped at step {state['step']}; run again to resume", flush=True)
            return
    save()
    held_loss = mean_loss(model, held, a.batch)
    record = {
        "command": "python tools/train_default_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.processor() or
        platform.machine(), "threads": torch.get_num_threads(),
        "corpus": {"root": "the interpreter's standard library (sysconfig stdlib)",
                   "excluded_dirs": sorted(EXCLUDED_DIRS),
                   "with_test_suites": a.with_tests and f"{', '.join(TEST_DIRS)}: the files that parse, "
                   "except those the held-out hash picks", "held_out": f"sha1(relative path) % 1000 < "
                   f"{HELD_OUT_PER_MILLE}", "train_files": len(train_files), "held_out_files": len(held_files),
                   "train_bytes": sum(f.stat().st_size for f in train_files),
                   "held_out_bytes": sum(f.stat().st_size for f in held_files)},
        "tokenizer": {"type": "SentencePiece BPE, byte fallback", "vocab_size": tok.vocab_size},
        "model": {**dataclasses.asdict(args), "parameters": n_params},
        "objective": {**({"unlikelihood": {
                          "weight": a.unlikelihood, "continuations_per_step": a.ul_batch,
                          "prompt_tokens": a.ul_prompt, "new_tokens": a.ul_new, "ngram": a.ul_ngram,
                          "what": "sequence-level unlikelihood (Welleck et al. 2019) on greedy continuations of "
                                  "training-source prompts: -log(1 - p) of each generated token inside a "
                                  "repeated n-gram, added to the next-token loss and to the next-token loss "
                                  "of the prompts' real continuations"}} if a.unlikelihood else {}),
                      **({"copy_edit": {
                          "rate": a.copy_rate, "kinds": copy_edit.KIND_WEIGHTS, "requests": copy_edit.TRAIN_REQUESTS,
                          "suffixes": copy_edit.SUFFIXES, "functions": len(train_funcs), "repeat_rate": a.repeat_rate,
                          "what": "copy/edit examples besides the ordinary ones: a training file up to the end of "
                                  "one of its functions (4-40 lines), a one-line request, the function written "
                                  "again renamed, with a parameter renamed, or unchanged (tools/copy_edit.py)"}}
                         if a.copy_rate or a.repeat_rate else {}),
                      "fim_rate": a.fim_rate, "spm_share": a.spm_share, "trim_chunks": a.trim_chunks,
                      "packing": "rows of whole examples, each row starting at an example",
                      "split": f"{a.line_fim:.0%} around 1-3 whole lines, the rest at random characters",
                      "chunk_chars": a.chunk_chars},
        "optimizer": {"adamw_lr": a.lr, "betas": [0.9, 0.95], "weight_decay": a.weight_decay,
                      "warmup": a.warmup, "schedule": "cosine to 10%", "grad_clip": 1.0,
                      "batch_rows": a.batch, "seq_len": a.seq_len, "precision": "fp32 weights, bf16 autocast"},
        "steps": state["step"], "epochs_started": state["epoch"] + 1, "tokens": state["tokens"],
        "train_minutes": round(state["seconds"] / 60, 1), "wall_minutes": round(state["wall_seconds"] / 60, 1),
        "sessions": state["sessions"],
        "final_train_loss": round(smooth, 4), "held_out_loss_fp32_train_model": round(held_loss, 4),
        "log": state["log"],
    }
    if previous:
        record["continues"] = previous
    (a.work / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    export_hf(model, tok_path, a.out, record)
    print(f"exported to {a.out}: held-out loss {held_loss:.3f}", flush=True)


if __name__ == "__main__":
    main()
