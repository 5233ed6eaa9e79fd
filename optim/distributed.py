"""Processes: which rank this is, of how many, on which device, and the collectives shared by the
optimizers, the evaluation and the run (gradient averaging, broadcasts, a stop flag). One place for every
torch.distributed question: train.py, model/evaluate.py and optim/muon.py all ask here. It lives in
optim/, the lowest layer that needs it.

Without torch.distributed initialised (one process) every helper answers rank 0 of 1 and does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (default: the world); (0, 1) without torch.distributed."""
    if initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@torch.no_grad()
def average_gradients(grads: Sequence[Tensor], group=None) -> None:
    """Average tensors (the non-bank gradients) across ranks in place: one all-reduce per dtype.

    Flattens each dtype's tensors into one buffer, all-reduces it (AVG on NCCL, else SUM then 1/W), and
    copies the results back. A no-op without torch.distributed or on one rank.
    """
    _, world = rank_world(group)
    if world == 1 or not grads:
        return
    nccl = dist.get_backend(group) == "nccl"
    by_dtype: dict[tuple, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for tensors in by_dtype.values():
        flat = _flatten_dense_tensors(tensors)
        dist.all_reduce(flat, op=dist.ReduceOp.AVG if nccl else dist.ReduceOp.SUM, group=group)
        if not nccl:
            flat.mul_(1.0 / world)
        for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(synced)


@dataclass
class Dist:
    """This process of a run: its rank, the world size, its local rank and device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensors) -> None:
        """Overwrite ``tensors`` with rank 0's, in place."""
        if self.on:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t, 0)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.on:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        if self.on and dist.is_initialized():
            dist.destroy_process_group()


def init_process_group(backend: str, device: torch.device | None = None) -> None:
    """``dist.init_process_group(backend)`` such that ``dist.destroy_process_group()`` really ends it.

    ``torch.distributed.nn.functional`` binds ``group.WORLD`` as the default argument of its functions
    when it is first imported, and torch._dynamo imports it (through torch.distributed._shard) the first
    time anything compiles or builds a custom op. Imported after the group exists, those defaults keep
    the ProcessGroup alive past destroy_process_group, and with it gloo's worker and TCP-loop threads,
    until interpreter finalization tears them down: rank 0 of a CPU test then died at random with
    SIGABRT ("terminate called without an active exception"). Imported here first, the defaults are
    None and destroying the group joins its threads.
    """
    import torch.distributed.nn.functional  # noqa: F401  (before the group exists: see above)

    dist.init_process_group(backend, device_id=device)


def setup_processes(device_arg: str) -> Dist:
    """One process, or torchrun (RANK/WORLD_SIZE set): NCCL on CUDA, gloo on CPU."""
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu for a smoke run)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world:
        raise SystemExit(f"WORLD_SIZE={world} must divide 8 (the record's 8 micro-batches per step)")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        init_process_group("nccl" if want_cuda else "gloo", device if want_cuda else None)
    return Dist(rank, world, local_rank, device)
