"""Attention-mask visualizer: which prompt token may attend to which, with infill segments marked.

In the spirit of transformers' AttentionMaskVisualizer. The model's mask is causal (query i sees
keys 0..i); for an infill prompt the rows and columns are labelled with their segment so the
PSM / SPM layout is visible.
"""
from __future__ import annotations

from pathlib import Path

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


def mask_image(labels: list[str]):
    """The mask as an RGB array [n + 1, n + 1, 3] (uint8): row q + 1, column k + 1 is key k's segment colour
    where query q may attend to it, grey where masked; row 0 and column 0 are the segment strips."""
    import numpy as np

    n = len(labels)
    rgb = np.array([SEGMENTS[label][2] for label in labels], dtype=np.uint8).reshape(n, 3)
    img = np.empty((n + 1, n + 1, 3), dtype=np.uint8)
    img[0, 0] = _BG_RGB
    img[0, 1:] = rgb                                   # key segments along the top
    img[1:, 0] = rgb                                   # query segments down the left
    visible = np.tril(np.ones((n, n), dtype=bool))     # causal: query q sees keys 0..q
    img[1:, 1:] = np.where(visible[..., None], rgb[None, :, :], np.array(_MASKED_RGB, dtype=np.uint8))
    return img


def write_png(path, labels: list[str]) -> Path:
    """A picture of `mask_image` for the first PNG_MAX_TOKENS tokens (matplotlib, the `plots` extra), with
    a legend of the segments. Raises MissingExtraError without matplotlib."""
    import numpy as np

    from ..plotting import new_figure

    fig = new_figure("writing the mask picture", figsize=(7, 7), layout="tight")
    from matplotlib.patches import Patch

    total, labels = len(labels), labels[:PNG_MAX_TOKENS]
    n = len(labels)
    ax = fig.subplots()
    ax.imshow(mask_image(labels), interpolation="nearest", extent=(-1.5, n - 0.5, n - 0.5, -1.5))
    if n <= 64:  # white lines between cells while they are large enough to see
        ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    shown = f"the first {n} of {total}" if n < total else f"{n}"
    ax.set_title(f"{shown} tokens, causal mask (grey: masked)", fontsize=10)
    present = [name for name in SEGMENTS if name in labels]
    ax.legend(handles=[Patch(color=np.array(SEGMENTS[name][2]) / 255, label=name) for name in present],
              loc="upper right", bbox_to_anchor=(1, n / (n + 1)), fontsize=8)  # below the strip, on grey
    path = Path(path)
    fig.savefig(path, dpi=100, format="png")
    return path
