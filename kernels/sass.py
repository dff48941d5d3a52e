"""Static statistics of a 4-bit kernel's main loop in its SASS, without a GPU (issue 20's targets): SASS
instructions per weight (target <= 1.5) and the global-load bytes each SM has in flight per trip of the
loop (target >= 32 KiB: Little's law at ~4.8 TB/s and ~1 us of DRAM latency over 132 SMs).

The main loop is the backward branch spanning the most instructions. Per trip, a program dequantizes
`WEIGHTS_PER_TRIP[kernel](constexprs)` weights; per thread that is divided by 32 x num_warps. Bytes in
flight: the widths of the loop's global loads (LDG, LDGSTS) summed per thread, times the threads of the
CTAs one SM holds (limited by registers, warps, shared memory and 32 CTAs). It is an estimate of what one
trip asks for at once, not a measurement, and it counts loads that hit a cache (x, scales, NF4's code
table) as well as the weight stream.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton

from ._triton import SHARED_LIMIT, LaunchConfig, compile_for, compile_kernel

WEIGHTS_PER_TRIP = {
    "_int4_gemv_kernel": lambda c: c["BLOCK_K"] * c["BLOCK_N"],
    "_int4_gemv_mma_kernel": lambda c: c["BLOCK_K"] * c["BLOCK_N"],
    "_int4_gemm_kernel": lambda c: c["BLOCK_K"] * c["BLOCK_N"],
    "_int4_frag_gemv_kernel": lambda c: max(c["GROUP_SIZE"], 64) * c["BLOCK_N"],  # a group (two of 32) a trip
    "_nf4_gemv_kernel": lambda c: 64 * c["BLOCK_N"],  # one quantization block of 64 along K per trip
    "_nf4_gemm_kernel": lambda c: 64 * c["BLOCK_N"],
    "_nf4_frag_gemv_kernel": lambda c: 64 * c["CHUNKS"] * c["BLOCK_N"],  # CHUNKS NF4 blocks a trip
}
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 65536, 64, 32
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


@dataclass
class LoopStats:
    kernel: str
    label: str
    arch: int
    instructions: int           # in the main loop's body
    weights_per_thread: float   # dequantized per trip by one thread
    load_bytes_per_thread: int  # global loads per trip by one thread
    threads: int                # per CTA
    ctas_per_sm: int

    @property
    def per_weight(self) -> float:
        return self.instructions / self.weights_per_thread

    @property
    def in_flight_kib(self) -> float:
        return self.load_bytes_per_thread * self.threads * self.ctas_per_sm / 1024


def disassemble(cubin: bytes) -> list[str]:
    """nvdisasm's lines of `cubin` (Triton's bundled nvdisasm)."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def main_loop(lines: list[str]) -> list[str]:
    """The instructions of the loop whose backward branch spans the most of them (empty when none loops)."""
    code, labels = [], {}
    for line in lines:
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(code)
            continue
        ins = _INSTRUCTION.search(line)
        if ins:
            code.append(ins.group(2))
    best = []
    for i, ins in enumerate(code):
        target = _BRANCH.search(ins)
        if target and labels.get(target.group(1), i + 1) < i and i + 1 - labels[target.group(1)] > len(best):
            best = code[labels[target.group(1)]:i + 1]
    return best if len(best) > 1 else []  # a one-instruction loop is the trap after EXIT


def load_bytes(instructions: list[str]) -> int:
    """Bytes the global loads among `instructions` read per thread (LDG and the cp.async LDGSTS)."""
    total = 0
    for ins in instructions:
        op = re.search(r"\b(LDG|LDGSTS)(\.[\w.]+)?", ins)
        if not op:
            continue
        mods = (op.group(2) or "").split(".")
        width = next((int(m) // 8 for m in mods if m in ("64", "128")), None)
        if width is None:
            width = next((1 if m[1:] == "8" else 2 for m in mods if m in ("U8", "S8", "U16", "S16")), 4)
        total += width
    return total


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """CTAs one SM holds: registers (allocated per warp in units of 256), warps, shared memory, 32."""
    per_warp = -(-registers * 32 // 256) * 256
    fits = [REGISTERS_PER_SM // max(per_warp * num_warps, 1), MAX_WARPS_PER_SM // num_warps, MAX_CTAS_PER_SM]
    if shared_bytes:
        fits.append(SHARED_LIMIT[arch] // shared_bytes)
    return max(min(fits), 0)


def loop_stats(cfg: LaunchConfig, arch: int = 90) -> LoopStats:
    """The main-loop statistics of `cfg` compiled for sm_<arch>."""
    weights = WEIGHTS_PER_TRIP.get(cfg.kernel.__name__)
    if weights is None:
        raise ValueError(f"{cfg.kernel.__name__}: not a 4-bit kernel with a known trip size "
                         f"(one of {', '.join(WEIGHTS_PER_TRIP)})")
    resources = compile_for(cfg, arch)
    loop = main_loop(disassemble(compile_kernel(cfg, arch).asm["cubin"]))
    threads = 32 * cfg.num_warps
    return LoopStats(kernel=cfg.kernel.__name__, label=cfg.label, arch=arch, instructions=len(loop),
                     weights_per_thread=weights(dict(cfg.constexprs)) / threads, load_bytes_per_thread=load_bytes(loop),
                     threads=threads,
                     ctas_per_sm=ctas_per_sm(resources.registers, cfg.num_warps, resources.shared_bytes, arch))


def four_bit_configs(models) -> list[LaunchConfig]:
    """The int4 and NF4 configs of `models` whose kernels have a main loop over weights."""
    from . import int4, int4_frag, nf4, nf4_frag

    configs = (int4.aot_configs(models) + int4_frag.aot_configs(models) + nf4.aot_configs(models)
               + nf4_frag.aot_configs(models))
    return [c for c in configs if c.kernel.__name__ in WEIGHTS_PER_TRIP]


def four_bit_loops(models, arch: int = 90) -> list[LoopStats]:
    """`loop_stats` of every 4-bit config of `models` (ModelShapes) at sm_<arch>."""
    return [loop_stats(c, arch) for c in four_bit_configs(models)]


TITLE = "4-bit main loops (sm_90; targets: <= 1.5 SASS instructions per weight, >= 32 KiB in flight per SM)"


def format_table(rows: list[LoopStats]) -> str:
    lines = ["| kernel | config | arch | loop instructions | weights / thread / trip | SASS / weight (<= 1.5) | "
             "load B / thread / trip | CTAs / SM | in flight / SM KiB (>= 32) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.label} | sm_{r.arch} | {r.instructions} | {r.weights_per_thread:g} | "
                     f"{r.per_weight:.2f} | {r.load_bytes_per_thread} | {r.ctas_per_sm} | {r.in_flight_kib:.1f} |")
    return "\n".join(lines)
