"""The copy/edit objective of the default model's training mix and its probe (issue 22: prompt-lookup decoding
pays off when the output re-emits the prompt, and the model did not learn to): a file up to the end of one of
its functions, a one-line request, and the function written again with an edit.

- `edit_case`: one such example from a function of a file (`corpus.HeldOutFunction`): the file's text up to
  the function's end (its last `max_chars` characters, from a line start), three newlines, the request as a
  comment, the edited function's first line; the target is the rest of the edited function. Edits: "rename"
  (the function's name, in its `def` line only), "param" (one parameter, throughout the function), "same"
  (none).
- Training (`training_texts`) draws the kind and one of several request wordings per example
  (TRAIN_REQUESTS; a rename sometimes with no request at all, as a file repeating a function).
- `repeat_examples`: a run of random tokens written twice, the pure copying task.
- The probe (`copy_probe`) asks for held-out functions renamed with PROBE_REQUEST (bench/speculative.py's
  edit workload's wording) and with UNSEEN_REQUEST (a wording the training mix never has) and measures the
  share of each function's tokens the greedy continuation re-emits before its first difference.
"""
from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass

from corpus import HeldOutFunction

SUFFIXES = ("_v2", "_new", "2", "_copy", "_impl", "_fast", "_old", "_alt", "_b", "_ex")
TRAIN_REQUESTS = {
    "rename": ("# {name}, renamed to {new}:\n", "# {new}: {name} under another name\n",
               "# Copy of {name} as {new}\n", "# {name} again, as {new}:\n", ""),
    "param": ("# {name} with {old} renamed to {new}:\n", "# {name} again, {old} now called {new}\n"),
    "same": ("# {name} again:\n", "# A copy of {name}:\n"),
}
KIND_WEIGHTS = {"rename": 0.5, "param": 0.25, "same": 0.25}
PROBE_REQUEST = "# {name}, renamed to {new}:\n"       # bench/speculative.py's edit prompts
UNSEEN_REQUEST = "# {name} once more, now called {new}:\n"  # in no training example


@dataclass(frozen=True)
class EditCase:
    prompt: str   # the file up to the function's end, the request, the edited function's first line
    target: str   # the rest of the edited function


def _function_name(src: str) -> tuple[str, list[str]]:
    """The function's name and its parameters other than self / cls."""
    node = ast.parse(src).body[0]
    args = node.args
    params = [p.arg for p in args.posonlyargs + args.args + args.kwonlyargs if p.arg not in ("self", "cls")]
    return node.name, params


def edit_case(fn: HeldOutFunction, rng: random.Random, kind: str, request: str, max_chars: int,
              suffix: str | None = None) -> EditCase | None:
    """The `kind` edit of `fn` asked for with `request` (str.format fields name, new, old), or None when the
    function has no parameter to rename. suffix: the new name's suffix (default: drawn from SUFFIXES)."""
    name, params = _function_name(fn.src)
    old = name
    if kind == "rename":
        new = name + (suffix or rng.choice(SUFFIXES))
        edited = re.sub(rf"\b{re.escape(name)}\b", new, fn.src, count=1)
    elif kind == "param":
        if not params:
            return None
        old = rng.choice(params)
        new = old + (suffix or rng.choice(SUFFIXES))
        edited = re.sub(rf"\b{re.escape(old)}\b", new, fn.src)
    elif kind == "same":
        new, edited = name, fn.src
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    end = fn.first_line + fn.src.count("\n")
    context = "".join(fn.file_lines[:end])
    if len(context) > max_chars:
        context = context[-max_chars:]
        context = context[context.find("\n") + 1:]
    first, rest = edited.split("\n", 1)
    prompt = context.rstrip("\n") + "\n\n\n" + request.format(name=name, new=new, old=old) + first + "\n"
    return EditCase(prompt=prompt, target=rest)


def training_texts(functions: list[HeldOutFunction], n: int, rng: random.Random, max_chars: int) -> list[str]:
    """n copy/edit examples (prompt + target) of functions drawn from `functions`."""
    out = []
    kinds, weights = zip(*KIND_WEIGHTS.items())
    while len(out) < n and functions:
        kind = rng.choices(kinds, weights)[0]
        case = edit_case(rng.choice(functions), rng, kind, rng.choice(TRAIN_REQUESTS[kind]), max_chars)
        if case is not None:
            out.append(case.prompt + case.target)
    return out


def repeat_examples(n: int, rng: random.Random, vocab_size: int, skip: set, lengths=(32, 256)) -> list[list[int]]:
    """n synthetic induction examples: BOS (1), a run of random token ids (none in `skip`, the control ids),
    then the same run again; only copying predicts the second run (the task that grows induction heads)."""
    pool = [i for i in range(3, vocab_size) if i not in skip]
    out = []
    for _ in range(n):
        run = rng.choices(pool, k=rng.randint(*lengths))
        out.append([1] + run + run)
    return out


def copy_probe(continue_ids, tok, functions: list[HeldOutFunction], request: str, max_chars: int,
               max_tokens: int = 160) -> dict:
    """Mean share of each renamed function's tokens (at most `max_tokens`) that the greedy continuation of
    its edit prompt re-emits before the first difference, and the share re-emitted whole.
    continue_ids(ids, n): the n greedy tokens after the token ids `ids`."""
    shares, whole = [], 0
    for fn in functions:
        case = edit_case(fn, random.Random(0), "rename", request, max_chars, suffix="_v2")
        prompt = tok.encode(case.prompt, add_bos=True)
        full = tok.encode(case.prompt + case.target, add_bos=True)
        if full[:len(prompt)] != prompt:  # the boundary tokenises differently: not a fair case
            continue
        want = full[len(prompt):][:max_tokens]
        got = continue_ids(prompt, len(want))
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        shares.append(same / len(want))
        whole += same == len(want)
    return {"functions": len(shares), "request": request, "reemitted_share": sum(shares) / max(len(shares), 1),
            "whole_functions": whole}
