"""Patches of Triton's CPU interpreter (private functions of `triton.runtime.interpreter`) so that a kernel
runs on CPU tensors as it would on the GPU: device functions called from a kernel run interpreted, and
fp32 <-> bf16 conversions round as the GPU does. Imported only when a kernel is first launched on CPU
tensors (`_triton.Kernel.interp`); compiled CUDA launches never load it.

The patched names are private, so the shims are checked against the Triton versions they were written
for (SUPPORTED_TRITON, also pinned in setup.py) and refuse others with an ImportError naming the range.
"""
from __future__ import annotations

from contextlib import contextmanager

import triton

SUPPORTED_TRITON = ((3, 6), (3, 7))  # [lowest, first unsupported) major.minor: setup.py's triton>=3.6,<3.7
SUPPORTED_RANGE = ">=3.6,<3.7"


def check_triton_version(version: str) -> None:
    """ImportError unless Triton `version` lies in SUPPORTED_TRITON."""
    try:
        major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        major_minor = None
    lo, hi = SUPPORTED_TRITON
    if major_minor is None or not lo <= major_minor < hi:
        raise ImportError(f"codellama_rt's Triton interpreter shims (kernels/_interpreter_shims.py) patch private "
                          f"functions of triton.runtime.interpreter and support triton{SUPPORTED_RANGE}; found "
                          f"triton {version}. Install a supported Triton to run the kernels on CPU tensors "
                          f"(the compiled CUDA launches do not use the shims).")


check_triton_version(triton.__version__)

import numpy as np  # noqa: E402  (after the version check: the names below are Triton-version specific)
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.language.core as _tl_core  # noqa: E402,F401  (in this module's globals: see _every_language)
import triton.runtime.interpreter as _interpreter  # noqa: E402
from triton._C.libtriton import ir as _ir  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction, _patch_lang  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


_device_fns: dict = {}  # a device function -> its interpreted form


def _every_language():
    """Nothing: its globals (this module's) hold both triton.language and triton.language.core, the modules a
    kernel or a device function can reach the language through, so `_patch_lang` of it patches them all."""


@contextmanager
def _device_calls_interpreted():
    """While an interpreted grid runs, make `triton.jit` device functions the kernel calls (tl.sum, tl.max,
    tl.sigmoid, our own helpers) run interpreted too: outside TRITON_INTERPRET=1 they are JITFunctions,
    whose __call__ raises "Cannot call @triton.jit'd outside of the scope of a kernel". The language is
    patched once for the whole grid, through every module a function can name it by (the interpreter's own
    device calls re-patch and restore it at each call: a third of a decode step's time in the interpreter);
    the grid's own patch nests inside this one."""
    original = JITFunction.__call__

    def call(jit_fn, *args, **kwargs):
        fn = jit_fn.fn
        if fn not in _device_fns:
            _device_fns[fn] = InterpretedFunction(fn).rewrite()
        return _device_fns[fn](*args, **kwargs)

    scope = _patch_lang(_every_language)
    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original
        scope.restore()


_convert_float = _interpreter._convert_float


def _convert_float_as_gpu(data, src_dtype, dst_dtype, rounding_mode):
    """The interpreter's float conversion, with fp32 <-> bf16 done as on the GPU: fp32 -> bf16 rounded to
    nearest even (`cvt.rn.bf16.f32`; the interpreter truncates: up to 1 ulp off, biased) and bf16 -> fp32
    exact for subnormals too (the interpreter flushes some of them)."""
    if src_dtype == tl.float32 and dst_dtype == tl.bfloat16 and rounding_mode != _ir.ROUNDING_MODE.RTZ:
        f32 = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        return f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if src_dtype == tl.bfloat16 and dst_dtype == tl.float32:
        return (np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return _convert_float(data, src_dtype, dst_dtype, rounding_mode)


@contextmanager
def _bf16_rounding_as_gpu():
    _interpreter._convert_float = _convert_float_as_gpu
    try:
        yield
    finally:
        _interpreter._convert_float = _convert_float


class _Interpreted(InterpretedFunction):
    """The interpreter (as TRITON_INTERPRET=1 would run it), with device-function calls and fp32 -> bf16
    rounding as on the GPU. Still unlike the GPU: arithmetic directly on bf16 values (the interpreter
    stores them as uint16 and computes on the integers), so kernels upcast bf16 to fp32 first."""

    def run(self, *args, grid, warmup, **kwargs):
        with _device_calls_interpreted(), _bf16_rounding_as_gpu():
            return super().run(*args, grid=grid, warmup=warmup, **kwargs)


def interpreted(fn, **jit_kwargs) -> InterpretedFunction:
    """`fn` (a kernel's Python function) in the patched interpreter: `interpreted(fn)[grid](*args)` runs it
    on CPU tensors as TRITON_INTERPRET=1 would, with the patches above."""
    return _Interpreted(fn, **jit_kwargs)
