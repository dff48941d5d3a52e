"""Tokenizer behaviour of the reference runtime (API.md, "Tokenizer").

Real Llama 2 / CodeLlama tokenizer files (../shared/tokenizers, skipped when absent): known ids, parity
with plain SentencePiece on standard-library source lines, Meta's infilling and Instruct formats restated
here with a raw SentencePieceProcessor. The tiny tokenizer trained in the session (always available):
generic infilling, `decode_infill`, and streaming detokenization (`TextStream`) with stop strings.

Injection safety (text such as " <PRE>" never yielding a control id), the 70B step format, the HF-compatible
helpers and the `mask` command are tested in test_tokenizer_safety.py; lines containing the infill markers
are left out of the parity checks here.
"""
from __future__ import annotations

import importlib
import inspect
import random

import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

from codellama_rt.tokenizer.detokenize import TextStream
from conftest import SHARED_TOKENIZERS, available_tokenizers, real_tokenizer

LLAMA2 = SHARED_TOKENIZERS / "llama2-tokenizer.model"
CODELLAMA = SHARED_TOKENIZERS / "codellama-tokenizer.model"
REAL_FILES = [pytest.param(LLAMA2, id="llama2"), pytest.param(CODELLAMA, id="codellama")]
MARKERS = ("<PRE>", "<SUF>", "<MID>", "<EOT>")
ANCHOR = "☺"  # Meta's `encode_infilling` anchor; a user-defined symbol in the tiny model

# Modules whose own sources give the test corpus (read at test time; nothing is downloaded).
STDLIB_MODULES = ("textwrap", "string", "json.decoder", "json.encoder", "difflib", "argparse", "html.parser",
                  "heapq", "bisect", "fractions", "colorsys", "shlex", "ast", "tokenize", "calendar")
EXTRA_LINES = [  # non-ASCII text: CJK and emoji need byte-fallback pieces
    "生活的真谛是", "    # 注释: données, naïve café — “quotes” …", "print('😀 🐍 ∑ ≤ ≥')",
    "x = 'héllo wörld'  ",
    "\tindented with a tab", "  two leading spaces", "trailing spaces   ", "a  b   c", " ",
]

KNOWN_IDS = {
    "This is a test": [1, 910, 338, 263, 1243],
    "生活的真谛是": [1, 29871, 30486, 31704, 30210, 30848, 235, 179, 158, 30392],
    "Hi  Hello": [1, 6324, 29871, 15043],
    " ": [1, 259],
    " Hello": [1, 29871, 15043],
}


@pytest.fixture(scope="module")
def tiny_sp(tiny_tokenizer) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer))


def _module_source(name: str) -> str:
    return inspect.getsource(importlib.import_module(name))


def stdlib_lines(n: int = 400, seed: int = 0) -> list[str]:
    """`n` distinct non-blank source lines of several stdlib modules (plus EXTRA_LINES), no infill markers."""
    lines = sorted({ln for m in STDLIB_MODULES for ln in _module_source(m).splitlines() if ln.strip()})
    lines = [ln for ln in lines if not any(t in ln for t in MARKERS)]
    return random.Random(seed).sample(lines, n) + EXTRA_LINES


def stdlib_functions() -> list[str]:
    """Sources of the functions and methods (indented, as in their class) defined in STDLIB_MODULES."""
    funcs = []
    for m in STDLIB_MODULES:
        mod = importlib.import_module(m)
        for _, obj in sorted(vars(mod).items()):
            if inspect.isclass(obj) and obj.__module__ == mod.__name__:
                members = [f for _, f in sorted(vars(obj).items()) if inspect.isfunction(f)]
            elif inspect.isfunction(obj) and obj.__module__ == mod.__name__:
                members = [obj]
            else:
                continue
            for f in members:
                try:
                    src = inspect.getsource(f)
                except (OSError, TypeError):
                    continue
                if 20 < len(src) < 4000 and not any(t in src for t in MARKERS):
                    funcs.append(src)
    return funcs


