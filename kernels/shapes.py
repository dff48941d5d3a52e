"""The model shapes the kernels' ahead-of-time case lists (`aot_configs`) compile for, as plain values, so
kernels/ never imports the runtime's presets: callers build them from a model's arguments (`ModelShape.of`,
e.g. `codellama_rt.model.config.PRESETS["CodeLlama-7b"]`) and pass them in.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """One model's widths, as the kernels see them.

    label: a short name for the config labels ("7B"); dim, n_heads, n_kv_heads, head_dim, ffn_dim,
    vocab_size, max_seq_len: ints as in a ModelArgs; projections: ((name, (out, in)), ...) of one block's
    projections as the graph holds them (fused wqkv, wo, fused w13, w2), in that order.
    """

    label: str
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    projections: tuple

    @classmethod
    def of(cls, args, label: str) -> "ModelShape":
        """The shape of `args`, any object with a ModelArgs' fields and `projection_shapes()` (duck-typed:
        no import of the runtime)."""
        return cls(label=label, dim=args.dim, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                   head_dim=args.head_dim, ffn_dim=args.ffn_dim, vocab_size=args.vocab_size,
                   max_seq_len=args.max_seq_len, projections=tuple(args.projection_shapes().items()))

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (out, in) of the block's projections, as `ModelArgs.projection_shapes`."""
        return dict(self.projections)


def head_layouts(models) -> list[tuple[str, int, int, int]]:
    """(label, n_heads, n_kv_heads, head_dim) of each distinct attention layout of `models` (ModelShapes), in
    first-seen order; models sharing one are labelled together ("34B/70B")."""
    layouts: dict = {}
    for m in models:
        layouts.setdefault((m.n_heads, m.n_kv_heads, m.head_dim), []).append(m.label)
    return [("/".join(labels), h, hkv, d) for (h, hkv, d), labels in layouts.items()]
