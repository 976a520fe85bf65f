"""The one module that calls torch.distributed: global sums and maxima, no-ops in a single process.

Device-agnostic: tensors stay on the caller's device, so gloo (CPU) and NCCL (GPU) both work.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from datetime import timedelta
from typing import Any

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


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process. For small per-rank results
    of our own ranks (evaluation rows), not for tensors on a hot path."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave together: a barrier, then tear the process group down on every rank.

    Without it a rank that finishes first exits while the others still hold the group (ZeRO-3 may even have
    prefetches in flight), and gloo can abort that rank at interpreter exit ("terminate called without an active
    exception"), failing a run that had finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_LEAVE_AT_EXIT: dict[str, bool] = {}  # "armed": whether the exit hook waits for the others


def leave_together_at_exit(armed: bool = True) -> None:
    """Run `shutdown` when the interpreter exits, for scripts that end after ``trainer.train()`` without it (every
    TRL script does): on gloo, a rank that exits while the others still hold the group can be aborted at exit
    ("terminate called without an active exception"), failing a run that had finished. A no-op where the script
    already left (our CLI does).

    Disarmed (``armed=False``) while training, and left so when training raised: a script that catches the error
    and exits must exit at once, not wait in a barrier for ranks that may be inside another collective. After an
    unhandled exception there is no barrier either. A peer that is only slow (rank 0 still saving) is waited for,
    up to the group's timeout (``ddp_timeout``) -- also one that failed after train() and whose script then exits
    without raising: call this with ``armed=False`` in such an error path.

    Arming (re-)registers the hook last, so it runs before the hooks registered until then (the heartbeats keep
    beating while it waits); disarming only sets the flag."""
    _LEAVE_AT_EXIT["armed"] = armed
    if armed:
        atexit.unregister(_leave_at_exit)
        atexit.register(_leave_at_exit)


def _leave_at_exit() -> None:
    # set when an exception ended the script (last_exc: Python 3.12+; last_value: all versions)
    unhandled = getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None
    if not _LEAVE_AT_EXIT.get("armed") or unhandled:
        return
    try:
        shutdown()
    except RuntimeError as e:  # the group's timeout: leave alone, as without this hook
        sys.stderr.write(f"rm_scale: ranks did not leave together ({e}); exiting without the barrier\n")


class Heartbeats:
    """Each rank's liveness as a counter in the launcher's key-value store (torchrun's agent hosts it at
    MASTER_ADDR:MASTER_PORT; it outlives the ranks), through a connection of this object's own: the main thread may
    be blocked inside the process group's store (a rendezvous waiting for a dead rank holds that client's lock).

    Torch releases the GIL while it computes and writes checkpoints, so a thread beating every second keeps beating
    through long steps and saves; a rank that stopped beating is dead (or frozen)."""

    def __init__(self, *, timeout_s: float = 10.0) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        self._prefix = f"rm_scale/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (its count, when this rank saw it change)

    @staticmethod
    def available() -> bool:
        return is_distributed() and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ

    def beat(self) -> None:
        self._store.add(self._prefix + str(self.rank), 1)

    def silent_ranks(self, after_s: float) -> list[int]:
        """The other ranks whose counter has not moved for ``after_s`` seconds of this rank's clock, counted from the
        first call (so the first call never names one)."""
        now, silent = time.monotonic(), []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            count = self._store.add(self._prefix + str(rank), 0)
            seen = self._seen.get(rank)
            if seen is None or seen[0] != count:
                self._seen[rank] = (count, now)
            elif now - seen[1] >= after_s:
                silent.append(rank)
        return silent