def infill_pairs(n: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """(prefix, suffix) cut at two random points of stdlib function sources (the middle is dropped);
    includes empty prefixes/suffixes and cuts inside indentation."""
    rng = random.Random(seed)
    funcs = stdlib_functions()
    pairs = [("", ""), ("def f(x):\n    ", "\n    return y\n"), ("def f():\n", ""), ("", "    return 1\n"),
             ("x = 1", " + 2"), ("s = '生活", "的真谛是'"), ("a = '😀", " 🐍'")]
    while len(pairs) < n:
        src = rng.choice(funcs)
        i = rng.randint(0, len(src))
        j = rng.randint(i, min(len(src), i + rng.choice((0, 5, 40, 200))))
        pairs.append((src[:i], src[j:]))
    return pairs


# ---- 1. real files: known ids, parity with SentencePiece -----------------------------------------

@pytest.mark.parametrize("path", REAL_FILES)
def test_known_ids(path):
    tok, _ = real_tokenizer(path)
    for text, ids in KNOWN_IDS.items():
        assert tok.encode(text) == ids, text
        assert tok.encode(text, add_bos=False) == ids[1:], text
        assert tok.encode(text, add_eos=True) == ids + [2], text
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_special_ids_codellama_and_llama2():
    code, _ = real_tokenizer(CODELLAMA)
    assert code.vocab_size == 32016
    assert (code.prefix_id, code.suffix_id, code.middle_id, code.eot_id) == (32007, 32008, 32009, 32010)
    llama, _ = real_tokenizer(LLAMA2)
    assert llama.vocab_size == 32000
    assert (llama.prefix_id, llama.suffix_id, llama.middle_id, llama.eot_id) == (None, None, None, None)


@pytest.mark.parametrize("path", REAL_FILES)
def test_encode_matches_sentencepiece_on_stdlib_lines(path):
    tok, sp = real_tokenizer(path)
    lines = stdlib_lines()
    assert len(lines) > 300
    for line in lines:
        assert tok.encode(line) == [1] + sp.encode(line), repr(line)
        assert tok.encode(line, add_bos=False, add_eos=True) == sp.encode(line) + [2], repr(line)


@pytest.mark.parametrize("path", REAL_FILES)
def test_decode_roundtrips_stdlib_lines(path):
    tok, sp = real_tokenizer(path)
    checked = 0
    for line in stdlib_lines():
        if sp.decode(sp.encode(line)) != line:  # only what SentencePiece itself round-trips
            continue
        assert tok.decode(tok.encode(line)) == line, repr(line)
        assert tok.decode(tok.encode(line, add_eos=True)) == line, repr(line)
        checked += 1
    assert checked > 300


# ---- 2. infilling format -------------------------------------------------------------------------

def meta_infill(sp, ids, prefix, suffix, suffix_first, enc_nospace):
    """Meta's `infilling_prompt_tokens` (meta-llama/codellama, llama/generation.py), restated."""
    bos, pre, suf, mid = ids
    if suffix_first:
        return [bos, pre, suf] + enc_nospace(suffix) + [mid] + sp.encode(prefix)
    return [bos, pre] + sp.encode(prefix) + [suf] + enc_nospace(suffix) + [mid]


def test_encode_infill_matches_meta_codellama():
    tok, sp = real_tokenizer(CODELLAMA)
    ids = (sp.bos_id(), sp.piece_to_id("▁<PRE>"), sp.piece_to_id("▁<SUF>"), sp.piece_to_id("▁<MID>"))
    assert ids == (1, 32007, 32008, 32009)

    def meta_nospace(s):  # Meta's `encode_infilling`
        return sp.encode("☺" + s)[2:]

    pairs = infill_pairs(400)
    assert len(set(pairs)) >= 390
    for prefix, suffix in pairs:
        for suffix_first in (False, True):
            want = meta_infill(sp, ids, prefix, suffix, suffix_first, meta_nospace)
            got = tok.encode_infill(prefix, suffix, suffix_first=suffix_first)
            assert got == want, (prefix, suffix, suffix_first)
            assert tok.encode_fill(prefix + "<FILL_ME>" + suffix, suffix_first=suffix_first) == got


@pytest.mark.parametrize("path", REAL_FILES)
def test_real_snippets_roundtrip(path):
    """decode(encode(x)) == x on several hundred stdlib code snippets (whole functions and infill cuts);
    a suffix encoded without the leading space reads back exactly through decode_infill."""
    tok, sp = real_tokenizer(path)
    funcs = stdlib_functions()
    assert len(funcs) >= 300
    for src in funcs:
        ids = tok.encode(src)
        assert ids == [1] + sp.encode(src)
        assert tok.decode(ids) == src, src[:60]
    for prefix, suffix in infill_pairs(400, seed=1):
        assert tok.decode(tok.encode(prefix)) == prefix
        assert tok.decode_infill(tok.encode_nospace(suffix)) == suffix


def test_encode_infill_generic_tiny(tiny, tiny_sp):
    sp = tiny_sp
    assert sp.is_control(tiny.prefix_id) and sp.id_to_piece(tiny.prefix_id) == "▁<PRE>"
    ids = (tiny.bos_id, tiny.prefix_id, tiny.suffix_id, tiny.middle_id)
    assert [sp.id_to_piece(i) for i in ids[1:]] == ["▁<PRE>", "▁<SUF>", "▁<MID>"]
    head = sp.encode(ANCHOR)

    def nospace(s):  # encode(anchor + s) minus the ids of encode(anchor)
        full = sp.encode(ANCHOR + s)
        assert full[:len(head)] == head, s
        return full[len(head):]

    for prefix, suffix in infill_pairs():
        suf_ids = nospace(suffix)
        if suffix and not suffix.startswith(" "):
            assert not sp.id_to_piece(suf_ids[0]).startswith("▁"), suffix  # no implicit leading space
        if prefix:
            assert sp.decode(sp.encode(prefix) + suf_ids) == prefix + suffix
        assert tiny.encode_nospace(suffix) == suf_ids
        for suffix_first in (False, True):
            want = meta_infill(sp, ids, prefix, suffix, suffix_first, nospace)
            assert tiny.encode_infill(prefix, suffix, suffix_first=suffix_first) == want, (prefix, suffix)


def _infill_tokenizers(tiny):
    return [tiny] + available_tokenizers(CODELLAMA)


def test_encode_fill(tiny):
    for tok in _infill_tokenizers(tiny):
        for before, after in [("def f(x):\n    ", "\n    return y\n"), ("", "x"), ("x", ""), ("", "")]:
            for sf in (False, True):
                text = before + "<FILL_ME>" + after
                assert tok.encode_fill(text, suffix_first=sf) == tok.encode_infill(before, after, suffix_first=sf)
        for bad in ("def f(): pass", "a <FILL_ME> b <FILL_ME> c", "<FILL_ME><FILL_ME>", ""):
            with pytest.raises(ValueError):
                tok.encode_fill(bad)


def test_encode_infill_empty_suffix_ends_in_middle(tiny):
    for tok in _infill_tokenizers(tiny):
        psm = tok.encode_infill("def f(x):\n    return ", "")
        assert psm[:2] == [tok.bos_id, tok.prefix_id]
        assert psm[-2:] == [tok.suffix_id, tok.middle_id]
        spm_ = tok.encode_infill("def f(x):\n    return ", "", suffix_first=True)
        assert spm_[:4] == [tok.bos_id, tok.prefix_id, tok.suffix_id, tok.middle_id]
        assert spm_[4:] == tok.encode("def f(x):\n    return ", add_bos=False)
        assert tok.encode_infill("", "") == [tok.bos_id, tok.prefix_id, tok.suffix_id, tok.middle_id]


def test_encode_infill_without_infill_pieces_raises():
    llama, _ = real_tokenizer(LLAMA2)
    with pytest.raises(ValueError):
        llama.encode_infill("def f():\n", "\n")
    with pytest.raises(ValueError):
        llama.encode_infill("def f():\n", "\n", suffix_first=True)
    with pytest.raises(ValueError):
        llama.encode_fill("def f():<FILL_ME>\n")


# ---- 3. decode_infill keeps a leading space ------------------------------------------------------

MIDDLES = [" return x", "return x", "  x = 1\n", "\n    pass", " ", "x", " 生活的真谛是", "😀 y", "\tz", ""]


def test_decode_infill_keeps_leading_space(tiny):
    for tok in [tiny] + available_tokenizers(CODELLAMA, LLAMA2):
        for middle in MIDDLES:
            assert tok.decode_infill(tok.encode_nospace(middle)) == middle, (tok.path, middle)
            # a middle as generated: followed by <EOT>, which is not text
            if tok.eot_id is not None:
                assert tok.decode_infill(tok.encode_nospace(middle) + [tok.eot_id]) == middle


# ---- 4. streaming detokenization -----------------------------------------------------------------

def _stream(tok, ids, stop=()):
    """Push ids one at a time; return (pieces from push, piece from finish, TextStream, released-so-far)."""
    ts = TextStream(tok, stop)
    pieces, released = [], []
    for i in ids:
        pieces.append(ts.push(i))
        released.append("".join(pieces))
    return pieces, ts.finish(), ts, released


STREAM_TEXTS = ["def f(x):\n    return x + 1\n", "生活的真谛是", "a 😀 b 🐍\n", "naïve café ∑", "  x", "",
                "print('你好, 世界')  # 🎉🎉", "\t\tz = '€'"]


def test_stream_concatenates_to_decode_in_context(tiny):
    for tok in [tiny] + available_tokenizers(CODELLAMA):
        for text in STREAM_TEXTS:
            ids = tok.encode(text, add_bos=False)
            pieces, last, ts, _ = _stream(tok, ids)
            full = tok.decode_in_context(ids)
            assert full == (" " + text if text else "")  # SentencePiece's leading space, kept mid-sequence
            assert "".join(pieces) + last == full == ts.text
            assert last == ""  # complete characters: nothing left for finish()
            assert not any("\ufffd" in p for p in pieces), pieces
            assert not ts.stopped


def test_tiny_needs_byte_fallback_for_cjk_and_emoji(tiny, tiny_sp):
    for ch in "生😀":
        assert any(tiny_sp.is_byte(i) for i in tiny.encode(ch, add_bos=False)), ch


# arbitrary unicode, with extra weight on characters that need byte-fallback pieces on the tiny model
TEXT = st.text(alphabet=st.one_of(st.characters(blacklist_categories=("Cs",)),
                                  st.sampled_from(list(" \n\tab生活的😀🐍é€∑"))),
               max_size=40)


@settings(max_examples=100, deadline=None)
@given(text=TEXT)
def test_stream_concatenation_property(tiny, text):
    ids = tiny.encode(text, add_bos=False)
    pieces, last, ts, _ = _stream(tiny, ids)
    full = tiny.decode_in_context(ids)
    assert "".join(pieces) + last == full
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces + [last])


