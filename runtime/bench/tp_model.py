"""Tensor parallelism on paper: for a model split over N GPUs, the weights each GPU reads per decode step,
the all-reduces a token costs (count, bytes, time under an alpha-beta model of a ring all-reduce), and the
tokens/s bound with and without them. The assumed latency and link bandwidth are inputs to be replaced by
measurements (the benchmark report's all-reduce rows on a multi-GPU machine)."""
from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelArgs

# Published peak numbers, per GPU (HBM read bandwidth; NVLink one-direction bandwidth); the all-reduce
# latency of a small message is an assumption (NCCL's LL protocol on NVLink is quoted at ~5-10 us).
CARDS = {"A100-80GB-SXM": {"hbm_gbps": 2039.0, "nvlink_gbps": 300.0},
         "H100-SXM": {"hbm_gbps": 3350.0, "nvlink_gbps": 450.0}}
ALLREDUCE_LATENCY_US = 8.0
GPT_FAST_70B_8xA100_TOK_S = 62.5  # gpt-fast's published 70B bf16 decode on 8 x A100 (tensor parallel)


@dataclass
class Row:
    card: str
    world: int
    weight_gb_per_gpu: float   # weights one GPU reads per decode step (its slice, plus the embedding row and head)
    step_ms: float             # those bytes at the card's HBM bandwidth
    allreduces: int            # per token: two per block
    allreduce_kib: float       # each one's message (batch 1, bf16 activations)
    comm_ms: float             # per token: allreduces x (latency + 2 (N-1)/N x bytes / link bandwidth)
    tok_s_bound: float         # 1 / step
    tok_s_with_comm: float     # 1 / (step + comm)


def rows(args: ModelArgs, worlds=(1, 2, 4, 8), *, bytes_per_weight: float = 2.0, batch: int = 1,
         latency_us: float = ALLREDUCE_LATENCY_US, cards=CARDS) -> list[Row]:
    """One Row per (card, world size): Megatron's split (projections / N, head and norms whole)."""
    blocks = sum(o * i for o, i in args.projection_shapes().values()) * args.n_layers
    head = args.vocab_size * args.dim
    out = []
    for card, spec in cards.items():
        for n in worlds:
            weight_bytes = (blocks / n + head + args.dim) * bytes_per_weight
            step_s = weight_bytes / (spec["hbm_gbps"] * 1e9)
            message = batch * args.dim * 2  # bf16 activations of the block's output
            count = 2 * args.n_layers if n > 1 else 0
            each_s = latency_us * 1e-6 + 2 * (n - 1) / n * message / (spec["nvlink_gbps"] * 1e9) if n > 1 else 0.0
            comm_s = count * each_s
            out.append(Row(card, n, weight_bytes / 1e9, step_s * 1e3, count, message / 1024, comm_s * 1e3,
                           batch / step_s, batch / (step_s + comm_s)))
    return out


def table(model: str, rs: list[Row]) -> str:
    lines = [f"{model}, batch 1, bf16 weights; all-reduce latency {ALLREDUCE_LATENCY_US:g} us assumed",
             "| card | TP | weights/GPU GB | step ms (HBM) | all-reduces/token | KiB each | comm ms/token | "
             "tok/s bound | tok/s with comm |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        lines.append(f"| {r.card} | {r.world} | {r.weight_gb_per_gpu:.1f} | {r.step_ms:.2f} | {r.allreduces} | "
                     f"{r.allreduce_kib:.0f} | {r.comm_ms:.2f} | {r.tok_s_bound:.0f} | {r.tok_s_with_comm:.0f} |")
    lines.append(f"gpt-fast's 70B bf16 on 8 x A100: {GPT_FAST_70B_8xA100_TOK_S} tok/s (the anchor to beat per dollar).")
    return "\n".join(lines)
