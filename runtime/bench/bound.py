"""The decode bound: bytes one decode step must read, and the tokens/s the measured bandwidth allows."""
from __future__ import annotations

from ..model.config import ModelArgs
from ..quant.linear import weight_bytes


def decode_step_bytes(weights_read: int, args: ModelArgs, batch: int, context: float, elem_bytes: int) -> int:
    """Bytes one decode step must read: the weights it multiplies by plus every sequence's cached keys and
    values at `context` tokens (`ModelArgs.kv_cache_bytes`)."""
    return int(weights_read + args.kv_cache_bytes(batch, 1, elem_bytes) * context)


def decode_bound(step_bytes: int, bandwidth_gbps: float, batch: int = 1) -> float:
    """Tokens/s if a decode step took exactly its bytes / the measured bandwidth: batch / (bytes / bandwidth)."""
    return batch * bandwidth_gbps * 1e9 / step_bytes


def weights_read_per_token(module) -> int:
    """`quant.weight_bytes` less the embedding table, of which a decode step reads one row per sequence
    (unless it is tied to the lm_head, which reads it all)."""
    emb = module.tok_embeddings
    tied = getattr(module.output, "weight", None) is emb
    return weight_bytes(module) - (0 if tied else emb.numel() * emb.element_size())
