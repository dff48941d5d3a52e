"""Shared benchmark helpers: timing, copy bandwidth, the environment a report records, a time budget."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .provenance import provenance, run_command

AOT_PRESETS = (("CodeLlama-7b", "7B"), ("CodeLlama-34b", "34B"), ("CodeLlama-70b", "70B"))  # (preset, label)


def aot_models(presets=AOT_PRESETS) -> tuple:
    """The model shapes the kernels are compiled for ahead of time (`kernels.aot`): the presets' widths
    as `kernels.shapes.ModelShape`s (13B has 7B's head layout and widths in between)."""
    from ..model.config import PRESETS
    from ..kernels.shapes import ModelShape

    return tuple(ModelShape.of(PRESETS[name], label) for name, label in presets)


def bench(fn) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of a CUDA callable (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100))


def bench_host(fn, *, repeat: int = 7, warmup: int = 1) -> tuple[float, float, float]:
    """(median, min, max) wall milliseconds of a CPU callable."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def copy_bandwidth(device="cuda", nbytes: int = 2 ** 30) -> float:
    """Measured copy bandwidth in GB/s, counting the read and the write of `nbytes`
    (CUDA: device-to-device, do_bench median; CPU: host memory, median of 7)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = bench(lambda: dst.copy_(src))[0]
    else:
        src.fill_(1.0)
        ms = bench_host(lambda: dst.copy_(src))[0]
    return 2 * src.numel() * 4 / ms / 1e6


def memory_bandwidth(device) -> tuple[float, str]:
    """(GB/s, how it was measured) for the decode bound. CUDA: the device-to-device copy of 1 GiB (read +
    write counted). CPU: a read-only pass (sum) over 256 MiB, since a copy's write-allocate traffic would
    understate what decode, which only reads its weights, reaches there."""
    if torch.device(device).type == "cuda":
        return copy_bandwidth(device), "copy of 1 GiB, read + write counted"
    src = torch.ones(2 ** 26, dtype=torch.float32)
    ms = bench_host(lambda: src.sum())[0]
    return src.numel() * 4 / ms / 1e6, "read-only pass (sum) over 256 MiB"


class Budget:
    """Wall-clock seconds for a whole run: each unit of work asks before starting whether its
    estimate still fits, so a report finishes within its device call."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = float(seconds), time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment() -> dict:
    """Card, driver and versions: what every report's numbers are tagged with."""
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **provenance(),  # codellama_rt (version), package, source_digest, git_commit (or why it is unknown)
        "loadavg_start": loadavg(),  # CPU numbers mean little on a machine that is busy elsewhere
    }
    for mod in ("triton", "transformers", "matplotlib"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken: recorded as absent
            meta[mod] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta.update(card=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), sm_count=props.multi_processor_count)
        smi = run_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
        meta["driver"] = smi.splitlines()[0].strip() if smi else None
    else:
        meta.update(card=card_name(), cuda=None, driver=None)
    return meta


def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC 7B13 64-Core Processor'): /proc/cpuinfo on Linux, sysctl on macOS,
    else what `platform` knows (often only the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return run_command(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor() or platform.machine()


def card_name() -> str:
    """What numbers are measured on: the GPU's name, or 'CPU (<model>)' without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({cpu_model()})"


def card_slug(meta: dict) -> str:
    """The card name as a folder or file name: 'NVIDIA-H100-80GB-HBM3', 'CPU-AMD-EPYC-7B13-64-Core-Processor'."""
    name = "".join(c if c.isalnum() or c in "_." else "-" for c in str(meta.get("card", "unknown")))
    return "-".join(part for part in name.split("-") if part)


# ---- timing inside CUDA graphs (decode's setting: no Python launch cost) --------------------------

L2_FLUSH_BYTES = 512 << 20  # weight copies cycled per timed call: several times any card's L2


def copies_for(nbytes: int) -> int:
    """How many copies of an `nbytes` operand to cycle through so that none stays in L2."""
    return max(2, -(-L2_FLUSH_BYTES // max(nbytes, 1)))


def clone_weight(w):
    """A copy of a quantized-weight dataclass with its own tensors (another place in memory)."""
    return dataclasses.replace(w, **{f.name: getattr(w, f.name).clone() for f in dataclasses.fields(w)
                                     if isinstance(getattr(w, f.name), torch.Tensor)})


def graph_time_us(calls: list, reps: int = 4) -> float:
    """Microseconds per call: all `calls` captured `reps` times in one CUDA graph, replayed 5 times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in calls:
                f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps * len(calls))


def emit_json(doc, out: "Path | None") -> None:
    """`doc` as indented JSON into `out` (its folder made), or on stdout without one."""
    text = json.dumps(doc, indent=1)
    if out is None:
        print(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def shared_prefix(a: list, b: list) -> int:
    """How many leading tokens two token lists have in common (at most the shorter one's length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
