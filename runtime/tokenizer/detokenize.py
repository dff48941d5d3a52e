"""Incremental detokenization for streaming, with stop-string hold-back."""
from __future__ import annotations

from .tokenizer import Tokenizer


class TextStream:
    """Turns the growing token list of one sequence into released text pieces.

    Invariants: the released pieces concatenate to `text`; text never ends in half a UTF-8
    character while more tokens may come (byte-fallback pieces are held back); a leading space
    is kept (tokens are decoded as they read mid-sequence); nothing that could begin a stop
    string is released before it is known not to, and text is cut before the first stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple = ()):
        self.tok, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0           # chars of `text` already released
        self._prefix = 0        # ids[_prefix:_read] is the context the next decode is diffed against
        self._read = 0
        self.stopped = False    # a stop string was found
        # (duck-typed tokenizers without the table, e.g. the benchmarks' id tokenizer, decode every id)
        self._pieces = tokenizer.piece_texts() if hasattr(tokenizer, "piece_texts") else []

    def _advance(self, final: bool) -> None:
        if self._read == len(self.ids) - 1:  # nothing pending: a normal piece's text is known without decoding
            text = self._pieces[self.ids[-1]] if 0 <= self.ids[-1] < len(self._pieces) else None
            if text is not None:
                self.text += text
                self._prefix, self._read = self._read, len(self.ids)
                return
        old = self.tok.decode_in_context(self.ids[self._prefix:self._read])
        new = self.tok.decode_in_context(self.ids[self._prefix:])
        if len(new) > len(old) and (final or not new.endswith("\ufffd")):
            self.text += new[len(old):]
            self._prefix, self._read = self._read, len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final (may be empty)."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        self._advance(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: release everything left (an incomplete character as U+FFFD)."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped, final = self.text[:min(hits)], True, True
        end = len(self.text) if final else len(self.text) - self._holdback()
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
