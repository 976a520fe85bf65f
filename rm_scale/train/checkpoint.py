"""Atomic checkpoints: which `checkpoint-<step>` folders are complete, which one to resume from, what to rotate.

transformers writes `<output_dir>/checkpoint-<step>/` in place, file by file, from every rank. A process killed in the
middle leaves a folder that looks like a checkpoint but is not one. `RewardTrainer` therefore commits a save in two
steps once EVERY rank has written its part (a barrier):

1. `checkpoint-<step>/rm_scale_complete.json` (the marker: step, world size, time, W&B run id);
2. `<output_dir>/latest` (the name of that folder), written last.

Both are written to a temporary file and renamed (`os.replace`), so a reader sees the old or the new file, never half
of one. Resuming takes `latest` when it names a complete checkpoint, else the newest complete one by step; a folder
without the marker is never resumed from (unless passed explicitly by path).

No torch/transformers imports here: the functions work on folders and are cheap to call before any heavy work.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER = "rm_scale_complete.json"
LATEST = "latest"
METRICS = "metrics.jsonl"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def hold_point(name: str) -> None:
    """A named point of the save path where a test can kill a process deterministically: with ``RM_SCALE_HOLD_AT``
    set to ``name`` the process says so on stderr and sleeps here until it is killed (signal handlers still run).
    Points: ``checkpoint-<step>:written`` (every rank wrote its part, no marker yet), ``checkpoint-<step>:committed``
    (marker and ``latest`` written), ``final:staged`` (the exported model is in ``final.partial``, not yet moved)."""
    if os.environ.get("RM_SCALE_HOLD_AT") != name:
        return
    os.write(2, f"rm_scale: holding at {name} (RM_SCALE_HOLD_AT)\n".encode())
    while True:
        time.sleep(1)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = _CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(checkpoint: str | os.PathLike) -> bool:
    return (Path(checkpoint) / MARKER).is_file()


def read_marker(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a complete checkpoint; None for a partial one (or one saved before markers existed)."""
    try:
        return json.loads((Path(checkpoint) / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """``(step, folder, complete)`` of every ``checkpoint-<step>`` folder, by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir():
            out.append((step, child, is_complete(child)))
    return sorted(out)


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from: the one ``latest`` names if complete, else the newest complete by step."""
    root = Path(output_dir)
    try:
        name = (root / LATEST).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        name = ""
    if name and checkpoint_step(name) is not None and is_complete(root / name):
        return str(root / name)
    complete = [path for _, path, done in list_checkpoints(root) if done]
    return str(complete[-1]) if complete else None


def resolve_resume(value: Any, output_dir: str | os.PathLike) -> str | None:
    """What ``resume_from_checkpoint`` means, as a folder or None.

    None/False/"no"/"never"/"false": start fresh. "auto": the latest complete checkpoint of ``output_dir`` if there is
    one, else start fresh. True/"true"/"yes": the latest complete checkpoint; an error if there is none. Anything
    else: a checkpoint folder, used as given (an error if it does not exist; a warning if it has no completion marker).
    """
    if value is None or value is False:
        return None
    if isinstance(value, str) and value.strip().lower() in {"", "no", "none", "null", "never", "false"}:
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        found = latest_checkpoint(output_dir)
        _log_partial(output_dir, found)
        if found is None:
            logger.info("resume_from_checkpoint=auto: no complete checkpoint in %s, starting fresh.", output_dir)
        else:
            logger.info("resume_from_checkpoint=auto: resuming from %s.", found)
        return found
    if value is True or (isinstance(value, str) and value.strip().lower() in {"true", "yes"}):
        found = latest_checkpoint(output_dir)
        _log_partial(output_dir, found)
        if found is None:
            unmarked = [path.name for _, path, done in list_checkpoints(output_dir)
                        if not done and (path / "trainer_state.json").exists()]
            hint = (f" {unmarked[-1]} has no marker (written by TRL / transformers, or a save cut short): to resume "
                    f"from it, pass resume_from_checkpoint={str(Path(output_dir) / unmarked[-1])!r}." if unmarked else "")
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir} has no complete checkpoint (a checkpoint-<step> folder "
                f"with {MARKER}). Use resume_from_checkpoint: auto to start fresh when there is none, or pass a "
                f"checkpoint folder.{hint}"
            )
        return found
    path = Path(str(value))
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint={value!r}: no such checkpoint folder.")
    if not is_complete(path):
        logger.warning(
            "%s has no %s: it may be a save that was cut short (or one written before rm_scale marked complete "
            "checkpoints). Resuming from it because it was named explicitly.", path, MARKER,
        )
    return str(path)


def _log_partial(output_dir: str | os.PathLike, chosen: str | None) -> None:
    chosen_step = checkpoint_step(chosen) if chosen else -1
    for step, path, done in list_checkpoints(output_dir):
        if not done and step > chosen_step:
            logger.warning("Ignoring %s: no %s (a save that was cut short).", path, MARKER)


def resumed_step(checkpoint: str | os.PathLike) -> int:
    """The global step a checkpoint was saved at (its trainer_state.json; the folder name as a fallback)."""
    try:
        return int(json.loads((Path(checkpoint) / TRAINER_STATE).read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        step = checkpoint_step(checkpoint)
        if step is None:
            raise ValueError(f"{checkpoint}: cannot tell its step (no {TRAINER_STATE}, not named checkpoint-<step>).")
        return step


def mark_complete(checkpoint: str | os.PathLike, info: dict[str, Any]) -> None:
    """Commit a checkpoint every rank has finished writing: its marker, then ``<output_dir>/latest``."""
    checkpoint = Path(checkpoint)
    write_atomic(checkpoint / MARKER, json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}, indent=1))
    write_atomic(checkpoint.parent / LATEST, checkpoint.name + "\n")


def rotate(output_dir: str | os.PathLike, limit: int | None, *, keep: list[str | None] = ()) -> list[Path]:
    """Delete all but the ``limit`` most recently completed checkpoints, and every partial one.

    Runs right after a save committed (no other save is in flight). ``keep`` (the checkpoint just saved, the best
    model's) is never deleted; neither is anything when ``limit`` is None or <= 0 (transformers' rule). Returns
    what was deleted.
    """
    if not limit or limit <= 0:
        return []
    protected = {Path(p).resolve() for p in keep if p}
    entries = list_checkpoints(output_dir)
    complete = sorted(
        ((os.path.getmtime(path / MARKER), step, path) for step, path, done in entries if done), reverse=True
    )
    keep_paths = {path.resolve() for _, _, path in complete[:limit]} | protected
    deleted = []
    for _, path, _ in entries:
        if path.resolve() not in keep_paths:
            logger.info("Deleting %s (save_total_limit=%s%s).", path, limit, "" if is_complete(path) else ", partial")
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def truncate_metrics(output_dir: str | os.PathLike, step: int) -> int:
    """Keep the records of ``<output_dir>/metrics.jsonl`` with step <= ``step`` (the resumed one); atomic.

    Returns how many records were dropped. A run resumed from step N logs N+1, ... again: without this the file would
    hold those steps twice.
    """
    path = Path(output_dir) / METRICS
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by a kill
            dropped += 1
            continue
        if record_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def check_world_size(checkpoint: str | os.PathLike, world_size: int, *, streamed: bool, zero_stage: int | None) -> None:
    """A ValueError saying what to do when ``checkpoint`` was saved by another number of processes and cannot be
    resumed by this one: streamed data positions and ZeRO-3 shards are per rank; anything else resumes with a
    warning."""
    per_rank = None
    if streamed:
        per_rank = "streamed data positions are per rank"
    elif zero_stage == 3:
        per_rank = "ZeRO-3 shards are per rank"
    saved = (read_marker(checkpoint) or {}).get("world_size")
    if saved is None or saved == world_size:
        return
    if per_rank is None:
        logger.warning("%s was saved by %d processes, this run has %d.", checkpoint, saved, world_size)
        return
    raise ValueError(
        f"{checkpoint} was saved by {saved} processes but this run has {world_size} ({per_rank}). Resume with "
        f"{saved} processes (accelerate launch --num_processes {saved}; slurm/train.sh: nodes x GPUs per node = "
        f"{saved}), or start fresh: another output_dir, or resume_from_checkpoint: null (RESUME=never for "
        "slurm/train.sh)."
    )


def check_writable(output_dir: str | os.PathLike) -> None:
    """Create ``output_dir`` and write a probe file in it; a clear ValueError if that fails."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".rm_scale_write_test.", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(
            f"output_dir {output_dir!r} is not writable ({type(e).__name__}: {e}). Checkpoints, metrics and the "
            "model go there: set train.output_dir (--output_dir) to a folder this job can write, on a file system "
            "every node sees."
        ) from e


def publish(staging: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a finished model folder into place: a reader sees the old folder or the new one, never half of one."""
    staging, final_dir = str(staging), str(final_dir)
    old = final_dir + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(final_dir):
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    if os.path.isdir(old):
        shutil.rmtree(old)
