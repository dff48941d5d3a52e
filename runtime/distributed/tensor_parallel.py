"""Tensor parallelism (Megatron's split) over torch.distributed: the process group (initialised from
torchrun's environment when none is, NCCL on GPUs, gloo on CPUs, with a timeout), the rank's share of the
model's shapes, and the collectives a split model needs.

Each rank holds whole heads (its slice of wq/wk/wv rows and of wo's columns) and whole FFN columns (its
slice of gate/up rows and of down's columns); the sums of wo and down are all-reduced, so every rank sees
the same residual stream and, with the embedding, the norms and the head whole on every rank, the same
logits: sampling with the same seeds picks the same tokens everywhere without further communication.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import random
import secrets
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..model.config import ModelArgs

DEFAULT_TIMEOUT_S = 300.0  # a collective waiting longer for another rank fails (a rank died or hangs)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class TensorParallelError(RuntimeError):
    """A collective with the other ranks failed (a rank exited, or did not answer within the timeout)."""


class TensorParallel:
    """This process's place in the group: `rank` of `world`, the `device` it computes on."""

    def __init__(self, rank: int, world: int, device: torch.device, timeout_s: float):
        self.rank, self.world, self.device, self.timeout_s = rank, world, device, timeout_s
        # CPU objects (schedules, checks, seeds) go over gloo even when the tensors go over NCCL
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        # every rank's connections are up before any may raise (a bad world size fails on all ranks alike): a
        # rank leaving while a peer still handshakes made that peer fail with gloo's "connectFullMesh failed"
        dist.barrier(group=self.control)

    @classmethod
    def join(cls, device: torch.device, *, init_method: Optional[str] = None,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> "TensorParallel":
        """The default process group (initialised here if it is not yet: from torchrun's environment, or
        from `init_method`, e.g. file:///shared/path); on CUDA each rank takes cuda:LOCAL_RANK."""
        if not dist.is_available():
            raise RuntimeError("tensor_parallel needs torch.distributed, which this torch build lacks")
        if not dist.is_initialized():
            if not {"RANK", "WORLD_SIZE"} <= set(os.environ):
                raise ValueError("tensor_parallel=True needs a process group: launch with torchrun "
                                 "--nproc-per-node N (RANK and WORLD_SIZE are not set)")
            kwargs = {} if init_method is None else dict(init_method=init_method, rank=int(os.environ["RANK"]),
                                                         world_size=int(os.environ["WORLD_SIZE"]))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                    **kwargs)
            atexit.register(_leave)  # a group left to the interpreter's teardown may abort the process
        if device.type == "cuda":  # one GPU per rank: torchrun's LOCAL_RANK
            local_rank = os.environ.get("LOCAL_RANK")
            index = int(local_rank) if local_rank is not None else dist.get_rank() % torch.cuda.device_count()
            device = torch.device("cuda", index)
            torch.cuda.set_device(device)
        return cls(dist.get_rank(), dist.get_world_size(), device, timeout_s)

    # ---- shapes ---------------------------------------------------------------------------

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """This rank's shapes: n_heads, n_kv_heads and ffn_dim divided by the world size (head_dim, dim,
        vocabulary and layers unchanged). A size that does not divide is a ValueError naming it."""
        for name in ("n_heads", "n_kv_heads", "ffn_dim"):
            value = getattr(args, name)
            if value % self.world:
                raise ValueError(f"tensor parallelism over {self.world} ranks: {name}={value} is not divisible by "
                                 f"the world size {self.world} (each rank must hold whole heads and an equal share "
                                 "of the FFN)")
        return dataclasses.replace(args, n_heads=args.n_heads // self.world,
                                   n_kv_heads=args.n_kv_heads // self.world, ffn_dim=args.ffn_dim // self.world,
                                   head_dim=args.head_dim)

    def check_group_size(self, local: ModelArgs, group_size: int) -> None:
        """ValueError unless the int4 `group_size` divides a rank's (`local`) input width of wo and down."""
        for name, width in (("wo", local.q_dim), ("down (w2)", local.ffn_dim)):
            if width % group_size:
                raise ValueError(f"tensor parallelism over {self.world} ranks: a rank's {name} input width "
                                 f"{width} is not a multiple of the int4 group size {group_size}")

    # ---- collectives ----------------------------------------------------------------------

    def attach(self, module) -> None:
        """Sum the partial outputs of wo and down over the ranks (in place) in every block of `module`."""
        for layer in module.layers:
            layer.attn.reduce = self.all_reduce_
            layer.mlp.reduce = self.all_reduce_

    def all_reduce_(self, t: torch.Tensor) -> None:
        """t (contiguous) becomes the sum of every rank's t."""
        try:
            dist.all_reduce(t)
        except (RuntimeError, dist.DistBackendError) as e:
            raise TensorParallelError(f"tensor parallel rank {self.rank}/{self.world}: an all-reduce with the other "
                                      f"ranks failed (one exited, or none answered within {self.timeout_s:.0f} s): "
                                      f"{e}") from None

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def check_same(self, what: str, value) -> None:
        """Raise on every rank, naming the ranks, unless every rank passes an equal `value`."""
        values = [None] * self.world
        dist.all_gather_object(values, value, group=self.control)
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise ValueError(f"tensor parallel ranks disagree on the {what}: rank 0 has {values[0]!r}, rank "
                             f"{differ[0]} has {values[differ[0]]!r}")

    def seed_source(self) -> Callable[[], int]:
        """Seeds for requests that give none, the same sequence on every rank (rank 0's random start)."""
        rng = random.Random(self.broadcast(secrets.randbits(64)))
        return lambda: rng.getrandbits(64)
