"""The module graph: embedding -> N x (RMSNorm -> GQA attention -> RMSNorm -> SwiGLU MLP) -> RMSNorm -> lm_head.

Every op goes through the `Backend` the model holds (`self.ops`), so switching kernels never
touches this file. Fused weights: wqkv = [q; k; v] rows, w13 = [gate (w1); up (w3)] rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .backends import Backend
from .config import ModelArgs
from ..kernels.rotary import rope_tables
from .kv_cache import KVCache


def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight^T via `ops.linear`; weight [out, in]. The single place a quantized layer swaps in
    (see `codellama_rt.quant.linear`): every projection of the graph is one of these."""

    def __init__(self, out_features: int, in_features: int, dtype, device):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)

    def forward(self, ops: Backend, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)

    def swiglu(self, ops: Backend, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this projection's output, its rows being [gate; up] (w13): [..., out / 2]."""
        return ops.linear_swiglu(x, self.weight)

    def normed(self, ops: Backend, x, residual, norm_weight, eps: float, swiglu: bool = False):
        """This projection (`swiglu` as above) of rms_norm(x + residual) * norm_weight: (y, new residual)."""
        return ops.norm_linear(x, residual, norm_weight, eps, self.weight, swiglu)


@dataclass
class Prefill:
    """A chunk of T tokens at tensor positions start .. start + T - 1 of every sequence; the B sequences
    are the KV cache's rows slot .. slot + B - 1."""

    start: int
    slot: int = 0

    def positions(self, B: int, T: int, device) -> torch.Tensor:
        return torch.arange(self.start, self.start + T, device=device).expand(B, T)

    def attend(self, ops: Backend, q, k, v, kv: Optional[tuple], rope: tuple, positions) -> torch.Tensor:
        """q [B,H,T,D], k/v [B,Hkv,T,D] (not yet rotated) -> [B,H,T,D]; writes k/v into the cache."""
        q, k = ops.rotary(q, k, rope[0], rope[1], positions)
        if kv is None:
            assert self.start == 0, "a prefill chunk after position 0 needs a KV cache"
            return ops.attention_prefill(q, k, v, 0)
        B, T = q.shape[0], q.shape[2]
        end = self.start + T
        k_cache, v_cache = kv[0][self.slot:self.slot + B], kv[1][self.slot:self.slot + B]
        k_cache[:, :, self.start:end] = k
        v_cache[:, :, self.start:end] = v
        return ops.attention_prefill(q, k_cache[:, :, :end], v_cache[:, :, :end], self.start)


@dataclass
class Decode:
    """One token per sequence at its own position `positions[b]` (int64 [B] on the device).

    `kv_len` is a host-side upper bound on positions + 1 (attention reads cache[:, :, :kv_len]);
    the engine's `DecodeStep` passes the full cache length, fixed for a graph capture.
    `lengths` (positions + 1, what attention reads per sequence) is computed once per step, not per layer.
    """

    positions: torch.Tensor
    kv_len: int
    lengths: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.lengths = self.positions + 1

    def attend(self, ops: Backend, q, k, v, kv: tuple, rope: tuple, positions) -> torch.Tensor:
        """q [B,H,1,D], k/v [B,Hkv,1,D] (not yet rotated) -> [B,H,1,D]; k/v go into the cache at `positions`
        (in place, no host sync)."""
        B = q.shape[0]
        k_cache, v_cache = kv[0][:B, :, :self.kv_len], kv[1][:B, :, :self.kv_len]
        return ops.rotary_attention_decode(q, k, v, rope[0], rope[1], positions, k_cache, v_cache, self.positions,
                                           self.lengths).unsqueeze(2)


@dataclass
class Verify:
    """T tokens per sequence at positions starts[b] .. starts[b] + T - 1 (starts int64 [B] on the device): a
    speculative block (the last accepted token and T - 1 proposed ones), scored in one fixed-shape pass.

    Row b's K/V go into cache row b at those positions (clamped to the cache's last position kv_len - 1,
    which only idle rows reach), then query i attends to 0 .. starts[b] + i. Nothing is read back to the host,
    so a step of these can be captured in a CUDA graph.
    """

    starts: torch.Tensor
    kv_len: int

    def positions(self, B: int, T: int, device) -> torch.Tensor:
        """int64 [B, T]: each token's position in the cache."""
        offsets = torch.arange(T, device=device)
        return (self.starts[:, None] + offsets).clamp_(max=self.kv_len - 1)

    def attend(self, ops: Backend, q, k, v, kv: tuple, rope: tuple, positions) -> torch.Tensor:
        """q [B,H,T,D], k/v [B,Hkv,T,D] (not yet rotated) -> [B,H,T,D]; k/v written into the cache first."""
        q, k = ops.rotary(q, k, rope[0], rope[1], positions)
        B, Hkv, T, D = k.shape
        k_cache, v_cache = kv[0][:B, :, :self.kv_len], kv[1][:B, :, :self.kv_len]
        at = positions[:, None, :, None].expand(B, Hkv, T, D)
        k_cache.scatter_(2, at, k.to(k_cache.dtype))
        v_cache.scatter_(2, at, v.to(v_cache.dtype))
        return ops.attention_verify(q, k_cache, v_cache, self.starts)


class Attention(nn.Module):
    """Under tensor parallelism each rank holds a slice of the heads (args are the rank's) and `reduce` sums
    the ranks' partial wo outputs in place (`codellama_rt.distributed`); None: the whole model is here."""

    def __init__(self, args: ModelArgs, dtype, device, linear_device=None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = Linear(args.q_dim + 2 * args.kv_dim, args.dim, dtype, linear_device or device)
        self.wo = Linear(args.dim, args.q_dim, dtype, linear_device or device)
        self.reduce: Optional[Callable[[torch.Tensor], None]] = None

    def forward(self, ops: Backend, x, residual, norm_weight, eps, rope, positions, step, kv):
        """Pre-norm attention of the stream x + residual: (output [B, T, dim], new residual)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv, residual = self.wqkv.normed(ops, x, residual, norm_weight, eps)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        out = step.attend(ops, q, k, v, kv, rope, positions)  # [B, H, T, D]
        out = self.wo(ops, out.transpose(1, 2).reshape(B, T, H * D))
        if self.reduce is not None:
            self.reduce(out)
        return out, residual


class FeedForward(nn.Module):
    """`reduce`: as Attention's, for w2's partial outputs (each rank holds a slice of the FFN columns)."""

    def __init__(self, args: ModelArgs, dtype, device, linear_device=None):
        super().__init__()
        self.w13 = Linear(2 * args.ffn_dim, args.dim, dtype, linear_device or device)
        self.w2 = Linear(args.dim, args.ffn_dim, dtype, linear_device or device)
        self.reduce: Optional[Callable[[torch.Tensor], None]] = None

    def forward(self, ops: Backend, x, residual, norm_weight, eps):
        """Pre-norm SwiGLU MLP of the stream x + residual: (output, new residual)."""
        act, residual = self.w13.normed(ops, x, residual, norm_weight, eps, swiglu=True)
        out = self.w2(ops, act)
        if self.reduce is not None:
            self.reduce(out)
        return out, residual


class Block(nn.Module):
    def __init__(self, args: ModelArgs, dtype, device, linear_device=None):
        super().__init__()
        self.eps = args.norm_eps
        self.attn_norm = _param(args.dim, dtype=dtype, device=device)
        self.attn = Attention(args, dtype, device, linear_device)
        self.mlp_norm = _param(args.dim, dtype=dtype, device=device)
        self.mlp = FeedForward(args, dtype, device, linear_device)

    def forward(self, ops: Backend, x, residual, rope, positions, step, kv):
        """x: output of the previous block (not yet added); residual: the stream before it (or None)."""
        x, residual = self.attn(ops, x, residual, self.attn_norm, self.eps, rope, positions, step, kv)
        return self.mlp(ops, x, residual, self.mlp_norm, self.eps)


class Transformer(nn.Module):
    """Parameters (V = vocab_size):
    tok_embeddings [V, dim]; layers[i].attn_norm [dim]; layers[i].attn.wqkv [(H + 2 Hkv) D, dim];
    layers[i].attn.wo [dim, H D]; layers[i].mlp_norm [dim]; layers[i].mlp.w13 [2 ffn, dim];
    layers[i].mlp.w2 [dim, ffn]; norm [dim]; output [V, dim] (the embedding when tied).
    Projections are `Linear` modules (their `.weight`), or `QuantLinear` once quantized (`codellama_rt.quant.linear`).

    linear_device: where the blocks' projection weights and an untied lm_head are allocated (default: `device`);
    "meta" allocates nothing, for a loader that fills or quantizes them one projection at a time.
    """

    def __init__(self, args: ModelArgs, ops: Backend, dtype=torch.float32, device="cpu", rope_len=None,
                 linear_device=None):
        super().__init__()
        self.args, self.ops = args, ops
        self.tok_embeddings = _param(args.vocab_size, args.dim, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(args, dtype, device, linear_device) for _ in range(args.n_layers))
        self.norm = _param(args.dim, dtype=dtype, device=device)
        self.output = Linear(args.vocab_size, args.dim, dtype, device if args.tie_word_embeddings else
                             linear_device or device)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings
        cos, sin = rope_tables(args.head_dim, rope_len or args.max_seq_len, args.rope_theta,
                               args.rope_factor, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Set by what keeps state made from the weights (an engine's cached prompts, the native decoder): from then
        # on the weights must not change in place (quantize_gptq refuses such a model).
        self.weights_in_use = False

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    def forward(self, tokens: torch.Tensor, step, cache: Optional[KVCache] = None,
                positions: Optional[torch.Tensor] = None,
                last_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens: int64 [B, T] -> fp32 logits [B, T, V], or [B, V] at `last_index` (int64 [B]).

        step: `Prefill(start)`, `Decode(positions, kv_len)` or `Verify(starts, kv_len)`; positions [B, T] default
        from the step.
        """
        B, T = tokens.shape
        if positions is None:
            positions = step.positions[:, None] if isinstance(step, Decode) else step.positions(B, T, tokens.device)
        rope = (self.rope_cos, self.rope_sin)
        x, residual = self.tok_embeddings[tokens], None
        for i, layer in enumerate(self.layers):
            kv = cache.layer(i) if cache is not None else None
            x, residual = layer(self.ops, x, residual, rope, positions, step, kv)
        x, _ = self.ops.rms_norm(x, self.norm, self.args.norm_eps, residual)
        if last_index is not None:
            x = x[torch.arange(B, device=x.device), last_index]  # [B, dim]
        return self.output(self.ops, x).float()
