"""SentencePiece tokenizer with CodeLlama's infilling and Instruct prompt formats (Meta's reference).

Injection safety: the pieces of control ids that the vocabulary stores as ordinary pieces
(CodeLlama's `▁<PRE>` … `▁<EOT>`, 70B-Instruct's `<step>`) are marked UNUSED in the processor
used for encoding, so user text such as `" <PRE>"` is split into ordinary pieces (the
segmentation it would get if those pieces did not exist) and still decodes back exactly.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Optional

import sentencepiece as spm

from ..errors import CheckpointError
from .sp_model import mark_unused

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
CHAT_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")  # Meta's SPECIAL_TAGS: refused inside messages
FILL_ME = "<FILL_ME>"
_INFILL_PIECES = {"prefix_id": "▁<PRE>", "middle_id": "▁<MID>", "suffix_id": "▁<SUF>", "eot_id": "▁<EOT>"}
_ROLES = ("system", "user", "assistant")


class Tokenizer:
    """A `tokenizer.model` (SentencePiece BPE, byte fallback) plus CodeLlama's special ids.

    `prefix_id`, `middle_id`, `suffix_id`, `eot_id`, `step_id` are None when the vocabulary lacks
    them (CodeLlama-34B has no infilling pieces; only 70B-Instruct has `<step>`).
    `add_bos` / `add_eos` default to True / False as in transformers' CodeLlamaTokenizer and apply
    to the HF-compatible methods.
    """

    def __init__(self, model_proto: bytes, path: Optional[str] = None):
        self.path = path
        self._proto = model_proto
        plain = spm.SentencePieceProcessor()
        plain.LoadFromSerializedProto(model_proto)
        self.vocab_size: int = plain.get_piece_size()
        self.unk_id: int = plain.unk_id()
        self.bos_id: Optional[int] = plain.bos_id() if plain.bos_id() >= 0 else None
        self.eos_id: Optional[int] = plain.eos_id() if plain.eos_id() >= 0 else None
        for attr, piece in _INFILL_PIECES.items():
            setattr(self, attr, _piece_id(plain, piece) or _piece_id(plain, piece[1:]))
        self.step_id: Optional[int] = _piece_id(plain, "<step>")
        self.special_ids = frozenset(i for i in (self.bos_id, self.eos_id, self.prefix_id, self.middle_id,
                                                 self.suffix_id, self.eot_id, self.step_id) if i is not None)
        textual = {plain.id_to_piece(i) for i in self.special_ids if not plain.is_control(i)}
        if textual:
            self.sp = spm.SentencePieceProcessor()
            self.sp.LoadFromSerializedProto(mark_unused(model_proto, textual))
        else:
            self.sp = plain
        self.add_bos, self.add_eos = True, False
        self._anchor_id, self._anchor_text = self._find_anchor()

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except FileNotFoundError:
            raise CheckpointError("tokenizer file not found", file=path) from None
        except OSError as e:
            raise CheckpointError(f"cannot read tokenizer: {e}", file=path) from None
        try:
            return cls(proto, path)
        except (RuntimeError, ValueError, IndexError) as e:
            raise CheckpointError(f"not a SentencePiece model: {e}", file=path) from None

    @classmethod
    def from_pretrained(cls, directory) -> "Tokenizer":
        return cls.from_file(Path(directory) / "tokenizer.model")

    def _find_anchor(self) -> tuple[Optional[int], str]:
        """A one-character piece that no other piece contains (Meta uses '☺'): encoding anchor + text
        and dropping the anchor's ids encodes text without the implicit leading space, and decoding
        [anchor] + ids and dropping its character keeps a leading space."""
        sp = self.sp
        i = _piece_id(sp, "☺")
        if i is not None:
            return i, "☺"
        normal = [j for j in range(self.vocab_size)
                  if not (sp.is_control(j) or sp.is_unknown(j) or sp.is_byte(j) or sp.is_unused(j))]
        contained = Counter(c for j in normal for c in set(sp.id_to_piece(j).replace("▁", "")))
        for j in normal:
            p = sp.id_to_piece(j)
            if len(p) == 1 and p != "▁" and contained[p] == 1:
                return j, p
        return None, ""

    def _anchor(self) -> str:
        if self._anchor_id is None:
            raise ValueError("this vocabulary has no isolated single-character piece, so text cannot be "
                             "encoded without SentencePiece's implicit leading space")
        return self._anchor_text

    # ---- plain text ----------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Ids of `text` (SentencePiece's, with its implicit leading space), optionally BOS/EOS.
        Text never yields a control id (BOS, EOS, PRE, SUF, MID, EOT, step)."""
        ids = self.sp.encode(_check_text(text))
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of ids, as SentencePiece decodes them (a leading '▁' of the first piece is dropped).
        With skip_special_tokens=False, control ids are shown as their pieces ('<s>', '▁<PRE>' -> ' <PRE>')."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i) or i in self.special_ids:  # textual control pieces too (CodeLlama's ▁<PRE>)
                out.append(self._decode_run(run, first=not out))
                out.append(self.sp.id_to_piece(i).replace("▁", " "))
                run = []
            else:
                run.append(i)
        out.append(self._decode_run(run, first=not out))
        return "".join(out)

    def _decode_run(self, run: list[int], first: bool) -> str:
        return "" if not run else self.sp.decode(run) if first else self.decode_in_context(run)

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def encode_nospace(self, text: str) -> list[int]:
        """Ids of `text` without SentencePiece's implicit leading space (Meta's `encode_infilling`)."""
        anchor = self._anchor()
        head = self.sp.encode(anchor)
        ids = self.sp.encode(anchor + _check_text(text))
        if ids[:len(head)] != head:  # cannot happen for an isolated anchor; never return wrong ids
            raise ValueError(f"cannot encode {text[:20]!r}... without a leading space: anchor merged with it")
        return ids[len(head):]

    def piece_texts(self) -> list:
        """Per id, the text it adds mid-sequence whatever its neighbours, or None: normal pieces (the piece with
        '▁' read as a space); byte-fallback, control, unknown, unused and special ids are None (their text depends
        on the ids around them, or is dropped). Built on first use and checked once against `decode_in_context`
        of a run of such pieces (all None if SentencePiece disagrees, e.g. a denormalizing model)."""
        texts = getattr(self, "_piece_texts", None)
        if texts is None:
            sp = self.sp
            texts = [None if (i in self.special_ids or sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)
                              or sp.is_unused(i)) else sp.id_to_piece(i).replace("▁", " ")
                     for i in range(self.vocab_size)]
            normal = [i for i, t in enumerate(texts) if t is not None]
            sample = normal[::max(1, len(normal) // 512)]
            if self._anchor_id is None or self.decode_in_context(sample) != "".join(texts[i] for i in sample):
                texts = [None] * self.vocab_size
            self._piece_texts = texts
        return texts

    def decode_in_context(self, ids) -> str:
        """Text of ids as it reads in the middle of a sequence: a leading space is kept.
        Special ids are skipped."""
        ids = [i for i in self._check_ids(ids) if i not in self.special_ids]
        anchor = self._anchor()
        return self.sp.decode([self._anchor_id] + ids)[len(anchor):]

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
        prefix, suffix = split_fill(text)
        return self.encode_infill(prefix, suffix, suffix_first=suffix_first)

    def decode_infill(self, ids) -> str:
        """The middle's text, leading space kept (Meta's `decode_infilling`)."""
        return self.decode_in_context(ids)

    # ---- Instruct ------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Instruct prompt: Meta's `chat_completion` [INST]/<<SYS>> format, or the 70B-Instruct
        `Source:`/`<step>` format when the vocabulary has `<step>`. Messages holding the format's own
        tags are refused, as Meta's reference does."""
        messages = _check_messages(messages)
        if self.step_id is not None:
            return self._encode_steps(messages)
        if messages[0]["role"] == "system":
            if len(messages) < 2:
                raise ValueError("messages: a system message must be followed by a user message")
            messages = [{"role": messages[1]["role"],
                         "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}] + messages[2:]
        _check_alternation(messages, first=0)
        ids: list[int] = []
        for prompt, answer in zip(messages[::2], messages[1::2]):
            ids += self.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                               add_bos=True, add_eos=True)
        ids += self.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", add_bos=True)
        return ids

    def _encode_steps(self, messages: list[dict]) -> list[int]:
        """Meta's `dialog_prompt_tokens` (CodeLlama-70B-Instruct)."""
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": ""}] + messages
        _check_alternation(messages, first=1)
        ids = [self.bos_id]
        for m in messages:
            headers = [f"Source: {m['role'].strip()}"]
            if m.get("destination") is not None:
                headers.append(f"Destination: {m['destination'].strip()}")
            ids += self.encode(" " + "\n".join(headers), add_bos=False)
            if m["content"]:
                ids += self.encode("\n\n " + m["content"].strip(), add_bos=False)
            ids.append(self.step_id)
        ids += self.encode(" " + "\n".join(["Source: assistant", "Destination: user"]), add_bos=False)
        ids += self.encode("\n\n ", add_bos=False)
        return ids

    # ---- transformers-compatible helpers (CodeLlamaTokenizer semantics) -------------------

    def _bos_eos(self) -> tuple[list[int], list[int]]:
        return ([self.bos_id] if self.add_bos else []), ([self.eos_id] if self.add_eos else [])

    def build_inputs_with_special_tokens(self, ids0: list[int], ids1: Optional[list[int]] = None) -> list[int]:
        """bos? + ids0 + eos? (+ bos? + ids1 + eos?), per add_bos / add_eos."""
        bos, eos = self._bos_eos()
        out = bos + list(ids0) + eos
        return out if ids1 is None else out + bos + list(ids1) + eos

    def get_special_tokens_mask(self, ids0: list[int], ids1: Optional[list[int]] = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 where build_inputs_with_special_tokens adds a special token (or, with
        already_has_special_tokens, where ids0 holds one), else 0."""
        if already_has_special_tokens:
            if ids1 is not None:
                raise ValueError("ids1 must be None when already_has_special_tokens=True")
            special = self.special_ids | {self.unk_id}
            return [1 if i in special else 0 for i in ids0]
        bos, eos = ([1] if self.add_bos else []), ([1] if self.add_eos else [])
        out = bos + [0] * len(ids0) + eos
        return out if ids1 is None else out + bos + [0] * len(ids1) + eos

    def create_token_type_ids_from_sequences(self, ids0: list[int], ids1: Optional[list[int]] = None) -> list[int]:
        """0 for every position of the first sequence (with its specials), 1 for the second."""
        bos, eos = self._bos_eos()
        out = [0] * len(bos + list(ids0) + eos)
        return out if ids1 is None else out + [1] * len(bos + list(ids1) + eos)

    def save_vocabulary(self, directory, filename_prefix: Optional[str] = None) -> tuple[str]:
        """Write the original tokenizer.model into `directory` as `[prefix-]tokenizer.model`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"save_vocabulary: {directory} is not a directory")
        out = directory / ((f"{filename_prefix}-" if filename_prefix else "") + "tokenizer.model")
        if self.path is None or Path(self.path).resolve() != out.resolve():
            out.write_bytes(self._proto)
        return (str(out),)


def split_fill(text: str) -> tuple[str, str]:
    """(prefix, suffix) around the single `<FILL_ME>` in text; ValueError for zero or several."""
    parts = text.split(FILL_ME)
    if len(parts) != 2:
        raise ValueError(f"text must contain exactly one {FILL_ME} marker, found {len(parts) - 1}")
    return parts[0], parts[1]


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text has a lone surrogate {text[e.start]!r} at index {e.start}: not valid Unicode") from None
    return text


def _piece_id(sp: spm.SentencePieceProcessor, piece: str) -> Optional[int]:
    i = sp.piece_to_id(piece)
    return None if i == sp.unk_id() or sp.id_to_piece(i) != piece else i


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError("each message must be {'role': 'system'|'user'|'assistant', 'content': str}")
        tags = [t for t in CHAT_TAGS if t in m["content"]]
        if tags:
            raise ValueError(f"messages: special tag {tags[0]!r} is not allowed inside a message")
    return list(messages)


def _check_alternation(messages: list[dict], first: int) -> None:
    turns = messages[first:]
    if not turns or not (all(m["role"] == "user" for m in turns[::2])
                         and all(m["role"] == "assistant" for m in turns[1::2])):
        raise ValueError("messages must alternate user/assistant after an optional leading system message, "
                         "starting with user")
    if turns[-1]["role"] != "user":
        raise ValueError(f"messages: the last message must be from the user, got {turns[-1]['role']!r}")
