"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): int4, int8 and NF4 weights chosen on calibration text, in the
formats round-to-nearest writes (int4 in GPTQ's layout, int8 per row, NF4 as bitsandbytes stores it), so a model
quantized here loads, runs and exports (lite) like any checkpoint of its method.

Round-to-nearest treats every weight alone. GPTQ quantizes a projection's input columns one at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse of
H = sum over calibration tokens of x x^T (x: the projection's input there), which minimises the error of
the projection's outputs on those tokens rather than of its weights.

- The grid is round-to-nearest's, fixed beforehand from the original weights ("static groups"): int4's
  per-group scales and zero points, int8's per-row scales, NF4's double-quantized absmax per block of 64.
  Only the codes differ, so the files need no column permutation (desc_act=False, which every int4 kernel
  here reads) and an NF4 weight is still exactly a bitsandbytes one.
- Columns go in order of decreasing H diagonal ("act order").
- Blocks are quantized one after another, each from the outputs of the blocks already quantized, and
  within a block wqkv, wo, w13, w2 in turn ("true sequential"); the lm_head last, if asked.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..kernels.int4_format import GROUP_SIZES, Int4Weight, int4_group_params, pack_int4
from ..kernels.int8_format import QMAX as INT8_QMAX
from ..kernels.int8_format import Int8Weight, quantize_int8
from ..kernels.nf4_format import NF4Weight, quantize_nf4
from ..model.transformer import Linear, Prefill, Transformer
from .linear import NF4_BLOCKSIZE, QuantLinear, QuantPart, set_module

DAMP = 0.01          # added to H's diagonal, as a share of its mean (GPTQ's default)
BLOCK_COLUMNS = 128  # columns whose error updates the rest of the weight at once (a multiple of every g)
STAGES = ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2")  # a block's projections, in graph order


def gptq_int4(w: torch.Tensor, h: torch.Tensor, *, group_size: int = 128, damp: float = DAMP,
              dtype: Optional[torch.dtype] = None) -> Int4Weight:
    """w [out, in] (float) quantized with H = h [in, in] (fp32 or fp64, x^T x of its inputs, any scale) to an
    Int4Weight with scales in `dtype` (default w.dtype), on `quantize_int4`'s grid."""
    out_f, in_f = _check(w, h, damp, "gptq_int4")
    if group_size not in GROUP_SIZES or in_f % group_size:
        raise ValueError(f"gptq_int4: group_size={group_size} must be one of {GROUP_SIZES} and divide {in_f}")
    W, H = _without_dead_inputs(w, h)
    scales, zero = int4_group_params(W.view(out_f, -1, group_size), dtype or w.dtype)  # [out, groups]
    group = torch.arange(in_f, device=W.device) // group_size
    q = _gptq_codes(W, H, group, _uniform(scales.float(), zero, 0, 15), damp)
    return pack_int4(q, zero, scales, group_size)


def gptq_int8(w: torch.Tensor, h: torch.Tensor, *, damp: float = DAMP,
              dtype: Optional[torch.dtype] = None) -> Int8Weight:
    """As `gptq_int4`, to an Int8Weight on `quantize_int8`'s grid (one symmetric scale per output row)."""
    out_f, in_f = _check(w, h, damp, "gptq_int8")
    W, H = _without_dead_inputs(w, h)
    scales = quantize_int8(W, dtype=dtype or w.dtype).scales  # the grid only: codes come from GPTQ
    group = torch.zeros(in_f, dtype=torch.long, device=W.device)
    grid = _uniform(scales.float()[:, None], torch.zeros(out_f, 1, device=W.device), -INT8_QMAX, INT8_QMAX)
    q = _gptq_codes(W, H, group, grid, damp)
    return Int8Weight(qweight=q.to(torch.int8).contiguous(), scales=scales, shape=(out_f, in_f))


def gptq_nf4(w: torch.Tensor, h: torch.Tensor, *, damp: float = DAMP) -> NF4Weight:
    """As `gptq_int4`, to an NF4Weight in bitsandbytes' format (blocks of 64, absmax double-quantized), with the
    absmax `quantize_nf4` gives w: only the 4-bit codes differ from its, so bitsandbytes reads it as its own.
    The blocks must not straddle rows (in a multiple of 64)."""
    out_f, in_f = _check(w, h, damp, "gptq_nf4")
    if in_f % NF4_BLOCKSIZE:
        raise ValueError(f"gptq_nf4: in_features={in_f} is not a multiple of the NF4 block ({NF4_BLOCKSIZE})")
    W, H = _without_dead_inputs(w, h)
    rtn = quantize_nf4(W, blocksize=NF4_BLOCKSIZE, double_quant=True)
    scale = rtn.block_absmax().view(out_f, in_f // NF4_BLOCKSIZE)  # what dequantization multiplies by
    group = torch.arange(in_f, device=W.device) // NF4_BLOCKSIZE
    idx = _gptq_codes(W, H, group, _codebook(scale, rtn.code), damp).to(torch.uint8).reshape(-1)
    return dataclasses.replace(rtn, codes=((idx[0::2] << 4) | idx[1::2]).reshape(rtn.codes.shape), dtype=w.dtype)


def _uniform(scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> Callable:
    """The grid w = (q - zero) * scale, q in qmin..qmax (scale, zero: [out, groups] fp32) as `_gptq_codes`
    rounds a column to it: (v [out], its group) -> (codes, values)."""
    def nearest(v: torch.Tensor, g: int):
        s, z = scale[:, g], zero[:, g]
        q = (torch.round(v / s) + z).clamp_(qmin, qmax)
        return q, (q - z) * s
    return nearest


def _codebook(scale: torch.Tensor, code: torch.Tensor) -> Callable:
    """The grid w = code[q] * scale (code sorted, fp32 [16]; scale [out, groups]), nearest as bitsandbytes
    rounds: v / scale clamped to [-1, 1], bucketized against the codebook's midpoints."""
    mids = (code[1:] + code[:-1]) / 2

    def nearest(v: torch.Tensor, g: int):
        s = scale[:, g]
        q = torch.bucketize((v / s.clamp(min=1e-38)).clamp_(-1, 1), mids)
        return q, code[q] * s
    return nearest


def _check(w: torch.Tensor, h: torch.Tensor, damp: float, who: str) -> tuple[int, int]:
    if w.dim() != 2:
        raise ValueError(f"{who}: w must be [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(f"{who}: H has shape {tuple(h.shape)}, expected {(in_f, in_f)} for w {tuple(w.shape)}")
    if not 0 < damp < 1:
        raise ValueError(f"{who}: damp={damp} must be in (0, 1)")
    return out_f, in_f


def _without_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W fp32, H fp64) copies; inputs that were never nonzero get weight 0 and H diagonal 1."""
    W, H = w.detach().float().clone(), h.detach().double().clone()
    dead = torch.nonzero(H.diagonal() == 0).flatten()
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def _gptq_codes(W: torch.Tensor, H: torch.Tensor, group: torch.Tensor, nearest: Callable, damp: float) -> torch.Tensor:
    """The codes [out, in] (fp32, integers) of W [out, in] on a fixed grid, input column c in group[c] of it;
    `nearest(v, g)` rounds a column v [out] in group g: (codes, values). Columns go in order of decreasing H
    diagonal."""
    out_f, in_f = W.shape
    perm = torch.argsort(H.diagonal(), descending=True)
    W, H, group = W[:, perm], H[perm][:, perm], group[perm].tolist()  # (a list: no device tensor per column)
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    except torch.linalg.LinAlgError:
        raise ValueError("GPTQ: H is not positive definite even damped; raise damp or calibrate on more "
                         "tokens") from None
    Q = torch.empty_like(W)
    for a in range(0, in_f, BLOCK_COLUMNS):
        b = min(a + BLOCK_COLUMNS, in_f)
        W1, err = W[:, a:b].clone(), torch.empty(out_f, b - a, device=W.device)
        for i in range(b - a):
            c = a + i
            q, value = nearest(W1[:, i], group[c])
            Q[:, c] = q
            e = (W1[:, i] - value) / hinv[c, c]
            W1[:, i:] -= e[:, None] * hinv[c, c:b][None, :]
            err[:, i] = e
        W[:, b:] -= err @ hinv[a:b, b:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out


class _Recorded(Exception):
    """Raised by a `_Recorder` once it has its input: nothing after it in the block is needed for H."""


class _Recorder(nn.Module):
    """Stands in for a dense `Linear` while its block runs: adds x^T x of its inputs to `h`, then stops the
    block (`_Recorded`)."""

    def __init__(self, linear: Linear):
        super().__init__()
        self.linear = linear
        n = linear.weight.shape[1]
        self.h = torch.zeros(n, n, dtype=torch.float64, device=linear.weight.device)

    def _record(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).float()
        self.h += (x.t() @ x).double()
        raise _Recorded

    def forward(self, ops, x):
        self._record(x)

    def swiglu(self, ops, x):
        self._record(x)

    def normed(self, ops, x, residual, norm_weight, eps: float, swiglu: bool = False):
        self._record(ops.rms_norm(x, norm_weight, eps, residual)[0])


def _quantize_recorded(root: nn.Module, name: str, run: Callable[[], None],
                       quantize: Callable[[torch.Tensor, torch.Tensor], QuantPart]) -> None:
    """Swap the dense Linear `name` of `root` for a recorder, `run()` the calibration up to it, then replace it
    with its GPTQ-quantized QuantLinear."""
    module = root.get_submodule(name)
    if not isinstance(module, Linear):
        raise ValueError(f"GPTQ: {name} is already quantized ({type(module).__name__}); load the model dense")
    rec = _Recorder(module)
    set_module(root, name, rec)
    run()
    try:
        part = quantize(module.weight, rec.h)
    except ValueError as e:
        raise ValueError(f"{name} {list(module.weight.shape)}: {e}") from None
    set_module(root, name, QuantLinear([part]))


@torch.no_grad()
def quantize_gptq(transformer: Transformer, tokens: torch.Tensor, *, method: str = "int4", group_size: int = 128,
                  quantize_head: bool = False, damp: float = DAMP, batch: int = 8,
                  progress: Optional[Callable[[str], None]] = None) -> Transformer:
    """Swap the dense projections of `transformer` (and the lm_head with `quantize_head`) for `method` ("int4",
    groups of `group_size`, "int8" or "nf4") ones made by GPTQ on calibration `tokens` (int64 [N, T], each row a causal
    sequence from position 0). In place; returns it.

    Holds the N x T x dim activations (two copies, the model's dtype) and one projection's H [in, in] (fp64) at
    a time, besides the model."""
    if tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.numel() == 0:
        raise ValueError(f"GPTQ calibration tokens must be a non-empty int64 [N, T] tensor, got "
                         f"{tokens.dtype} {list(tokens.shape)}")
    if method == "int4":
        def quantize(w, h):
            return gptq_int4(w, h, group_size=group_size, damp=damp)
    elif method == "int8":
        def quantize(w, h):
            return gptq_int8(w, h, damp=damp)
    elif method == "nf4":
        def quantize(w, h):
            return gptq_nf4(w, h, damp=damp)
    else:
        raise ValueError(f"GPTQ: method {method!r} is not one of ('int4', 'int8', 'nf4')")
    if transformer.weights_in_use:
        raise ValueError("GPTQ: this model has already generated, and its engine keeps state made from the dense "
                         "weights (cached prompts' K / V, the native decoder); quantize a freshly loaded model")
    args = transformer.args
    if tokens.shape[1] > args.max_seq_len:
        raise ValueError(f"GPTQ calibration rows of {tokens.shape[1]} tokens exceed the model's context "
                         f"({args.max_seq_len})")
    if int(tokens.min()) < 0 or int(tokens.max()) >= args.vocab_size:
        raise ValueError(f"GPTQ calibration tokens must be ids in 0..{args.vocab_size - 1}")
    ops, device = transformer.ops, transformer.device
    rope = (transformer.rope_cos, transformer.rope_sin)
    chunks = [t.to(device) for t in tokens.split(batch)]
    xs = [transformer.tok_embeddings[t] for t in chunks]
    residuals = [None] * len(chunks)

    def run_block(block, update: bool) -> None:
        for k, x in enumerate(xs):
            B, T = x.shape[:2]
            try:
                out = block(ops, x, residuals[k], rope, Prefill(0).positions(B, T, device), Prefill(0), None)
            except _Recorded:
                continue
            if update:
                xs[k], residuals[k] = out

    for i, block in enumerate(transformer.layers):
        for stage in STAGES:
            _quantize_recorded(block, stage, lambda: run_block(block, False), quantize)
        run_block(block, True)
        if progress is not None:
            progress(f"GPTQ: block {i + 1}/{len(transformer.layers)}")
    if quantize_head:
        if args.tie_word_embeddings:
            transformer.output = Linear(args.vocab_size, args.dim, transformer.dtype, device)
            transformer.output.weight = nn.Parameter(transformer.tok_embeddings.detach().clone())

        def run_head() -> None:
            for x, r in zip(xs, residuals):
                try:
                    transformer.output(ops, ops.rms_norm(x, transformer.norm, args.norm_eps, r)[0])
                except _Recorded:
                    pass
        _quantize_recorded(transformer, "output", run_head, quantize)
    return transformer


def calibration_tokens(tokenizer, paths: Optional[list] = None, *, rows: int = 128, seq_len: int = 512,
                       seed: int = 0) -> torch.Tensor:
    """int64 [rows, seq_len]: windows of seq_len tokens at seeded random offsets of the text files under
    `paths` (files, or directories searched for files; default: the `.py` files of the running Python's
    standard library, without its test suites and installed packages), each file encoded after BOS and the
    files joined. Reads files in a seeded random order until it has 4 x rows x seq_len tokens; a file that is
    not UTF-8 text (or holds a NUL byte) is skipped."""
    for name, value in (("rows", rows), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"GPTQ calibration: {name}={value!r} is invalid: expected an integer >= 1")
    files = calibration_files(paths)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(files), generator=gen).tolist()
    ids, want, skipped = [], 4 * rows * seq_len, 0
    for k in order:
        try:  # (at most 8 characters a token still wanted: a huge file is not read, nor encoded, whole)
            with open(files[k], encoding="utf-8") as f:
                text = f.read(8 * (want - len(ids)) + 4096)
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        if "\0" in text:
            skipped += 1
            continue
        ids += tokenizer.encode(text, add_bos=True)
        if len(ids) >= want:
            break
    if len(ids) < rows * seq_len:
        not_text = f" ({skipped} skipped: not UTF-8 text)" if skipped else ""
        raise ValueError(f"GPTQ calibration: {len(files)} file(s){not_text} give {len(ids)} tokens; {rows} rows of "
                         f"{seq_len} need at least {rows * seq_len} (fewer --calibration-rows, or more text)")
    t = torch.tensor(ids, dtype=torch.int64)
    starts = torch.randperm(len(ids) - seq_len + 1, generator=gen)[:rows]
    return torch.stack([t[s:s + seq_len] for s in starts.tolist()])


def calibration_files(paths: Optional[list]) -> list[Path]:
    """The files `calibration_tokens` reads from `paths` (see there), sorted per path; ValueError naming a path
    that is missing or a directory without files."""
    if not paths:
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
        return [f for f in sorted(root.rglob("*.py")) if not skip.intersection(f.relative_to(root).parts[:-1])]
    files = []
    for p in (Path(p).expanduser() for p in paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith(".") or part == "__pycache__" for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"GPTQ calibration: {p} is neither a file nor a directory")
    if not files:
        raise ValueError(f"GPTQ calibration: no files under {[str(p) for p in paths]}")
    return files
