"""Shared Triton plumbing: one kernel source, run compiled on CUDA and interpreted on CPU, and
ahead-of-time compilation for a given GPU architecture (no GPU needed) with a resource report.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


class Kernel:
    """A Triton kernel usable on both devices: `kernel.on(tensor)[grid](*args, **constexprs)` launches
    the compiled kernel for CUDA tensors and the interpreter (as TRITON_INTERPRET=1 would) for CPU
    tensors, so the same source is what the CPU tests check and what the GPU runs."""

    def __init__(self, fn, **jit_kwargs):
        self.fn = fn
        self.jit = JITFunction(fn, **jit_kwargs)
        self.interp = InterpretedFunction(fn, **jit_kwargs)
        self.__name__ = fn.__name__

    def on(self, tensor: torch.Tensor):
        return self.jit if tensor.is_cuda else self.interp


def kernel(fn=None, **jit_kwargs):
    """Decorator: like `triton.jit`, but returns a `Kernel` that also runs on CPU tensors."""
    if fn is None:
        return lambda f: Kernel(f, **jit_kwargs)
    return Kernel(fn, **jit_kwargs)


# ---- ahead-of-time compilation ---------------------------------------------------------------

@dataclass(frozen=True)
class LaunchConfig:
    """One specialisation a launcher really uses, for AOT compilation.

    signature: argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr", ...);
    constexprs: values of the constexpr arguments.
    """

    kernel: Kernel
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""


@dataclass(frozen=True)
class CompiledResources:
    kernel: str
    label: str
    arch: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int
    num_warps: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


# Shared memory a block may use (opt-in maximum) per architecture.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_for(cfg: LaunchConfig, arch: int) -> CompiledResources:
    """Compile `cfg` for sm_<arch> without a GPU; report registers, shared memory and spills."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=cfg.kernel.jit, signature=cfg.signature, constexprs=cfg.constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    cubin = compiled.asm["cubin"]
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return CompiledResources(kernel=cfg.kernel.__name__, label=cfg.label, arch=arch,
                             registers=int(fields.get("REG", 0)),
                             shared_bytes=max(int(fields.get("SHARED", 0)), int(compiled.metadata.shared)),
                             stack_bytes=int(fields.get("STACK", 0)), local_bytes=int(fields.get("LOCAL", 0)),
                             num_warps=cfg.num_warps)


def triton_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
