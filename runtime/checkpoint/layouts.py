"""What feeds each parameter of the graph in each checkpoint layout: HF names, or Meta's names with how
shards concatenate and which q/k rows must be permuted from Meta's interleaved RoPE layout; and how each
splits over the ranks of tensor parallelism (Megatron's: q/k/v and gate/up by rows, wo and down by
columns, embedding, head and norms whole on every rank)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..model.config import ModelArgs

# the token embedding's name in each layout (Meta's params.json may leave vocab_size to it)
EMBEDDING = {"hf": "model.embed_tokens.weight", "meta": "tok_embeddings.weight"}


@dataclass
class Part:
    """One source tensor feeding (part of) a parameter."""

    name: str
    shape: tuple
    cat_dim: Optional[int] = None   # Meta shards: concatenated along this dim; None: replicated
    rope_heads: int = 0             # Meta q/k: heads to permute from interleaved to rotate-half
    tp_dim: Optional[int] = None    # tensor parallelism: each rank takes its slice along this dim; None: all

def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's q/k rows pair (2i, 2i+1) within each head; HF's pair (i, i + D/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

def hf_plan(args: ModelArgs) -> dict[str, list[Part]]:
    d, q, kv, f, V = args.dim, args.q_dim, args.kv_dim, args.ffn_dim, args.vocab_size
    plan = {"tok_embeddings": [Part("model.embed_tokens.weight", (V, d))],
            "norm": [Part("model.norm.weight", (d,))]}
    if not args.tie_word_embeddings:
        plan["output.weight"] = [Part("lm_head.weight", (V, d))]
    for i in range(args.n_layers):
        p, a, m = f"layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        plan[f"{p}.attn_norm"] = [Part(f"model.layers.{i}.input_layernorm.weight", (d,))]
        plan[f"{p}.attn.wqkv.weight"] = [Part(f"{a}.q_proj.weight", (q, d), tp_dim=0),
                                         Part(f"{a}.k_proj.weight", (kv, d), tp_dim=0),
                                         Part(f"{a}.v_proj.weight", (kv, d), tp_dim=0)]
        plan[f"{p}.attn.wo.weight"] = [Part(f"{a}.o_proj.weight", (d, q), tp_dim=1)]
        plan[f"{p}.mlp_norm"] = [Part(f"model.layers.{i}.post_attention_layernorm.weight", (d,))]
        plan[f"{p}.mlp.w13.weight"] = [Part(f"{m}.gate_proj.weight", (f, d), tp_dim=0),
                                       Part(f"{m}.up_proj.weight", (f, d), tp_dim=0)]
        plan[f"{p}.mlp.w2.weight"] = [Part(f"{m}.down_proj.weight", (d, f), tp_dim=1)]
    return plan


def meta_plan(args: ModelArgs) -> dict[str, list[Part]]:
    d, q, kv, f, V = args.dim, args.q_dim, args.kv_dim, args.ffn_dim, args.vocab_size
    plan = {"tok_embeddings": [Part("tok_embeddings.weight", (V, d), cat_dim=1)],
            "norm": [Part("norm.weight", (d,))],
            "output.weight": [Part("output.weight", (V, d), cat_dim=0)]}
    for i in range(args.n_layers):
        p, a, m = f"layers.{i}", f"layers.{i}.attention", f"layers.{i}.feed_forward"
        plan[f"{p}.attn_norm"] = [Part(f"layers.{i}.attention_norm.weight", (d,))]
        plan[f"{p}.attn.wqkv.weight"] = [Part(f"{a}.wq.weight", (q, d), 0, rope_heads=args.n_heads, tp_dim=0),
                                         Part(f"{a}.wk.weight", (kv, d), 0, rope_heads=args.n_kv_heads, tp_dim=0),
                                         Part(f"{a}.wv.weight", (kv, d), 0, tp_dim=0)]
        plan[f"{p}.attn.wo.weight"] = [Part(f"{a}.wo.weight", (d, q), 1, tp_dim=1)]
        plan[f"{p}.mlp_norm"] = [Part(f"layers.{i}.ffn_norm.weight", (d,))]
        plan[f"{p}.mlp.w13.weight"] = [Part(f"{m}.w1.weight", (f, d), 0, tp_dim=0),
                                       Part(f"{m}.w3.weight", (f, d), 0, tp_dim=0)]
        plan[f"{p}.mlp.w2.weight"] = [Part(f"{m}.w2.weight", (d, f), 1, tp_dim=1)]
    return plan
