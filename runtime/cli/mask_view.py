"""Attention-mask visualizer: which prompt token may attend to which, with infill segments marked.

In the spirit of transformers' AttentionMaskVisualizer. The model's mask is causal (query i sees
keys 0..i); for an infill prompt the rows and columns are labelled with their segment so the
PSM / SPM layout is visible.
"""
from __future__ import annotations

from pathlib import Path

from .. import png
from ..tokenizer.tokenizer import FILL_ME, Tokenizer, split_fill

# segment -> (one-letter tag, ANSI colour, RGB)
SEGMENTS = {
    "special": ("*", "\033[95m", (170, 60, 200)),
    "text": ("T", "\033[94m", (60, 110, 220)),
    "prefix": ("P", "\033[92m", (40, 170, 80)),
    "suffix": ("S", "\033[93m", (220, 160, 20)),
}
_RESET = "\033[0m"
_MASKED_RGB, _BG_RGB = (225, 225, 225), (255, 255, 255)


def prompt_segments(tok: Tokenizer, prompt: str, *, suffix_first: bool = False) -> tuple[list[int], list[str]]:
    """Token ids of the prompt the model would see and a segment label per token.

    A prompt with one <FILL_ME> becomes Meta's infill prompt (PSM, or SPM with suffix_first).
    """
    if FILL_ME not in prompt:
        ids = tok.encode(prompt)
        return ids, ["special" if i in tok.special_ids else "text" for i in ids]
    prefix, suffix = split_fill(prompt)
    ids = tok.encode_infill(prefix, suffix, suffix_first=suffix_first)
    n_pre, n_suf = len(tok.encode(prefix, add_bos=False)), len(tok.encode_nospace(suffix))
    sp = lambda n: ["special"] * n  # noqa: E731
    if suffix_first:
        labels = sp(3) + ["suffix"] * n_suf + sp(1) + ["prefix"] * n_pre
    else:
        labels = sp(2) + ["prefix"] * n_pre + sp(1) + ["suffix"] * n_suf + sp(1)
    assert len(labels) == len(ids)
    return ids, labels


def _token_label(tok: Tokenizer, i: int, width: int) -> str:
    piece = tok.sp.id_to_piece(i)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in piece)
    return (text[:width - 1] + "…") if len(text) > width else text


def render_text(tok: Tokenizer, ids: list[int], labels: list[str], *, color: bool = False,
                max_tokens: int = 48, width: int = 12) -> str:
    """The mask as text: one row per query token, ■ where it may attend to the key, ⬚ where masked."""
    n = min(len(ids), max_tokens)
    lines = []
    legend = "  ".join(f"{tag}={name}" for name, (tag, _, _) in SEGMENTS.items() if name in labels)
    lines.append(f"{len(ids)} tokens, causal mask (■ may attend, ⬚ masked); segments: {legend}")
    for q in range(n):
        tag, ansi, _ = SEGMENTS[labels[q]]
        cells = []
        for k in range(n):
            if k <= q:
                cells.append(f"{SEGMENTS[labels[k]][1]}■{_RESET}" if color else "■")
            else:
                cells.append("⬚")
        name = _token_label(tok, ids[q], width)
        head = f"{q:>4} {tag} {name:<{width}}"
        lines.append(f"{ansi}{head}{_RESET} " + " ".join(cells) if color else f"{head} " + " ".join(cells))
    if n < len(ids):
        lines.append(f"... {len(ids) - n} more tokens not shown (--max-tokens)")
    return "\n".join(lines)


PNG_MAX_TOKENS = 1024


def write_png(path, labels: list[str], *, cell: int = 0) -> Path:
    """A picture of the mask for the first PNG_MAX_TOKENS tokens: visible cells coloured by the key's
    segment, a segment strip on the top and left edges, masked cells grey.
    cell: pixels per token (0: fit about 640 pixels)."""
    labels = labels[:PNG_MAX_TOKENS]
    n = len(labels)
    cell = cell or max(1, min(24, 640 // (n + 1)))
    rgb = [bytes(SEGMENTS[label][2]) for label in labels]
    gap = 1 if cell >= 4 else 0  # white grid lines between cells when there is room

    def block(px: bytes) -> bytes:
        return px * (cell - gap) + bytes(_BG_RGB) * gap

    header_row = bytes(_BG_RGB) * cell + b"".join(px * cell for px in rgb)
    rows = [header_row] * cell
    for q in range(n):
        cells = b"".join(block(rgb[k]) for k in range(q + 1)) + block(bytes(_MASKED_RGB)) * (n - 1 - q)
        body = rgb[q] * cell + cells
        rows += [body] * (cell - gap) + [bytes(_BG_RGB) * (cell * (n + 1))] * gap
    size = cell * (n + 1)
    return png.write_png(path, size, size, rows)
