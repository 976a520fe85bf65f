"""The one module that calls torch.distributed: global sums and maxima, no-ops in a single process.

Device-agnostic: tensors stay on the caller's device, so gloo (CPU) and NCCL (GPU) both work.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_gloo_group(*, timeout: timedelta) -> None:
    """Start the gloo process group from the launcher's environment (WORLD_SIZE, RANK, MASTER_ADDR), unless one
    exists. Accelerate and DeepSpeed then reuse it."""
    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=timeout)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input is untouched). Every rank must call it at the same point."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` stacked: (world size, *shape); (1, *shape) in a single process."""
    if not is_distributed():
        return tensor.detach().clone().unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.stack(parts)


def shutdown() -> None:
    """Leave together: a barrier, then tear the process group down on every rank.

    Without it a rank that finishes first exits while the others still hold the group (ZeRO-3 may even have
    prefetches in flight), and gloo can abort that rank at interpreter exit ("terminate called without an active
    exception"), failing a run that had finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
