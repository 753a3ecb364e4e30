"""Data-parallel training under torchrun: process group, global-batch gathering, agreement between ranks.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts one
process per GPU (or several on CPU). Every rank encodes its slice of the same global batch; the slices
are gathered with gradients so the MSB loss sees the whole batch, and DistributedDataParallel averages
the parameter gradients. Without those variables everything here is a no-op for a single process
(how the ranks stop together on a signal: runtime/run_guard.py).
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from runtime.device import resolve_device
from runtime.errors import InputError, ReportedError


class DistributedError(ReportedError):
    """Another process of the run died, hung past the timeout or could not be reached."""

    every_rank = True  # each rank says which peer it lost
    # After a lost peer, gloo's threads can outlive the group: the interpreter's teardown then aborted in about
    # 1 run in 25 ("terminate called without an active exception", SIGABRT instead of status 2). Every file is
    # complete by then (checkpoints are atomic, the logs closed by Trainer.release).
    skip_teardown = True


@dataclass(frozen=True)
class Context:
    """Where this process sits in the run: rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, logs, prints and saves."""
        return self.rank == 0

    def my_slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch; the ranks' shares concatenate to the batch."""
        size = len(batch)
        return batch[self.rank * size // self.world_size:(self.rank + 1) * size // self.world_size]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def setup(device_name: str, gpuid: int, timeout_minutes: float) -> Context:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPU, one GPU per process)."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size == 1:
        return Context(device=resolve_device(device_name, gpuid))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name, local_rank)  # one GPU per process: --gpuid is not used
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"rank {rank} of {world_size} could not join the process group "
                               f"({_first_line(err)}); check MASTER_ADDR / MASTER_PORT or the torchrun "
                               f"rendezvous flags") from None
    return Context(rank, world_size, device)


def shutdown(ctx: Context, finished: bool = False) -> None:
    """Leave the process group (nothing to do in a single process).

    finished: this rank got here by the normal end of its run. A barrier then waits (without holding the
    GIL) until gloo's worker threads have let go of the last collective's tensors, which needs the GIL:
    destroying the group while a worker still held one deadlocked at exit in about 1 run in 12.
    After an error the peers may be gone, so there is no barrier.
    """
    if ctx.enabled and dist.is_initialized():
        if finished:
            try:
                dist.barrier()
            except RuntimeError:  # a peer stopped on an error of its own after its last step: it reports it
                pass
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The module the training step calls: DDP around the model on several ranks, the model itself on one.

    The plain model stays what is evaluated and saved, so checkpoints carry no `module.` prefix.
    """
    if not ctx.enabled:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _all_gather_padded(tensor: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Every rank's tensor, zero-padded to the largest size on every axis, concatenated on axis 0.

    Rows beyond each rank's own count are dropped, so the result has sum-of-ranks rows; the other axes
    keep the padding (for word features: padded to the longest caption over all ranks).
    """
    world_size = dist.get_world_size()
    shape = torch.tensor(tensor.shape, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    target = torch.stack(shapes).max(dim=0).values.tolist()
    padded = tensor.new_zeros(target)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded)
    shapes = [s.tolist() for s in shapes]
    return torch.cat([piece[:s[0]] for piece, s in zip(pieces, shapes)]), shapes


class _GatherRows(torch.autograd.Function):
    """All ranks' rows on every rank; the gradient flows back to this rank's own rows.

    Every rank computes the same global loss, so its gradient for its own rows is already the
    single-process one; DDP then averages the parameter gradients over the ranks, which the factor
    world_size turns back into their sum, the single-process gradient.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered, shapes = _all_gather_padded(tensor)
        ctx.start = sum(s[0] for s in shapes[:dist.get_rank()])
        ctx.own_shape = tensor.shape
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        own = grad[ctx.start:ctx.start + ctx.own_shape[0]]
        return own[tuple(slice(0, n) for n in ctx.own_shape)] * dist.get_world_size()


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The global batch from every rank's slice (axis 0), other axes padded to the max over ranks."""
    if tensor.requires_grad:
        return _GatherRows.apply(tensor)
    return _all_gather_padded(tensor)[0]


def batch_gatherer(ctx: Context) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's forward uses to build the global batch: None (nothing to do) in one process."""
    return gather_rows if ctx.enabled else None


def is_communication_error(err: BaseException) -> bool:
    """A collective failed: a peer died, timed out or dropped its connection."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in ("gloo", "Gloo", "NCCL", "Connection")))


def lost_peer_message(ctx: Context, err: BaseException, checkpoint: str) -> str:
    """One line for a failed collective: the backend's reason without its source location."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(err)).split(". ")[0]
    return (f"rank {ctx.rank} of {ctx.world_size}: another process of the run stopped or stopped answering "
            f"({reason}); this process stops too. Resume with the same command plus --resume {checkpoint}")


def max_over_ranks(ctx: Context, value: int) -> int:
    """The largest of the ranks' values (the same answer on every rank; the value itself in one process)."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def any_rank(ctx: Context, flag: bool) -> bool:
    """Whether the flag is set on any rank (the same answer on every rank; the flag itself in one process)."""
    return bool(max_over_ranks(ctx, int(flag)))
