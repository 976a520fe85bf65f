"""Preemption and faults for real: 2-rank ZeRO-3 through `accelerate launch`, signals and kills from outside.

- SIGUSR1 to the ranks mid-run -> a complete checkpoint, every rank exits 75; `resume_from_checkpoint: auto` skips a
  partial (marker-less) checkpoint, finishes, and the final weights and the per-step losses equal an uninterrupted run.
- SIGKILL of one rank at a chosen point of a save -> the job ends within seconds, a partial save is ignored, resuming
  from the last complete checkpoint reproduces the uninterrupted run.
- a signal while a peer is frozen or dead -> the rank exits within seconds (heartbeats), not after torchrun's 30 s.
- a hung rank (SIGSTOP) -> the other fails after `ddp_timeout` instead of blocking forever.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from launch import launch_config, metrics, run_train, start_train, tiny_ds_config, tiny_recipe, worker_pids
from rm_scale.train.checkpoint import LATEST, MARKER, latest_checkpoint, list_checkpoints
from rm_scale.train.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preempt")
    recipe, _ = tiny_recipe(tmp, data={"train": ["rm_scale:demo/train"], "streaming": False}, max_steps=STEPS,
                            per_device_train_batch_size=2, save_strategy="steps", save_steps=4, save_total_limit=2)
    launch = launch_config("zero3.yaml", tmp, ds_config=tiny_ds_config("zero3.json", tmp))
    return tmp, recipe, launch


@pytest.fixture(scope="module")
def uninterrupted(setup):
    tmp, recipe, launch = setup
    out = tmp / "full"
    run_train(recipe, ["--output_dir", str(out)], launch=launch)
    return out, _losses(out)


def _losses(out):
    rows = [m for m in metrics(out) if "loss_exact" in m]
    steps = [m["step"] for m in rows]
    assert steps == sorted(set(steps)), f"duplicate or unordered steps in metrics.jsonl: {steps}"
    return {m["step"]: m["loss_exact"] for m in rows}


def _assert_same_model(out, ref):
    got, want = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-6, name


def _wait_for(predicate, proc, log, timeout=120, poll=0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"launcher exited {proc.returncode} or timed out\n{log.read_text()[-6000:]}")
        time.sleep(poll)


def _finish(proc, log, timeout=120):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"launcher still running after {timeout}s\n{log.read_text()[-6000:]}")


def test_sigusr1_checkpoints_exits_75_and_auto_resume_equals_uninterrupted(setup, uninterrupted):
    tmp, recipe, launch = setup
    ref, ref_losses = uninterrupted
    out, log = tmp / "signalled", tmp / "signalled.log"
    proc = start_train(recipe, ["--output_dir", str(out)], launch=launch, log=log)
    _wait_for(lambda: (out / "checkpoint-4" / MARKER).exists(), proc, log)
    for pid in worker_pids(proc).values():  # what Slurm does: every process of the step gets it
        os.kill(pid, signal.SIGUSR1)
    rc = _finish(proc, log)
    text = log.read_text()
    assert rc != 0, text[-4000:]
    # Every rank exited with the distinct code (torchrun reports each; the launcher itself exits 1).
    assert text.count(f"exitcode  : {PREEMPTED_EXIT_CODE}") == 2, text[-4000:]
    stopped = latest_checkpoint(out)
    step = int(stopped.rsplit("-", 1)[1])
    assert 4 <= step < STEPS, text[-4000:]
    assert (out / LATEST).read_text().strip() == f"checkpoint-{step}"
    marker = json.loads((out / f"checkpoint-{step}" / MARKER).read_text())
    assert marker["step"] == step and marker["world_size"] == 2
    assert {f"rng_state_{r}.pth" for r in (0, 1)} <= {p.name for p in (out / f"checkpoint-{step}").iterdir()}

    # A save killed half-way: a newer folder without the marker. It must be ignored, then cleaned up by rotation.
    partial = out / f"checkpoint-{step + 1}"
    shutil.copytree(out / f"checkpoint-{step}", partial)
    (partial / MARKER).unlink()
    (partial / "model.safetensors").write_bytes(b"cut short")

    proc = run_train(recipe, ["--output_dir", str(out), "--resume_from_checkpoint", "auto"], launch=launch)
    assert f"resuming from {out}/checkpoint-{step}" in proc.stderr, proc.stderr[-4000:]
    assert f"Ignoring {partial}" in proc.stderr
    losses = _losses(out)  # each step once: the first attempt's records after the checkpoint were dropped
    assert sorted(losses) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert abs(losses[s] - ref_losses[s]) <= 1e-6, (s, losses[s], ref_losses[s])
    _assert_same_model(out, ref)
    kept = list_checkpoints(out)
    assert all(done for _, _, done in kept) and len(kept) == 2, kept  # save_total_limit=2, partial one deleted
    assert kept[-1][0] == STEPS and (out / LATEST).read_text().strip() == f"checkpoint-{STEPS}"


@pytest.mark.parametrize("rank", [0, 1])
def test_a_signal_to_one_rank_only_checkpoints_every_rank(setup, uninterrupted, rank):
    """SIGUSR1 to a single worker (not what Slurm does, but what `kill` does): the ranks agree at the next step, both
    save and exit 75, and the resumed run ends equal to the uninterrupted one."""
    tmp, recipe, launch = setup
    ref, ref_losses = uninterrupted
    out, log = tmp / f"one_rank{rank}", tmp / f"one_rank{rank}.log"
    proc = start_train(recipe, ["--output_dir", str(out)], launch=launch, log=log)
    _wait_for(lambda: (out / "checkpoint-4" / MARKER).exists(), proc, log)
    os.kill(worker_pids(proc)[rank], signal.SIGUSR1)
    rc = _finish(proc, log)
    text = log.read_text()
    assert rc != 0 and text.count(f"exitcode  : {PREEMPTED_EXIT_CODE}") == 2, text[-4000:]
    step = int(latest_checkpoint(out).rsplit("-", 1)[1])
    assert 4 <= step < STEPS and json.loads((out / f"checkpoint-{step}" / MARKER).read_text())["world_size"] == 2
    run_train(recipe, ["--output_dir", str(out), "--resume_from_checkpoint", "auto"], launch=launch)
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(abs(losses[s] - ref_losses[s]) <= 1e-6 for s in losses)
    _assert_same_model(out, ref)


@pytest.mark.parametrize("point, resumes_from", [("written", "checkpoint-2"), ("committed", "checkpoint-4")])
def test_rank_killed_during_a_save_fails_fast_and_the_last_complete_checkpoint_resumes(setup, uninterrupted, point,
                                                                                      resumes_from):
    """Every rank holds at a point of the step-4 save (RM_SCALE_HOLD_AT): after its files are written but before the
    marker, or just after the commit. Rank 1 is killed there; the other rank ends within seconds (torchrun's SIGTERM +
    the silent peer's heartbeat), the partial save is ignored, and resuming reproduces the uninterrupted run."""
    tmp, recipe, launch = setup
    ref, ref_losses = uninterrupted
    out, log = tmp / f"killed_{point}", tmp / f"killed_{point}.log"
    common = ["--output_dir", str(out), "--save_steps", "2", "--save_total_limit", "3"]
    proc = start_train(recipe, common, launch=launch, log=log, extra_env={"RM_SCALE_HOLD_AT": f"checkpoint-4:{point}"})
    _wait_for(lambda: log.read_text().count(f"holding at checkpoint-4:{point}") == 2, proc, log)
    assert (out / "checkpoint-4" / MARKER).exists() == (point == "committed")
    os.kill(worker_pids(proc)[1], signal.SIGKILL)
    killed_at = time.monotonic()
    rc = _finish(proc, log)
    elapsed, text = time.monotonic() - killed_at, log.read_text()
    assert rc != 0 and elapsed < 10, (rc, elapsed, text[-4000:])
    assert "rank 0 got SIGTERM, and rank 1 has been silent" in text, text[-4000:]
    assert latest_checkpoint(out) == str(out / resumes_from)

    run_train(recipe, [*common, "--resume_from_checkpoint", "auto"], launch=launch)
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(abs(losses[s] - ref_losses[s]) <= 1e-6 for s in losses)
    _assert_same_model(out, ref)


def test_a_signal_while_a_peer_is_frozen_ends_the_rank_in_seconds(setup):
    """Rank 0 frozen mid-training (SIGSTOP: rank 1 is then blocked in a collective with it, where no Python signal
    handler runs), then SIGTERM to rank 1 as torchrun sends it: rank 1 must not wait for a step that never comes."""
    tmp, recipe, launch = setup
    out, log = tmp / "frozen", tmp / "frozen.log"
    proc = start_train(recipe, ["--output_dir", str(out), "--max_steps", "100000"], launch=launch, log=log)
    _wait_for(lambda: (out / "metrics.jsonl").exists(), proc, log)
    workers = worker_pids(proc)
    os.kill(workers[0], signal.SIGSTOP)
    try:
        time.sleep(1)
        os.kill(workers[1], signal.SIGTERM)
        signalled = time.monotonic()
        while _state(workers[1]) != "Z" and time.monotonic() - signalled < 30:
            time.sleep(0.05)
        ended_after = time.monotonic() - signalled
    finally:
        os.kill(workers[0], signal.SIGKILL)
    rc, text = _finish(proc, log), log.read_text()
    assert rc != 0 and ended_after < 10, (ended_after, text[-4000:])
    assert "rank 1 got SIGTERM, and rank 0 has been silent" in text, text[-4000:]


def test_a_hung_rank_makes_the_other_fail_after_ddp_timeout(setup):
    tmp, recipe, launch = setup
    out, log = tmp / "hung", tmp / "hung.log"
    timeout = 8
    proc = start_train(recipe, ["--output_dir", str(out), "--max_steps", "100000", "--save_steps", "100000",
                                "--ddp_timeout", str(timeout)], launch=launch, log=log)
    _wait_for(lambda: (out / "metrics.jsonl").exists(), proc, log)
    workers = worker_pids(proc)
    os.kill(workers[1], signal.SIGSTOP)  # a rank that stops answering (a frozen node, a stuck device)
    stopped_at = time.monotonic()
    try:
        while os.path.exists(f"/proc/{workers[0]}") and _state(workers[0]) != "Z":
            assert time.monotonic() - stopped_at < timeout + 60, log.read_text()[-4000:]
            time.sleep(0.1)
        failed_after = time.monotonic() - stopped_at
    finally:
        os.kill(workers[1], signal.SIGKILL)  # else torchrun waits 30 s for the stopped rank before SIGKILL
    rc = _finish(proc, log)
    text = log.read_text()
    assert rc != 0
    assert timeout - 1 <= failed_after <= timeout + 30, (failed_after, text[-4000:])
    # gloo's timeout, worded by the collective the surviving rank was in: "Timed out waiting 8000ms for recv operation
    # to complete" (all-reduce), "Application timeout caused pair closure" (a ZeRO-3 parameter all-gather).
    assert re.search(rf"Timed out waiting {timeout * 1000}ms|Application timeout caused pair closure", text), text[-4000:]


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
