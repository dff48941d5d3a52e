"""Shared Triton helpers: the `kernel` decorator (one kernel source, run compiled on CUDA and interpreted on
CPU), launch helpers (cdiv, PDL, tickets, placeholders, SM counts) and ahead-of-time compilation for a
given GPU architecture (no GPU needed) with a resource report. The interpreter's patches live in
`_interpreter_shims`, imported on a kernel's first CPU launch only (never on the CUDA path).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.runtime.jit import JITFunction

from .options import KernelOptions


# ---- programmatic dependent launch (PDL) -------------------------------------------------------
#
# On Hopper a kernel launched with PDL may start while the kernel before it in the stream is finishing:
# its launch latency and the previous kernel's tail overlap instead of adding up, which matters in decode
# (hundreds of short kernels a step). A kernel takes part by having a `PDL: tl.constexpr = False` parameter
# and calling `pdl_prologue(PDL)` before its first global memory access: it lets the next kernel launch,
# then waits until the previous one has completed and its writes are visible (griddepcontrol), so no
# read or write can race. `Kernel.on` sets PDL=True and launches with PDL for such kernels on sm_90+
# unless the launch's KernelOptions say pdl=False (to measure its effect, or if a driver misbehaves).


def pdl_enabled(device: torch.device, options: KernelOptions | bool) -> bool:
    """Whether kernels with a PDL parameter launch with programmatic dependent launch on `device` under
    `options` (a KernelOptions, or its `pdl` flag)."""
    pdl = options.pdl if isinstance(options, KernelOptions) else options
    if device.type != "cuda" or not pdl:
        return False
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """With PDL: allow the next kernel to launch, then wait for the previous kernel (call it before any
    global memory access). Without: nothing."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


_PLACEHOLDERS: dict = {}


def placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for a pointer argument the launch never dereferences (a variant's unused
    inputs), so every launch of a kernel passes the same argument types."""
    key = (str(device), dtype)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros(1, dtype=dtype, device=device)
    return _PLACEHOLDERS[key]


# ---- tickets: "the last program to finish does the combine" --------------------------------------
#
# One-pass split reductions (decode attention, int4 split-K): each program stores its partial, then takes
# a ticket (an atomic add on its output block's counter); the one that draws the last ticket combines the
# partials and puts the counter back to zero. The counters are shared by every such kernel: stream order
# (and the PDL wait before any memory access) keeps two launches from using them at once.

_TICKETS: dict = {}  # device -> int32 counters, all zero between launches
_OUTGROWN: list = []  # counters replaced by bigger ones: a captured CUDA graph may still use them


def tickets(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed int32 counters on `device`, from a buffer kept for the life of the process (a captured
    graph holds its address); a bigger zeroed one replaces it when n outgrows it."""
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _TICKETS[device] = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
    return buf[:n]


@triton.jit
def last_to_finish(ticket_ptr, num_programs) -> tl.tensor:
    """After this program stored its partials: True in the one program (of the num_programs sharing
    ticket_ptr) that finishes last; every other program's stores are then visible to it (a barrier so
    all of this program's threads have stored, then acq_rel at GPU scope). That program must load the
    partials with cache_modifier=".cg" (other SMs wrote them; L1 is not coherent) and then call
    `ticket_reset`."""
    tl.debug_barrier()
    last = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == num_programs - 1
    tl.debug_barrier()
    return last


@triton.jit
def ticket_reset(ticket_ptr):
    tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")


class _PDLLaunch:
    """`jit[grid](...)` with PDL=True and the PDL launch attribute."""

    def __init__(self, jit: JITFunction):
        self.jit = jit

    def __getitem__(self, grid):
        launch = self.jit[grid]
        return lambda *args, **kwargs: launch(*args, **kwargs, PDL=True, launch_pdl=True)


class Kernel:
    """A Triton kernel usable on both devices: `kernel.on(tensor, options)[grid](*args, **constexprs)` launches
    the compiled kernel for CUDA tensors and the interpreter (as TRITON_INTERPRET=1 would) for CPU
    tensors, so the same source is what the CPU tests check and what the GPU runs. Kernels with a `PDL`
    parameter launch with programmatic dependent launch where `pdl_enabled` under the launch's options."""

    def __init__(self, fn, **jit_kwargs):
        self.fn = fn
        self.jit = JITFunction(fn, **jit_kwargs)
        self._jit_kwargs = jit_kwargs
        self.__name__ = fn.__name__
        self.has_pdl = "PDL" in self.jit.arg_names
        self._pdl = _PDLLaunch(self.jit) if self.has_pdl else None

    @functools.cached_property
    def interp(self):
        """The kernel in Triton's interpreter (with `_interpreter_shims`' patches), built on its first CPU
        launch: CUDA processes never import the shims."""
        from ._interpreter_shims import interpreted

        return interpreted(self.fn, **self._jit_kwargs)

    def on(self, tensor: torch.Tensor, options: KernelOptions | bool | None = None):
        """The launchable kernel for `tensor`'s device. options (a KernelOptions, or its `pdl` flag) is
        required for a kernel with a PDL parameter, so no launcher can leave its choice to a default."""
        if options is None and self.has_pdl:
            raise TypeError(f"{self.__name__}.on: a kernel with a PDL parameter needs the launch's options")
        if not tensor.is_cuda:
            return self.interp
        return self._pdl if self.has_pdl and pdl_enabled(tensor.device, options) else self.jit


