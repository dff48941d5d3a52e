"""`codellama-rt chat`: interactive Instruct chat on stdin/stdout."""
from __future__ import annotations

import sys

from .common import add_model_flags, add_sampling_flags, load, sampling, warn, write


def add_parser(sub, parents: list) -> None:
    c = sub.add_parser("chat", parents=parents, help="interactive Instruct chat on stdin/stdout")
    add_model_flags(c)
    add_sampling_flags(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(run=run)


def run(a) -> None:
    from ..engine.sampling import SamplingParams
    from ..tokenizer.tokenizer import CHAT_TAGS

    params = SamplingParams(**sampling(a))
    model = load(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    if model.tensor_parallel is not None:  # (each rank's command line is its own: a node's may differ)
        model.tensor_parallel.check_same("system prompt and sampling flags", (a.system, sampling(a)))
    if system:
        try:
            n = len(model.tokenizer.encode_chat([*system, {"role": "user", "content": "."}]))
        except ValueError as e:
            raise ValueError(f"--system: {e}") from None
        if n >= model.max_seq_len:  # (every message would be refused, one at a time)
            raise ValueError(f"--system takes {n} tokens with a one-word message; the context is {model.max_seq_len}")
    turns: list[dict] = []  # user/assistant pairs, oldest first
    if sys.stdin is None:
        raise ValueError("chat reads its messages from stdin, which is closed")
    interactive = sys.stdin.isatty()
    tp = model.tensor_parallel  # every rank must see each line: rank 0 reads it and sends it on
    read = _read_line if tp is None else lambda: tp.broadcast(_read_line() if tp.rank == 0 else None)
    while True:
        if interactive:
            write("> ")
        line = read()
        if line is None:
            break
        if not line.strip():
            continue
        # a bad line is reported and skipped; the conversation goes on
        try:
            user = {"role": "user", "content": line}
            dropped = _fit_history(model, system, turns, user, params.max_new_tokens)
        except ValueError as e:
            warn(f"{e}; message ignored")
            continue
        if dropped:
            warn(f"dropped the {dropped} oldest turn(s) to fit the context ({model.max_seq_len} tokens)")
        reply = ""
        for piece in model.stream_chat([*system, *turns, user], **sampling(a)):
            reply += piece
            write(piece)
        write("\n")
        # the format refuses its own tags in any message: a reply that wrote one is kept without it
        for tag in CHAT_TAGS:
            reply = reply.replace(tag, "")
        turns += [user, {"role": "assistant", "content": reply}]


def _read_line():
    """One line of stdin without its newline; None at the end; "" (and a warning) for invalid UTF-8."""
    stream = getattr(sys.stdin, "buffer", None)
    raw = stream.readline() if stream is not None else sys.stdin.readline()
    if not raw:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            warn(f"line is not valid UTF-8 (byte {raw[e.start]:#04x} at {e.start}); message ignored")
            return ""
    return raw.rstrip("\r\n")


def _fit_history(model, system: list, turns: list, user: dict, max_new_tokens: int) -> int:
    """Drop the oldest user/assistant pairs from `turns` (in place) until the prompt leaves room for
    the reply (max_new_tokens, or at least a quarter of the context); returns how many turns went.
    A message that cannot fit even alone raises ValueError."""
    context = model.max_seq_len
    room = min(max_new_tokens, context // 4)
    dropped = 0
    while True:
        n = len(model.tokenizer.encode_chat([*system, *turns, user]))
        if n + room <= context or (not turns and n < context):
            return dropped
        if not turns:
            raise ValueError(f"message is {n} tokens with the system prompt; the context is {context}")
        del turns[:2]
        dropped += 2
