"""SentencePiece tokenizer with CodeLlama's infilling and Instruct prompt formats (Meta's reference)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import sentencepiece as spm

from .errors import CheckpointError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
FILL_ME = "<FILL_ME>"
_INFILL_PIECES = {"prefix_id": "▁<PRE>", "middle_id": "▁<MID>", "suffix_id": "▁<SUF>", "eot_id": "▁<EOT>"}


class Tokenizer:
    """A `tokenizer.model` (SentencePiece BPE, byte fallback) plus CodeLlama's special ids.

    Ids are SentencePiece's own; `prefix_id`, `middle_id`, `suffix_id`, `eot_id`, `step_id` are
    None when the vocabulary lacks them (e.g. CodeLlama-34B has no infilling pieces).
    """

    def __init__(self, sp: spm.SentencePieceProcessor, path: Optional[str] = None):
        self.sp = sp
        self.path = path
        self.vocab_size: int = sp.get_piece_size()
        self.bos_id: Optional[int] = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id: Optional[int] = sp.eos_id() if sp.eos_id() >= 0 else None
        for attr, piece in _INFILL_PIECES.items():
            setattr(self, attr, self._piece_id(piece) or self._piece_id(piece[1:]))
        self.step_id: Optional[int] = self._piece_id("<step>")
        self.special_ids = frozenset(i for i in (self.bos_id, self.eos_id, self.prefix_id, self.middle_id,
                                                 self.suffix_id, self.eot_id, self.step_id) if i is not None)
        self._anchor_id, self._anchor_text = self._find_anchor()

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError("tokenizer file not found", file=path)
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(path)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"not a SentencePiece model: {e}", file=path) from None
        return cls(sp, path)

    @classmethod
    def from_pretrained(cls, directory) -> "Tokenizer":
        return cls.from_file(Path(directory) / "tokenizer.model")

    def _piece_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() or self.sp.id_to_piece(i) != piece else i

    def _find_anchor(self) -> tuple[int, str]:
        """A one-character piece without a leading '▁' (Meta uses '☺'): decoding [anchor] + ids and
        dropping the anchor gives the text of ids in mid-sequence, leading space kept."""
        i = self._piece_id("☺")
        if i is None:
            for j in range(self.vocab_size):
                p = self.sp.id_to_piece(j)
                if self.sp.is_unknown(j) or self.sp.is_control(j) or self.sp.is_byte(j):
                    continue
                if len(p) == 1 and p != "▁":
                    i = j
                    break
        if i is None:
            raise CheckpointError("vocabulary has no single-character piece to anchor decoding", file=self.path)
        return i, self.sp.id_to_piece(i)

    # ---- plain text ----------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Ids of `text` (SentencePiece's, with its implicit leading space), optionally BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of ids, as SentencePiece decodes them (a leading '▁' of the first piece is dropped)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.sp.decode(ids)

    def encode_nospace(self, text: str) -> list[int]:
        """Ids of `text` without SentencePiece's implicit leading space (Meta's `encode_infilling`)."""
        ids = self.sp.encode(self._anchor_text + text)
        head = self.sp.encode(self._anchor_text)
        if ids[:len(head)] != head:  # the anchor merged with the text: fall back to Meta's slicing
            return ids[2:]
        return ids[len(head):]

    def decode_in_context(self, ids) -> str:
        """Text of ids as it reads in the middle of a sequence: a leading space is kept."""
        ids = [int(i) for i in ids if int(i) not in self.special_ids]
        return self.sp.decode([self._anchor_id] + ids)[len(self._anchor_text):]

    # ---- infilling -----------------------------------------------------------------------

    def _require_infill(self):
        missing = [n for n in ("prefix_id", "middle_id", "suffix_id", "eot_id") if getattr(self, n) is None]
        if missing:
            raise ValueError(f"this tokenizer has no infilling pieces ({', '.join(missing)}); "
                             "the model does not support infilling")

    def encode_infill(self, prefix: str, suffix: str, *, suffix_first: bool = False) -> list[int]:
        """Meta's `infilling_prompt_tokens`: PSM [BOS, PRE] pre [SUF] suf [MID];
        SPM [BOS, PRE, SUF] suf [MID] pre. The suffix is encoded without a leading space."""
        self._require_infill()
        pre = self.encode(prefix, add_bos=False)
        suf = self.encode_nospace(suffix)
        if suffix_first:
            return [self.bos_id, self.prefix_id, self.suffix_id] + suf + [self.middle_id] + pre
        return [self.bos_id, self.prefix_id] + pre + [self.suffix_id] + suf + [self.middle_id]

    def encode_fill(self, text: str, *, suffix_first: bool = False) -> list[int]:
        """Infill prompt from text holding exactly one `<FILL_ME>` marker."""
        parts = text.split(FILL_ME)
        if len(parts) != 2:
            raise ValueError(f"text must contain exactly one {FILL_ME} marker, found {len(parts) - 1}")
        return self.encode_infill(parts[0], parts[1], suffix_first=suffix_first)

    def decode_infill(self, ids) -> str:
        """The middle's text, leading space kept (Meta's `decode_infilling`)."""
        return self.decode_in_context(ids)

    # ---- Instruct ------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Meta's `chat_completion` format: [INST] / <<SYS>> turns, each closed dialog turn ends in EOS."""
        if not messages:
            raise ValueError("messages must not be empty")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError("each message must be {'role': 'system'|'user'|'assistant', 'content': str}")
        if messages[0]["role"] == "system":
            if len(messages) < 2:
                raise ValueError("a system message must be followed by a user message")
            messages = [{"role": messages[1]["role"],
                         "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}] + messages[2:]
        if not (all(m["role"] == "user" for m in messages[::2])
                and all(m["role"] == "assistant" for m in messages[1::2])):
            raise ValueError("messages must alternate user/assistant, starting (after an optional system "
                             "message) and ending with user")
        if messages[-1]["role"] != "user":
            raise ValueError(f"the last message must be from the user, got {messages[-1]['role']!r}")
        ids: list[int] = []
        for prompt, answer in zip(messages[::2], messages[1::2]):
            ids += self.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                               add_bos=True, add_eos=True)
        ids += self.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", add_bos=True)
        return ids