class GluonKernel:
    """A Gluon kernel (`triton.experimental.gluon`: layouts stated, not inferred): launched on CUDA tensors
    and compiled ahead of time like a `Kernel`, never interpreted (Triton's interpreter runs no Gluon), so
    its launcher runs a Triton twin of it on CPU tensors and the tests compare the twin with the reference."""

    has_pdl = False

    def __init__(self, fn, **jit_kwargs):
        from triton.experimental import gluon

        self.fn = fn
        self.jit = gluon.jit(fn, **jit_kwargs)
        self.__name__ = fn.__name__

    def on(self, tensor: torch.Tensor, options: KernelOptions | bool | None = None):
        """The compiled kernel for a CUDA `tensor`; a ValueError for any other device."""
        if not tensor.is_cuda:
            raise ValueError(f"{self.__name__}: a Gluon kernel runs on CUDA tensors only, got {tensor.device}")
        return self.jit


H100_SMS = 132  # the SM count launch heuristics assume off the GPU (interpreter, AOT compiles)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` for launch heuristics: the GPU's count, H100_SMS off CUDA."""
    if device.type != "cuda":
        return H100_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of Python ints, for launchers: triton.cdiv called from the host goes through Triton's
    constexpr-function wrapper (~1.5 us a call, several calls a launch in eager decode)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (as triton.next_power_of_2, without its host-call cost)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def as_rows(t: torch.Tensor, width: int, label: str) -> torch.Tensor:
    """[..., width] -> a [rows, width] view with unit column stride (no copy), or a ValueError naming
    `label` (e.g. "swiglu: gate"). Launchers pass row strides to their kernels instead of copying."""
    if t.shape[-1] != width or (t.stride(-1) != 1 and width > 1):
        raise ValueError(f"{label} must be [..., {width}] with unit stride in the last dim, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    try:
        return t.view(-1, width)
    except RuntimeError:
        raise ValueError(f"{label}'s leading dims must flatten to one row stride (no copy is made), "
                         f"got shape {tuple(t.shape)} strides {t.stride()}") from None


def kernel(fn=None, **jit_kwargs):
    """Decorator: like `triton.jit`, but returns a `Kernel` that also runs on CPU tensors."""
    if fn is None:
        return lambda f: Kernel(f, **jit_kwargs)
    return Kernel(fn, **jit_kwargs)


def gluon_kernel(fn=None, **jit_kwargs):
    """Decorator: like `gluon.jit`, but returns a `GluonKernel` (launch and AOT compile as a `Kernel`)."""
    if fn is None:
        return lambda f: GluonKernel(f, **jit_kwargs)
    return GluonKernel(fn, **jit_kwargs)


# ---- ahead-of-time compilation ---------------------------------------------------------------

@dataclass(frozen=True)
class LaunchConfig:
    """One specialisation a launcher really uses, for AOT compilation.

    signature: argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr", ...);
    constexprs: values of the constexpr arguments.
    divisible_by_16: names of pointer/int arguments the JIT would specialise as multiples of 16
    (`tt.divisibility`: torch allocations, strides and sizes that are multiples of 16); without them the
    compile assumes nothing about alignment and does not vectorise, unlike the real launch.
    """

    kernel: Kernel | GluonKernel
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    divisible_by_16: tuple = ()


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


def launch_config(kern: Kernel, args: tuple, constexprs: dict, *, num_warps: int, num_stages: int = 3,
                  label: str = "") -> LaunchConfig:
    """The LaunchConfig the JIT would compile for `kern[grid](*args, **constexprs)`: every argument typed by
    Triton's own specialisation rule (ints equal to 1 become constexprs, multiples of 16 and 16-byte
    aligned pointers are marked divisible, `do_not_specialize` honoured). Tensors may be on the meta
    device, so a launcher's argument code can be run on the model's shapes without a GPU."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kern.jit.signature, kern.jit.params, CUDABackend)
    params, specialization, _ = binder(*args, **constexprs)
    signature, values, divisible = {}, {}, []
    for (name, value), (ty, attr) in zip(params.items(), specialization):
        signature[name] = ty
        if ty == "constexpr":
            values[name] = value
        elif isinstance(attr, str) and "D" in attr:
            divisible.append(name)
    return LaunchConfig(kernel=kern, signature=signature, constexprs=values, num_warps=num_warps,
                        num_stages=num_stages, label=label, divisible_by_16=tuple(divisible))


def add_config(configs: dict, cfg: LaunchConfig, label: str) -> None:
    """Keep `cfg`, labelled `label`, in `configs` (keyed by what the JIT specialises on: signature, constexprs,
    divisibility) unless a config of the same specialisation is there already (the first label stays)."""
    key = (tuple(cfg.signature.items()), tuple(cfg.constexprs.items()), cfg.divisible_by_16)
    if key not in configs:
        configs[key] = dataclasses.replace(cfg, label=label)


# Shared memory a block may use (opt-in maximum) per architecture.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_for(cfg: LaunchConfig, arch: int) -> CompiledResources:
    """Compile `cfg` for sm_<arch> without a GPU; report registers, shared memory and spills."""
    compiled = compile_kernel(cfg, arch)
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


def compile_kernel(cfg: LaunchConfig, arch: int):
    """triton.compile of `cfg` for sm_<arch> (no GPU needed), PDL as `Kernel.on` would launch it there."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    names = cfg.kernel.jit.arg_names
    unknown = set(cfg.divisible_by_16) - set(cfg.signature)
    if unknown:
        raise ValueError(f"{cfg.kernel.__name__} [{cfg.label}]: divisible_by_16 names unknown arguments "
                         f"{sorted(unknown)}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in cfg.divisible_by_16}
    constexprs = dict(cfg.constexprs)
    if cfg.kernel.has_pdl:  # as `Kernel.on` launches it on that architecture (griddepcontrol is sm_90+)
        constexprs["PDL"] = arch >= 90
    source = GluonASTSource if isinstance(cfg.kernel, GluonKernel) else ASTSource
    src = source(fn=cfg.kernel.jit, signature=cfg.signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def triton_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
