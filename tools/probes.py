"""The teacher-forced infill probe: whether a model uses the suffix of a one-line hole. The training log
scores it at every evaluation (tools/train_default_model.py) and the evaluation scores its holes with it
(tools/eval_default_model.py).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from codellama_rt import Tokenizer
from corpus import chunks, read_source


def probe_case(tok: Tokenizer, prefix: str, middle: str, suffix: str):
    """One hole for `infill_probe`: (PSM prompt ids, middle ids, BOS+prefix ids, BOS+prefix+middle ids,
    middle chars, SPM prompt ids), or None when the prefix's own tokens change once the middle follows it
    (the plain score would then not be the middle's)."""
    plain_pre, plain = tok.encode(prefix, add_bos=True), tok.encode(prefix + middle, add_bos=True)
    if plain[:len(plain_pre)] != plain_pre:
        return None
    return (tok.encode_infill(prefix, suffix), tok.encode_nospace(middle), plain_pre, plain, len(middle),
            tok.encode_infill(prefix, suffix, suffix_first=True))


def infill_probe_cases(files: list[Path], tok: Tokenizer, max_chars: int, max_len: int, n: int = 24,
                       seed: int = 0):
    """Up to n one-line holes (`probe_case`s) in chunks of `files`, each at most max_len tokens long."""
    rng = random.Random(seed)
    parts = [c for f in files for c in chunks(read_source(f), max_chars)]
    cases = []
    for _ in range(100 * n):
        if len(cases) == n:
            break
        lines = rng.choice(parts).splitlines(keepends=True)
        i = rng.randrange(1, len(lines)) if len(lines) > 2 else 0
        prefix, middle, suffix = "".join(lines[:i]), lines[i] if lines else "", "".join(lines[i + 1:])
        case = probe_case(tok, prefix, middle, suffix) if len(middle.strip()) >= 3 else None
        if case is None or max(len(case[0]) + len(case[1]) + 1, len(case[3])) > max_len:
            continue
        cases.append(case)
    return cases


@torch.no_grad()
def infill_probe(logits_of, cases, eot_id: int) -> dict | None:
    """Whether the model uses the suffix: nats per character of the held-out middles after a PSM prompt
    vs after their prefix alone (plain causal), and the mean nats of `<EOT>` right after the middle;
    the same two for SPM prompts. logits_of: ids (list of T ints) -> [T, vocab] logits. None without
    cases (a context too short for any)."""
    if not cases:
        return None

    def nll(ids: list[int], start: int) -> torch.Tensor:
        logits = logits_of(ids[:-1])[start - 1:].float()
        return F.cross_entropy(logits, torch.tensor(ids[start:]), reduction="none")
    psm = causal = eot = spm = spm_eot = chars = 0.0
    for prompt, middle, plain_pre, plain, n_chars, spm_prompt in cases:
        scored = nll(prompt + middle + [eot_id], len(prompt))
        psm += scored[:-1].sum().item()
        eot += scored[-1].item()
        scored = nll(spm_prompt + middle + [eot_id], len(spm_prompt))
        spm += scored[:-1].sum().item()
        spm_eot += scored[-1].item()
        causal += nll(plain, len(plain_pre)).sum().item()
        chars += n_chars
    return {"psm_nats_per_char": psm / chars, "prefix_only_nats_per_char": causal / chars,
            "eot_nats": eot / len(cases), "spm_nats_per_char": spm / chars, "spm_eot_nats": spm_eot / len(cases)}
