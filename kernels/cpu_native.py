"""The native CPU kernels (csrc/, built at install as `codellama_rt._cpu_native` where a C++ compiler exists;
the projections are the torch ops `torch.ops.codellama_rt_cpu.*`) and the Python side of them: fp32
activations against fp32, int8, int4 and NF4 weights, and a `Decoder` running a whole decode step of a Llama
model in C++ (no per-op Python, no op dispatch; runtime/model/native_decoder.py).

Without the extension every entry point here falls back to the PyTorch path (`available()` is False, and
`notice()` says so once). Projections: x [M, K] fp32 rows, all M rows against each weight row read once,
threads from torch's pool (`torch.set_num_threads`). int4 weights are repacked once per weight (cached on
it) into 16-byte chunks of 32 codes (byte j: code j in the low nibble, code 16 + j in the high one) with
fp32 scales and scale x zero products per group; the kernel applies W = q s - z s (a per-group table of
the 16 values with AVX-512), equal to `int4_linear_ref`'s (q - z) s products to fp32 rounding. NF4 weights
(bitsandbytes' layout) go through the same kernel: their codes repacked into that chunk order, the blocks'
absmax (double quant undone once) as the group scales (one per block, or per 32-weight chunk where blocks
straddle rows), no zero points, and the codebook as the 16 levels: W = code[q] absmax, bitsandbytes' fp32
products exactly. Where the kernels are built for AVX2 (`integer_activations`), decode rows are rounded to
integers first (the same bits here and in csrc/), so the products are integers, summed exactly within a block:
to int16 in blocks of 64 against int8 weights (`int8_format.quantize_x16`: 16 weights take three vector
instructions instead of six; one row ~1.2-1.4x the fp32 products' rate, the 9 rows of a verify pass ~0.7x),
to int8 in blocks of 32 against int4 weights (`int8_format.quantize_x8`, llama.cpp's q4_0 x q8_0 arithmetic:
vpmaddubsw on a chunk's 32 codes; one row ~1.2x, nine ~1.4x).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from .cpu_gemm import NATIVE_MAX_ROWS, gemm, linear_bf16, prefill_in_bf16
from .int4_cpu_format import CHUNK as INT4_CHUNK
from .int4_cpu_format import (Int4CpuWeight, Nf4CpuWeight, dequantize_int4_cpu, dequantize_nf4_cpu,  # noqa: F401
                              nf4_group, nf4_supported)  # (nf4_group re-exported)
from .int4_format import Int4Weight
from .int8_format import Int8Weight, dequantize_int8
from .nf4_format import NF4Weight, dequantize_nf4
from .options import DEFAULT_OPTIONS, KernelOptions
from .weight_cache import derived

try:
    from codellama_rt import _cpu_native as _ext
except ImportError:  # no compiler at install time (or a source checkout never built): the PyTorch path
    _ext = None

# Past NATIVE_MAX_ROWS rows (prefill) a GEMM on the dequantized weight (`cpu_gemm`) is faster than the native
# row-by-row kernels.
_NATIVE_COPY = "_cpu_native_copy"  # attribute of an Int4Weight / NF4Weight holding its native-layout copy
_NO_ZEROS = torch.empty(0)        # the int4 kernel's zs when a format has no zero points (NF4)
PREFILL_CHUNK = 1 << 20           # weights dequantized at a time for a prefill GEMM (4 MiB in fp32)
_noticed = False


def available() -> bool:
    """Whether the native extension was built and imports."""
    return _ext is not None


def notice() -> None:
    """Say once per process, on stderr, that the native CPU kernels are missing (the PyTorch path runs)."""
    global _noticed
    if _ext is None and not _noticed:
        _noticed = True
        print("codellama-rt: native CPU kernels not built (no C++ compiler at install?); using the slower PyTorch "
              "path. Reinstall with a compiler (scripts/setup.sh) to build them.", file=sys.stderr)


def extension():
    """The loaded extension module (RuntimeError without it)."""
    if _ext is None:
        raise RuntimeError("the native CPU kernels (codellama_rt._cpu_native) are not built")
    return _ext


def _native_fp32(x: torch.Tensor, weight_device: torch.device) -> bool:
    """Whether the extension is built and takes x: fp32 activations and the weight on the CPU."""
    return _ext is not None and x.device.type == "cpu" and weight_device.type == "cpu" and x.dtype == torch.float32


def _few_rows(x: torch.Tensor) -> bool:
    return x.numel() // max(x.shape[-1], 1) <= NATIVE_MAX_ROWS


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def argmax_rows(x: torch.Tensor, nonfinite: int) -> torch.Tensor:
    """Each row's first index of its largest value, or `nonfinite` where that value is not finite (the row
    holds NaN or +inf, or only -inf): x [B, V] -> int64 [B]. Contiguous fp32 CPU rows take one native pass
    (torch's argmax compares one value at a time: ~100 us for 9 rows of a 32k vocabulary, ~9% of a verify
    pass on the default model); elsewhere torch.argmax and an isfinite check of each row's max."""
    if (_ext is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.shape[1] > 0 and x.is_contiguous()):
        return _ext.argmax_rows(x, nonfinite)
    return torch.argmax(x, dim=-1).masked_fill_(~torch.isfinite(x.amax(dim=-1)), nonfinite)


