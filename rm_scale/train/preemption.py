"""Signal-triggered checkpoints: SIGUSR1 / SIGTERM -> agree at the next optimizer step -> save -> stop -> exit 75.

`PreemptionCallback` (added by `RewardTrainer` when `RewardConfig.save_on_signal` is on, the default) installs handlers
for SIGUSR1 and SIGTERM in the main thread of every rank while `train()` runs, and restores the previous ones after.
A handler only sets a flag (and calls a previous Python handler, if there was one). At the end of every optimizer step
the ranks all-reduce their flags (one tiny all-reduce per step, on the training device: gloo or NCCL alike), so if ANY
rank got a signal, ALL ranks save a full checkpoint at the same step -- model, optimizer, scheduler, RNG, each rank's
data position, trainer state with the W&B run id -- and stop. `RewardTrainer.train` then raises `TrainingPreempted`
(a `SystemExit` with code 75, EX_TEMPFAIL) so the process exits non-zero: a job that exits 0 during a preemption grace
time is COMPLETED, not requeued. After SIGUSR1 inside a Slurm job, rank 0 first requeues the job
(`scontrol requeue $SLURM_JOB_ID`, `RewardConfig.requeue_on_signal`); after SIGTERM it does not (that is what
`scancel` sends too, and Slurm requeues preempted jobs by itself when the partition says so).

What reaches the ranks:
- `accelerate launch` (torchrun's agent) forwards SIGTERM/SIGINT to its workers, then SIGKILLs them after 30 s
  (`PET_SHUTDOWN_TIMEOUT`): the checkpoint after SIGTERM must fit in that. Under Slurm the ranks get SIGTERM from
  Slurm itself, so slurm/train.sh starts the agent with SIGTERM ignored (`trap '' TERM`,
  `PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT`) and the preemption GraceTime is the only limit;
  `restore_default_sigterm` (called by `rm-scale train`) undoes the inherited "ignored" in the ranks.
- SIGUSR1 is not handled by the agent: it kills it (default action) unless ignored. Send it to the workers, or start
  the launcher with SIGUSR1 ignored (`trap '' USR1` in bash before `exec accelerate launch ...`): the workers inherit
  the ignored disposition and this callback overrides it in the workers only. slurm/train.sh does that.
- Slurm (`scancel --signal=USR1 <job>`, srun forwarding a signal, preemption, time limit) signals EVERY process of a
  job step: agents and workers alike.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import torch
from transformers import TrainerCallback

from rm_scale.distributed import all_reduce_max

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, try again"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_REQUEUE_SIGNALS = (signal.SIGUSR1,)


class TrainingPreempted(SystemExit):
    """Raised by `RewardTrainer.train` after a signal-triggered checkpoint; exits the process with code 75.

    SIGTERM and SIGUSR1 stay ignored afterwards (`exit_on_signal_from_now_on`): the process is expected to exit."""

    def __init__(self, checkpoint: str | None, signals: list[str], requeued: bool) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.checkpoint, self.signals, self.requeued = checkpoint, signals, requeued

    def __str__(self) -> str:
        return (
            f"training stopped on {'+'.join(self.signals)} after saving {self.checkpoint}"
            f"{'; job requeued' if self.requeued else ''} (exit code {PREEMPTED_EXIT_CODE})"
        )


class PreemptionCallback(TrainerCallback):
    """Turns SIGUSR1/SIGTERM into a checkpoint at the next optimizer step and a stop (see the module docstring)."""

    def __init__(self) -> None:
        self.received: set[int] = set()  # signals this rank got since install()
        self.agreed: set[int] = set()  # signals some rank got, as agreed at the step where training stopped
        self.stop_step: int | None = None
        self._previous: dict[int, Any] = {}

    # -- handlers -------------------------------------------------------------------------------------------------

    def install(self) -> None:
        """Install the handlers (main thread only; idempotent). Previous handlers are kept and chained."""
        if self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("save_on_signal: not in the main thread, no signal handlers installed.")
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def reset(self) -> None:
        self.received, self.agreed, self.stop_step = set(), set(), None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.add(signum)
        # os.write, not logging/print: this runs between two bytecodes of whatever the main thread was doing.
        name = signal.Signals(signum).name
        msg = f"rm_scale: rank pid {os.getpid()} got {name}: checkpoint at the next step, then stop\n"
        try:
            os.write(2, msg.encode())
        except OSError:
            pass
        previous = self._previous.get(signum)
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(signum, frame)

    # -- agreement at each optimizer step ------------------------------------------------------------------------

    def _agree(self, args: Any) -> set[int]:
        flags = all_reduce_max(torch.tensor([float(sig in self.received) for sig in SIGNALS], device=args.device))
        return {sig for sig, f in zip(SIGNALS, flags.tolist()) if f > 0}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_step is not None:
            return
        agreed = self._agree(args)
        if not agreed:
            return
        self.agreed, self.stop_step = agreed, state.global_step
        control.should_save = True
        control.should_training_stop = True
        control.should_evaluate = False  # time is short: save first
        if state.is_world_process_zero:
            logger.warning(
                "%s received: saving a checkpoint at step %d and stopping.",
                "+".join(self.signal_names),
                state.global_step,
            )

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_step is not None:  # already saved at this step: no second save, no evaluation
            control.should_save = False
            control.should_evaluate = False

    @property
    def stopped(self) -> bool:
        return self.stop_step is not None

    @property
    def signal_names(self) -> list[str]:
        return [signal.Signals(s).name for s in SIGNALS if s in self.agreed]

    @property
    def wants_requeue(self) -> bool:
        return any(s in self.agreed for s in _REQUEUE_SIGNALS)


def exit_on_signal_from_now_on() -> None:
    """After the checkpoint of a stopped run: ignore SIGTERM/SIGUSR1, so the process ends by itself with code 75.

    torchrun's agent SIGTERMs the other workers as soon as one exits, and Slurm signals every process after a requeue;
    a rank still shutting down (its checkpoint is complete) must not die of that signal. A Python handler would not do:
    the interpreter resets its handlers to the default while it finalises; an ignored signal stays ignored. The
    launcher's SIGKILL (torchrun: 30 s later; Slurm: KillWait) still ends a process that does not exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def restore_default_sigterm() -> None:
    """SIGTERM ignored at start (inherited from a launcher started with `trap '' TERM`, as slurm/train.sh does so
    that torchrun's agent does not SIGKILL the ranks 30 s into a checkpoint): give it back its default action, so a
    rank that is still loading dies of SIGTERM as usual. While `train()` runs, `PreemptionCallback` handles it."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def slurm_requeue() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when inside a Slurm job; True when Slurm accepted it."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    cmd = ["scontrol", "requeue", job]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.error("%s failed: %s", " ".join(cmd), e)
        return False
    if proc.returncode != 0:
        logger.error("%s failed (exit %d): %s", " ".join(cmd), proc.returncode, (proc.stdout + proc.stderr).strip())
        return False
    logger.warning("Requeued Slurm job %s (restart %d).", job, int(os.environ.get("SLURM_RESTART_COUNT", "0")) + 1)
    return True
