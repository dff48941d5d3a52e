"""Serving under tensor parallelism: rank 0's engine schedules (HTTP requests arrive there only) and sends,
before each of its iterations, what the others cannot know: the requests submitted since the last one and
the ones cancelled. The other ranks replay exactly that iteration; everything else (slot choice, prefill
chunks, sampled tokens, stops) follows from it identically on every rank, as the logits are the same.

Messages go over a gloo group of their own (CPU objects; NCCL stays for the all-reduces). While idle,
rank 0 sends a heartbeat every HEARTBEAT_S so the others' wait never reaches the collective timeout; when
it stops serving it sends "stop", and the others return.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

HEARTBEAT_S = 5.0


@dataclass
class Plan:
    kind: str                                   # "step" | "idle" | "stop"
    new: list = field(default_factory=list)     # specs of the requests submitted since the last step
    cancelled: list = field(default_factory=list)  # ids of the requests this step drops


class Lockstep:
    """Rank 0 `send`s plans, the other ranks `receive` them, over `tp`'s control group."""

    def __init__(self, tp):
        self.tp = tp

    def send(self, plan: Plan) -> None:
        self._broadcast(plan)

    def receive(self) -> Plan:
        return self._broadcast(None)

    def _broadcast(self, plan):
        box = [plan]
        try:
            dist.broadcast_object_list(box, src=0, group=self.tp.control)
        except (RuntimeError, dist.DistBackendError) as e:
            from .tensor_parallel import TensorParallelError

            raise TensorParallelError(f"tensor parallel rank {self.tp.rank}/{self.tp.world}: the schedule from "
                                      f"rank 0 could not be {'sent' if self.tp.rank == 0 else 'received'} (a rank "
                                      f"exited, or none answered within {self.tp.timeout_s:.0f} s): {e}") from None
        return box[0]