def greedy_acceptor():
    """The native greedy acceptance of a verify pass (`accept_greedy` in csrc/cpu_native.cpp: one call for
    verify_graph's ~15 torch ops on rows that are all greedy, without penalty or logprobs), or None without
    the extension. Signature: (logits fp32 [B * T, V], proposals int64 [B, >= T - 1], proposed [B], out
    [B, >= T + 1], tokens [B], positions [B], counters [B], last position, vocab_limit, nonfinite id)."""
    return None if _ext is None else _ext.accept_greedy


# ---- int8 ---------------------------------------------------------------------------------------

def int8_scales_f32(w: Int8Weight) -> torch.Tensor:
    """w's scales as fp32 (the tensor itself when they are fp32 already)."""
    return w.scales if w.scales.dtype == torch.float32 else w.scales.float()


def integer_activations(options: KernelOptions) -> bool:
    """Whether decode rows of int8 and int4 weights (int4: levels 0 .. 15, not NF4) take the native kernels'
    integer-activation paths (`options.cpu_integer_activations`, where the extension is built for AVX2 without
    AVX-512: the paths measured there; elsewhere they run, but untuned)."""
    return options.cpu_integer_activations and _ext is not None and _ext.isa() == "avx2"


def int8_linear_cpu(x: torch.Tensor, w: Int8Weight, *, options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype, as `int8_linear_ref`: the native kernel for up to NATIVE_MAX_ROWS
    fp32 rows on the CPU (products q x in fp32, the row's scale applied to the sum; where
    `integer_activations(options)`, x rounded as `int8_format.quantize_x16`, integer products:
    `int8_linear_x16_ref`); more rows on the weight dequantized for the call, in bf16 where `prefill_in_bf16`,
    else through `cpu_gemm.gemm` (the reference's arithmetic; F.linear off the CPU)."""
    bf16 = prefill_in_bf16(x, w.device, options)
    if bf16 or (_native_fp32(x, w.device) and not _few_rows(x)):
        def rows(part: slice) -> torch.Tensor:  # (the fp32 products, rounded by _prefill_in_chunks for bf16)
            return w.qweight[part].float() * w.scales[part].float()[:, None]

        return _prefill_in_chunks(x, w.shape[0], rows, bf16)
    if not (_native_fp32(x, w.device) and _few_rows(x)):
        return gemm(x, dequantize_int8(w, x.dtype))  # the reference's arithmetic (F.linear off the CPU)
    w.check("int8_linear_cpu")
    out = torch.ops.codellama_rt_cpu.linear_int8(_rows(x), w.qweight, int8_scales_f32(w).contiguous(),
                                                 integer_activations(options))
    return out.reshape(*x.shape[:-1], w.shape[0])


# ---- int4 ---------------------------------------------------------------------------------------

def int4_supported(w: Int4Weight) -> bool:
    """Whether the native int4 kernel takes this weight (input width and group size multiples of 32)."""
    return w.shape[1] % INT4_CHUNK == 0 and w.group_size % INT4_CHUNK == 0


def _int4_kernel(x: torch.Tensor, packed: tuple, group: int, levels: Optional[torch.Tensor], n_out: int,
                 options: KernelOptions) -> torch.Tensor:
    """x @ W^T through the native int4 kernel on `packed` (codes, scales, zs): up to NATIVE_MAX_ROWS rows
    directly; more (prefill) on the natively dequantized fp32 weight through `cpu_gemm` (bf16 where
    `prefill_in_bf16`)."""
    codes, s, zs = packed
    if not _few_rows(x):
        return _int4_prefill(x, packed, group, levels, n_out, prefill_in_bf16(x, codes.device, options))
    x8 = levels is None and integer_activations(options)  # (x rounded to int8 blocks: int8_format.quantize_x8)
    out = torch.ops.codellama_rt_cpu.linear_int4(_rows(x), codes, s, zs, group, levels, x8)
    return out.reshape(*x.shape[:-1], n_out)


def _int4_prefill(x: torch.Tensor, packed: tuple, group: int, levels: Optional[torch.Tensor], n_out: int,
                  bf16: bool) -> torch.Tensor:
    """`_int4_kernel` past NATIVE_MAX_ROWS rows: the native dequantization, a chunk of output rows at a time
    (`_prefill_in_chunks`), so the dequantized weight never exists whole (a 7B w13 would take ~540 MB a call)."""
    codes, s, zs = packed

    def rows(part: slice) -> torch.Tensor:
        return torch.ops.codellama_rt_cpu.dequantize_int4(codes[part], s[part], zs[part] if zs.numel() else zs,
                                                          group, levels)

    return _prefill_in_chunks(x, n_out, rows, bf16)


def _prefill_in_chunks(x: torch.Tensor, n_out: int, dense_rows, bf16: bool) -> torch.Tensor:
    """x [..., in] fp32 @ W^T -> fp32 [..., n_out], W's output rows PREFILL_CHUNK weights' worth at a time from
    `dense_rows(slice)` (fp32 [rows, in]) through `cpu_gemm.gemm`; with `bf16`, x and the rows rounded to bf16,
    fp32 sums, the output rounded to bf16 (`linear_bf16`'s arithmetic)."""
    rows = _rows(x)
    xs = rows.to(torch.bfloat16) if bf16 else rows
    out = torch.empty(rows.shape[0], n_out, dtype=torch.float32, device=rows.device)
    step = max(1, PREFILL_CHUNK // max(rows.shape[1], 1))
    for r in range(0, n_out, step):
        part = slice(r, min(r + step, n_out))
        dense = dense_rows(part)
        out[:, part] = gemm(xs, dense.to(torch.bfloat16) if bf16 else dense)
    return out.reshape(*x.shape[:-1], n_out)


def int4_linear_native(x: torch.Tensor, w: Int4Weight, *,
                       options: KernelOptions = DEFAULT_OPTIONS) -> Optional[torch.Tensor]:
    """The native kernel's x @ dequant(w)^T for up to NATIVE_MAX_ROWS fp32 rows on the CPU; for more rows
    (prefill) the native dequantization into fp32, then `cpu_gemm`'s GEMM (in bf16 where `prefill_in_bf16`); None
    where neither can run (not fp32 on the CPU, no extension, widths or groups not multiples of 32: the caller
    picks another path)."""
    if not _native_fp32(x, w.device) or not int4_supported(w):
        return None
    return int4_cpu_linear_cpu(x, native_copy(w), options=options)


def int4_cpu_linear_cpu(x: torch.Tensor, w: Int4CpuWeight, *,
                        options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """The cpu backend's projection of a weight in the native layout (`Int4CpuWeight`, no repack to make): the
    native kernel for fp32 rows on the CPU as `int4_linear_native`, else the reference's arithmetic (prefill rows
    in bf16 where `prefill_in_bf16`)."""
    if _native_fp32(x, w.device):
        return _int4_kernel(x, (w.codes, w.scales, w.zs), w.group_size, None, w.shape[0], options)
    if prefill_in_bf16(x, w.device, options):
        return linear_bf16(x, dequantize_int4_cpu(w, torch.bfloat16))
    return gemm(x, dequantize_int4_cpu(w, x.dtype))


def native_copy(w):
    """An Int4Weight / NF4Weight in the native kernels' layout (`Int4CpuWeight` / `Nf4CpuWeight`), made on first
    use and kept on the weight: for weights a model holds in their checkpoint layout (the reference backend's,
    a model quantized after loading); ValueError where the kernels cannot take it."""
    return derived(w, _NATIVE_COPY, lambda: Int4CpuWeight.from_int4(w) if w.format == "int4"
                   else Nf4CpuWeight.from_nf4(w))


def cpu_layout(part):
    """The cpu backend's `held_part`: an int4 or NF4 part the native kernels take (on the CPU, widths, groups and
    blocks multiples of 32, the extension built) as an `Int4CpuWeight` / `Nf4CpuWeight`, so the weight is held
    once, in the kernels' layout, where the checkpoint layout's tensors plus the repack made at first use held
    it twice; any other part as it is."""
    if _ext is None:
        return part
    if part.format == "int4" and part.qweight.device.type == "cpu" and int4_supported(part):
        return Int4CpuWeight.from_int4(part)
    if part.format == "nf4" and part.codes.device.type == "cpu" and nf4_supported(part):
        return Nf4CpuWeight.from_nf4(part)
    return part


# ---- NF4 ------------------------------------------------------------------------------------------

def nf4_linear_native(x: torch.Tensor, w: NF4Weight, *,
                      options: KernelOptions = DEFAULT_OPTIONS) -> Optional[torch.Tensor]:
    """`int4_linear_native` for an NF4 weight: the native kernel for up to NATIVE_MAX_ROWS fp32 rows on the CPU
    (sums of code[q] x per block times the block's absmax), more rows on the natively dequantized weight
    (bitwise `dequantize_nf4(w, torch.float32)`) through `cpu_gemm` (bf16 where `prefill_in_bf16`); None where
    neither applies (the caller runs the reference)."""
    if not _native_fp32(x, w.codes.device) or not nf4_supported(w):
        return None
    return nf4_cpu_linear_cpu(x, native_copy(w), options=options)


def nf4_cpu_linear_cpu(x: torch.Tensor, w: Nf4CpuWeight, *,
                       options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """The cpu backend's projection of an NF4 weight in the native layout (`Nf4CpuWeight`): the native kernel for
    fp32 rows on the CPU as `nf4_linear_native`, else `nf4_cpu_linear_ref`'s arithmetic (prefill rows in bf16
    where `prefill_in_bf16`)."""
    if _native_fp32(x, w.device):
        return _int4_kernel(x, (w.codes, w.scales, _NO_ZEROS), w.group_size, w.levels, w.shape[0], options)
    if prefill_in_bf16(x, w.device, options):
        return linear_bf16(x, dequantize_nf4_cpu(w, torch.bfloat16))
    return gemm(x, dequantize_nf4_cpu(w).to(x.dtype))


def nf4_linear_cpu(x: torch.Tensor, w: NF4Weight, *, options: KernelOptions = DEFAULT_OPTIONS) -> torch.Tensor:
    """The cpu backend's NF4 projection: `nf4_linear_native` where it applies, else `nf4.nf4_linear_ref`'s
    arithmetic (the weight dequantized as bitsandbytes does, then the GEMM: `cpu_gemm.gemm`, F.linear off the
    CPU), prefill rows in bf16 where `prefill_in_bf16`."""
    native = nf4_linear_native(x, w, options=options)
    if native is not None:
        return native
    if prefill_in_bf16(x, w.codes.device, options):
        return linear_bf16(x, dequantize_nf4(w, torch.bfloat16))
    return gemm(x, dequantize_nf4(w).to(x.dtype))
