"""Log-probabilities in OpenAI's two shapes: the completions API's parallel lists (tokens, token_logprobs,
top_logprobs, text_offset) and the chat API's `content` list of {token, logprob, bytes, top_logprobs}.

A token's text is its SentencePiece piece with '▁' as a space; a byte-fallback piece is its character
when ASCII (CodeLlama spells newlines so), else (part of a UTF-8 character) `bytes:\\xNN` as OpenAI does.
"""
from __future__ import annotations

import codecs
from typing import Optional

from ..engine.events import TokenLogprob


def token_text(tokenizer, token_id: int) -> str:
    sp = tokenizer.sp
    if sp.is_byte(token_id):
        b = int(sp.id_to_piece(token_id)[3:5], 16)
        return chr(b) if b < 0x80 else f"bytes:\\x{b:02x}"
    return sp.id_to_piece(token_id).replace("▁", " ")


def token_bytes(tokenizer, token_id: int) -> list:
    sp = tokenizer.sp
    if sp.is_byte(token_id):
        return [int(sp.id_to_piece(token_id)[3:5], 16)]
    return list(token_text(tokenizer, token_id).encode("utf-8"))


def _top(tokenizer, lp: TokenLogprob, k: int) -> dict:
    """The k best alternatives as {text: logprob}, plus the chosen token (OpenAI: up to k + 1 entries)."""
    out = {}
    for token_id, value in lp.top[:k]:
        out.setdefault(token_text(tokenizer, token_id), value)
    out.setdefault(token_text(tokenizer, lp.token_id), lp.logprob)
    return out


def completion_logprobs(tokenizer, lps: list, k: int, offsets: list) -> dict:
    """The completions API's logprobs object of `lps` (one TokenLogprob per token) with `offsets` (the
    character offset of each token in the choice's text)."""
    return {"tokens": [token_text(tokenizer, lp.token_id) for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [_top(tokenizer, lp, k) for lp in lps],
            "text_offset": list(offsets)}


class TextOffsets:
    """Character offset of each generated id in a choice's text, plus `start` (the echoed prompt), as ids
    arrive: `extend(ids)` gives the offsets of `ids`, each len(decode_in_context(every id before it)).

    Linear in the ids: the text before an id that is neither a byte piece nor a special id (which decoding
    skips) is the text up to the last such id plus the short run since (no UTF-8 sequence spans that boundary),
    so only that run is decoded again. Within a run of byte pieces an id's offset counts the characters its
    bytes have completed (a UTF-8 sequence cut short counts once it is whole): offsets never go down.
    """

    def __init__(self, tokenizer, start: int = 0):
        self.tok, self.start = tokenizer, start
        self.ids: list = []
        self.base, self.base_len = 0, 0  # ids[:base] decode to base_len characters; ids[base] splits cleanly
        self.last = start

    def extend(self, ids: list) -> list:
        out = []
        for token in ids:
            i = len(self.ids)
            if not (self.tok.sp.is_byte(token) or token in self.tok.special_ids):  # (skipped: bytes join across)
                run = len(self.tok.decode_in_context(self.ids[self.base:i])) if i > self.base else 0
                self.base, self.base_len, run = i, self.base_len + run, 0
            else:
                run = self._completed(self.ids[self.base:i])
            self.last = max(self.last, self.start + self.base_len + run)
            out.append(self.last)
            self.ids.append(token)
        return out

    def _completed(self, run: list) -> int:
        """Characters the whole UTF-8 sequences among `run`'s pieces decode to (the run's first piece splits
        cleanly: a run holds byte pieces, after one other piece)."""
        if not run:
            return 0
        sp = self.tok.sp
        head = [] if sp.is_byte(run[0]) or run[0] in self.tok.special_ids else [run[0]]
        data = bytes(b for t in run[len(head):] if sp.is_byte(t) for b in token_bytes(self.tok, t))
        text = codecs.getincrementaldecoder("utf-8")("replace").decode(data)  # (an unfinished tail held back)
        return (len(self.tok.decode_in_context(head)) if head else 0) + len(text)


def text_offsets(tokenizer, ids: list, start: int = 0) -> list:
    """Character offset of each of `ids` in their decoded text (read mid-sequence), plus `start`."""
    return TextOffsets(tokenizer, start).extend(ids)


def chat_logprobs(tokenizer, lps: Optional[list], k: int) -> Optional[dict]:
    """The chat API's logprobs object (None when not asked for)."""
    if lps is None:
        return None

    def entry(token_id: int, value: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": value,
                "bytes": token_bytes(tokenizer, token_id)}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top[:k]]} for lp in lps]}