@settings(max_examples=100, deadline=None)
@given(text=TEXT, data=st.data())
def test_stream_stop_string_property(tiny, text, data):
    ids = tiny.encode(text, add_bos=False)
    full = tiny.decode_in_context(ids)
    if len(full) < 2:
        return
    i = data.draw(st.integers(0, len(full) - 1))
    j = data.draw(st.integers(i + 1, min(len(full), i + 6)))
    stop = full[i:j]
    cut = full.find(stop)
    pieces, last, ts, released = _stream(tiny, ids, stop=(stop,))
    assert ts.stopped
    assert "".join(pieces) + last == full[:cut] == ts.text[:cut]
    for so_far in released:  # never anything at/after the stop string's start
        assert full[:cut].startswith(so_far)


def test_stream_arbitrary_ids(tiny):
    """Sampled ids need not form valid UTF-8 (a lone or cut byte piece): still nothing is lost or doubled."""
    rng = random.Random(0)
    byte_ids = [i for i in range(tiny.vocab_size) if tiny.sp.is_byte(i)]
    other = [i for i in range(tiny.vocab_size) if not tiny.sp.is_byte(i) and i not in tiny.special_ids]
    for _ in range(300):
        ids = [rng.choice(byte_ids if rng.random() < 0.5 else other) for _ in range(rng.randint(0, 12))]
        pieces, last, ts, _ = _stream(tiny, ids)
        assert "".join(pieces) + last == tiny.decode_in_context(ids) == ts.text


