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

A rank that dies is the other reason for a SIGTERM: torchrun's agent then signals the survivors, and a survivor
waiting for "the next step" would wait for a collective with the dead rank until the agent's SIGKILL 30 s later (or,
blocked in a rendezvous, longer). So while the handlers are installed, every rank beats a heartbeat in the launcher's
store (`distributed.Heartbeats`, a thread), and once a signal has arrived a rank checks the others' beats: one that
has been silent for `PEER_SILENT_S` cannot take part in a checkpoint, and the rank exits at once (code 1, naming the
silent rank; the last complete checkpoint stays the one to resume). Live ranks beat through long steps and saves.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Any

import torch
from transformers import TrainerCallback

from rm_scale.distributed import Heartbeats, all_reduce_max

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, try again"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_REQUEUE_SIGNALS = (signal.SIGUSR1,)
HEARTBEAT_PERIOD_S = 0.5
PEER_SILENT_S = 4.0  # after a signal: a rank silent this long is gone (live ranks beat every HEARTBEAT_PERIOD_S)
PEER_LOST_EXIT_CODE = 1


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
        self._watching: threading.Event | None = None  # set to stop the watching thread
        self._watcher: threading.Thread | None = None
        self._wakeup: tuple[int, int] = (-1, -1)  # (the previous wakeup fd, ours)

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
        self._start_heartbeats()

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        self._stop_heartbeats()
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

    # -- heartbeats: a signal because a rank died ends this rank at once ------------------------------------------

    def _start_heartbeats(self) -> None:
        beats = _process_heartbeats()
        if beats is None:
            return
        # A Python handler runs only when the main thread is between bytecodes, and a rank whose peer died is often
        # blocked in C++ (a collective, a rendezvous): the wakeup fd is written by the C-level handler at once.
        read_fd, write_fd = os.pipe()
        for fd in (read_fd, write_fd):
            os.set_blocking(fd, False)
        self._wakeup = (signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False), write_fd)
        self._watching = threading.Event()
        self._watcher = threading.Thread(target=_watch, args=(beats, self._watching, read_fd), name="rm_scale-watch",
                                         daemon=True)
        self._watcher.start()

    def _stop_heartbeats(self) -> None:
        """Stop watching the others (this rank's own beat goes on until the process ends: a rank that left train()
        and waits in a barrier is alive, and must not look dead to one still saving)."""
        if self._watching is None:
            return
        self._watching.set()
        self._watching = None
        self._watcher.join(timeout=15)  # not left inside a store call when the interpreter exits (see _stop_beating)
        previous, write_fd = self._wakeup
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(previous)
        os.close(write_fd)

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


_BEATS: list[Heartbeats | None] = []  # this process's heartbeats, started once (empty: not tried yet)


def _process_heartbeats() -> Heartbeats | None:
    """This rank's heartbeats (a thread beating every HEARTBEAT_PERIOD_S until the interpreter exits), started on
    first use; None in a single process or without a store to reach."""
    if not _BEATS:
        beats = None
        if Heartbeats.available():
            try:
                beats = Heartbeats()
            except (RuntimeError, ValueError) as e:  # signals still work, just not the fast exit
                logger.warning("save_on_signal: no heartbeats (%s): a rank's death ends the job at the launcher's "
                               "pace.", e)
        if beats is not None:
            stop = threading.Event()
            thread = threading.Thread(target=_beat, args=(beats, stop), name="rm_scale-heartbeat", daemon=True)
            thread.start()
            # Joined before the interpreter finalises: a daemon thread ended there while inside the store's C++ call
            # aborts the process (SIGABRT from std::terminate), failing a run that had finished.
            atexit.register(_stop_beating, stop, thread)
        _BEATS.append(beats)
    return _BEATS[0]


def _beat(beats: Heartbeats, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_PERIOD_S):
        try:
            beats.beat()
        except RuntimeError as e:  # the store is gone: the launcher (or the first node) has died
            logger.warning("save_on_signal: heartbeats stopped (%s).", e)
            return


def _stop_beating(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(timeout=15)  # a beat waits at most the store's timeout


def _watch(beats: Heartbeats, stop: threading.Event, read_fd: int) -> None:
    """Once this rank has got a signal: exit at once when another rank has been silent for PEER_SILENT_S."""
    signalled: set[int] = set()
    try:
        while not stop.wait(HEARTBEAT_PERIOD_S):
            signalled |= _read_signals(read_fd)
            if not signalled:
                continue
            try:
                silent = beats.silent_ranks(PEER_SILENT_S)
            except RuntimeError as e:
                silent = [f"the launcher's store ({e})"]
            if silent and not stop.is_set():
                _exit_peer_lost(beats.rank, signalled, silent)
    finally:
        os.close(read_fd)


def _read_signals(fd: int) -> set[int]:
    try:
        data = os.read(fd, 512)
    except BlockingIOError:
        return set()
    return {sig for sig in data if sig in SIGNALS}


def _exit_peer_lost(rank: int, signalled: set[int], silent: list) -> None:
    names = "+".join(signal.Signals(s).name for s in sorted(signalled))
    who = ", ".join(f"rank {r}" if isinstance(r, int) else r for r in silent)
    msg = (f"rm_scale: rank {rank} got {names}, and {who} has been silent for {PEER_SILENT_S:.0f} s: no checkpoint can "
           "be made without it; exiting now (the last complete checkpoint is the one to resume from)\n")
    os.write(2, msg.encode())
    os._exit(PEER_LOST_EXIT_CODE)


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