def test_piece_texts_are_each_ids_decoded_text(tiny):
    """The stream's table of fixed piece texts: every id it lists decodes alone (mid-sequence) to its text, and
    runs of random ids (byte pieces, specials, unknown) still stream to `decode_in_context` of the run, on the tiny
    and the real tokenizers (the fast path skips the two decodes for listed ids)."""
    rng = random.Random(1)
    for tok in [tiny] + available_tokenizers(LLAMA2, CODELLAMA):
        texts = tok.piece_texts()
        listed = [i for i, t in enumerate(texts) if t is not None]
        assert len(texts) == tok.vocab_size and len(listed) > tok.vocab_size // 2
        assert not any(texts[i] is not None for i in tok.special_ids)
        for i in listed[::max(1, len(listed) // 3000)]:
            assert tok.decode_in_context([i]) == texts[i], i
        for _ in range(200):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 16))]
            pieces, last, ts, _ = _stream(tok, ids)
            assert "".join(pieces) + last == tok.decode_in_context(ids) == ts.text, ids


def test_stream_stop_strings(tiny):
    toks = [tiny] + available_tokenizers(CODELLAMA)
    text = "def f(x):\n    return x + 1\n\ndef g():\n    生活 = '😀'\n"
    for tok in toks:
        ids = tok.encode(text, add_bos=False)
        full = tok.decode_in_context(ids)
        for stops in (["\ndef"], ["\n\n"], ["return"], ["生活"], ["😀'"], ["x + 1\n\nd"], ["g()", "\ndef"],
                      ["zzz", "\n\n", "1"], [" def"]):
            cut = min(full.find(s) for s in stops if s in full)
            pieces, last, ts, released = _stream(tok, ids, stop=stops)
            assert ts.stopped, stops
            assert "".join(pieces) + last == full[:cut], stops
            for so_far in released:
                assert full[:cut].startswith(so_far), (stops, so_far)
            # after the stop, later tokens release nothing
            assert ts.push(ids[0]) == "" and ts.finish() == ""


def test_stream_text_stays_cut_after_stop(tiny):
    ids = tiny.encode("a b. c d", add_bos=False)
    ts = TextStream(tiny, ["b."])
    released = "".join(ts.push(i) for i in ids) + ts.finish()
    assert ts.stopped and released == " a "
    assert ts.text == released  # docstring invariant: the released pieces concatenate to `text`


def test_stream_stop_string_that_never_occurs(tiny):
    toks = [tiny] + available_tokenizers(CODELLAMA)
    text = "def f(x):\n    return x + 1\n\ndef"
    for tok in toks:
        ids = tok.encode(text, add_bos=False)
        full = tok.decode_in_context(ids)
        # (stop strings, the tail that could begin one and is held back until finish())
        for stops, held in ((["\ndef g"], "\ndef"), (["defx"], "def"), (["ef\nxyz", "zzz"], "ef"),
                            (["1\n\nde f"], ""), (["zzz"], "")):
            pieces, last, ts, released = _stream(tok, ids, stop=stops)
            assert not ts.stopped
            assert "".join(pieces) + last == full == ts.text
            assert last == held, stops
            for so_far in released:
                assert full.startswith(so_far)


# ---- 5. Instruct (chat) format -------------------------------------------------------------------

def _chat_tokenizers(tiny):
    return [(tok, spm.SentencePieceProcessor(model_file=tok.path))
            for tok in [tiny] + available_tokenizers(LLAMA2, CODELLAMA)]


def test_encode_chat_system_user(tiny):
    sys_, user = "Provide answers in Python.", "Write a function that computes the set of sums of all pairs."
    for tok, sp in _chat_tokenizers(tiny):
        want = [sp.bos_id()] + sp.encode(f"[INST] <<SYS>>\n{sys_}\n<</SYS>>\n\n{user} [/INST]")
        assert tok.encode_chat([{"role": "system", "content": sys_}, {"role": "user", "content": user}]) == want
        assert tok.encode_chat([{"role": "user", "content": user}]) == \
            [sp.bos_id()] + sp.encode(f"[INST] {user} [/INST]")


def test_encode_chat_multi_turn(tiny):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2? "},
            {"role": "assistant", "content": " 4 \n"}, {"role": "user", "content": "And 生活 😀?"},
            {"role": "assistant", "content": "No idea."}, {"role": "user", "content": "ok"}]
    for tok, sp in _chat_tokenizers(tiny):
        bos, eos = sp.bos_id(), sp.eos_id()
        first = "<<SYS>>\nBe brief.\n<</SYS>>\n\n  What is 2+2? ".strip()
        want = ([bos] + sp.encode(f"[INST] {first} [/INST] 4 ") + [eos]
                + [bos] + sp.encode("[INST] And 生活 😀? [/INST] No idea. ") + [eos]
                + [bos] + sp.encode("[INST] ok [/INST]"))
        assert tok.encode_chat(msgs) == want
        rest = want[want.index(eos) + 1:]  # the turns after the first are unchanged without a system message
        assert tok.encode_chat(msgs[1:]) == [bos] + sp.encode("[INST] What is 2+2? [/INST] 4 ") + [eos] + rest


@pytest.mark.parametrize("roles", [
    [], ["system"], ["assistant"], ["system", "assistant"], ["user", "user"], ["user", "assistant"],
    ["user", "system"], ["system", "system", "user"], ["user", "assistant", "assistant"],
    ["system", "user", "assistant"], ["user", "assistant", "system", "user"], ["tool"],
])
def test_encode_chat_invalid_role_orders(tiny, roles):
    with pytest.raises(ValueError):
        tiny.encode_chat([{"role": r, "content": "hi"} for r in roles])


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(0, 5), st.integers(1, 7))
def test_text_offsets_linear_equal_their_definition(tiny, data, start, piece):
    """The server's logprob offsets (kept as ids arrive, in pieces): at an id that is neither a byte piece nor
    special, len(decode_in_context(ids before)); at a byte piece or special id (decoding skips those: bytes on
    either side join), the characters the bytes before it complete, so never past the next clean id's offset
    and never going back."""
    from codellama_rt.server.logprobs import TextOffsets

    n = tiny.sp.get_piece_size()
    byte_ids = [i for i in range(n) if tiny.sp.is_byte(i)]
    special = sorted(tiny.special_ids) + [0]
    ids = data.draw(st.lists(st.one_of(st.integers(0, n - 1), st.sampled_from(byte_ids), st.sampled_from(special)),
                             max_size=40))
    want = [start + len(tiny.decode_in_context(ids[:i])) for i in range(len(ids))]
    offsets = TextOffsets(tiny, start)
    got = [o for k in range(0, len(ids), piece) for o in offsets.extend(ids[k:k + piece])]
    clean = [not (tiny.sp.is_byte(t) or t in tiny.special_ids) for t in ids]
    assert [g for g, c in zip(got, clean) if c] == [w for w, c in zip(want, clean) if c]
    assert got == sorted(got) and all(g <= start + len(tiny.decode_in_context(ids)) for g in got)
    assert all(g <= w for g, w in zip(got, want))  # (an unfinished character is not counted yet)
