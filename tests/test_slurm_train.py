"""`sbatch slurm/train.sh` for real: 2 Slurm nodes x 1 CPU worker, one ZeRO-3 group across both, model saved.

Uses the single-host cluster of tests/slurm_cluster.py (nodes n1, n2 on 127.0.0.2, 127.0.0.3), so the script runs
exactly as users submit it: from the repository root, settings through environment variables.
"""

import json
import os
import re
import signal
import sys
import time

import pytest
import torch

from launch import ROOT, env, free_port, launch_config, run_train, tiny_ds_config, tiny_recipe
from rm_scale.train.checkpoint import MARKER
from slurm_cluster import TERMINAL_STATES

pytestmark = pytest.mark.slow

STEPS = 4
BATCH = 2  # per device


def _submit(cluster, tmp_path, recipe, ds, *, script_args=(), sbatch_args=(), log_name="job.out"):
    log = tmp_path / log_name
    # No Slurm variables of a surrounding job (sbatch reads SBATCH_*; SLURM_CONF must stay the test cluster's).
    job_env = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    job_env.update(RECIPE=str(recipe), DS_CONFIG=str(ds), PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    job_env.pop("GPUS_PER_NODE", None)  # exercise the detection: no GPU -> 1 worker per node
    # The script's defaults ask 16 CPUs a node; these emulated nodes have 2.
    job = cluster.sbatch(ROOT / "slurm" / "train.sh", "--cpus-per-task=2", *sbatch_args, "-o", str(log),
                         env=job_env, cwd=ROOT, script_args=script_args)
    return job, log


def test_sbatch_two_nodes_zero3_trains_and_saves(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    recipe, _ = tiny_recipe(tmp_path, data={"train": ["rm_scale:demo/train"], "eval": ["rm_scale:demo/eval"]},
                            output_dir=str(out), max_steps=1000, per_device_train_batch_size=BATCH,
                            per_device_eval_batch_size=8)
    ds = tiny_ds_config("zero3.json", tmp_path)  # persistence threshold 0: the tiny model really is partitioned
    # Trailing arguments are recipe overrides and reach both nodes (the recipe says 1000 steps).
    job, log = _submit(slurm_cluster, tmp_path, recipe, ds, script_args=("--max_steps", str(STEPS)))
    state = slurm_cluster.wait(job, timeout=240)
    text = log.read_text() if log.exists() else ""
    assert state == "COMPLETED", f"job {job}: {state}\n{text[-6000:]}"

    # Each node ran its own launcher with its own machine rank (evaluated per task, not in the batch shell).
    nodes = dict(re.findall(r"rm_scale node (\S+) machine_rank (\d+)", text))
    assert nodes == {"n1": "0", "n2": "1"}, text[-6000:]
    # The resolved command was printed, with the world the script computed.
    assert re.search(r"workers/node 1 world 2\b", text), text[:3000]
    assert "--num_processes 2" in text and "--num_machines 2" in text and f"--max_steps {STEPS}" in text
    assert f"--deepspeed_config_file {ds}" in text
    assert "127.0.0.2" in text  # head n1 resolved to its address

    # One ZeRO-3 group spanned both nodes: every optimizer step saw 2 ranks x BATCH pairs.
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = {r["step"]: r for r in rows if "loss_exact" in r}
    assert sorted(steps) == list(range(1, STEPS + 1)), rows
    assert all(r["pairs"] == 2 * BATCH for r in steps.values()), rows
    assert "held-out accuracy" in text and "model saved to" in text

    # The exported model is whole (gathered from the ZeRO-3 shards) and reloads as a plain HF model.
    from transformers import AutoModelForSequenceClassification

    assert (out / "final" / "model.safetensors").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    assert model.score.weight.shape == (1, 32)
    # ... and it is the trained model: its rewards on the eval pairs are those the 2-rank evaluation reported.
    final = json.loads((out / "final_metrics.json").read_text())
    chosen, rejected = _eval_rewards(model, out / "final")
    assert abs(chosen - final["eval_rewards_chosen_mean"]) <= 1e-5, (chosen, final)
    assert abs(rejected - final["eval_rewards_rejected_mean"]) <= 1e-5, (rejected, final)


def _eval_rewards(model, tokenizer_dir):
    from transformers import AutoTokenizer

    from rm_scale.data import RewardDataCollatorWithPadding, prepare_dataset
    from rm_scale.model import forward_rewards
    from rm_scale.commands.recipe import load_preference_files

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = prepare_dataset(load_preference_files(["rm_scale:demo/eval"]), tok, max_length=1024)
    batch = RewardDataCollatorWithPadding(tok)([data[i] for i in range(len(data))])
    with torch.no_grad():
        chosen = forward_rewards(model, batch["input_ids_chosen"], batch["attention_mask_chosen"])
        rejected = forward_rewards(model, batch["input_ids_rejected"], batch["attention_mask_rejected"])
    return chosen.mean().item(), rejected.mean().item()


def test_missing_recipe_fails_fast_with_a_clear_message(slurm_cluster, tmp_path):
    job, log = _submit(slurm_cluster, tmp_path, tmp_path / "nope.yaml", tiny_ds_config("zero3.json", tmp_path))
    assert slurm_cluster.wait(job, timeout=60) == "FAILED"
    text = log.read_text()
    assert "RECIPE=" in text and "nope.yaml not found" in text, text
    assert "rm_scale node" not in text  # nothing was launched


def _wait_for(path, cluster, job, log, timeout=180):
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = cluster.state(job)
        assert state not in TERMINAL_STATES and time.monotonic() < deadline, (
            f"{state}: no {path}\n{log.read_text()[-6000:] if log.exists() else ''}")
        time.sleep(0.05)


def _complete_checkpoints(out):
    return sorted(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{MARKER}"))


def test_usr1_then_preemption_each_checkpoint_requeue_and_resume_to_the_uninterrupted_model(slurm_cluster, tmp_path):
    """Two interruptions of one job, each ending in a checkpoint, a requeue and a resume:
    1. time limit near: USR1 to the batch shell (what --signal=B:USR1@120 sends) -> forwarded to the ranks ->
       checkpoint at the next step -> rank 0 requeues the job;
    2. real preemption: a job in the higher-priority partition `urgent` needs the nodes -> Slurm sends SIGTERM to the
       ranks (GraceTime 60 s) -> checkpoint -> the batch script sees PreemptTime and requeues; the urgent job runs;
    then the job resumes and finishes with the same per-step losses and final weights as an uninterrupted run."""
    steps = 64
    out = tmp_path / "out"
    recipe, _ = tiny_recipe(tmp_path, data={"train": ["rm_scale:demo/train"], "streaming": False},
                            output_dir=str(out), max_steps=steps, per_device_train_batch_size=BATCH,
                            save_strategy="steps", save_steps=4, save_total_limit=2)
    ds = tiny_ds_config("zero3.json", tmp_path)
    job, log = _submit(slurm_cluster, tmp_path, recipe, ds)
    _wait_for(out / "checkpoint-4" / MARKER, slurm_cluster, job, log)
    slurm_cluster.signal(job, "USR1")

    # The restart: wait until it has saved a checkpoint of its own (it resumed), then preempt it.
    deadline = time.monotonic() + 240
    while True:
        text = log.read_text() if log.exists() else ""
        saved = re.search(r"saving a checkpoint at step (\d+) and stopping", text)
        if saved and f"job {job} restart 1" in text and _complete_checkpoints(out)[-1:] > [int(saved.group(1))]:
            break
        state = slurm_cluster.state(job)
        assert state not in TERMINAL_STATES and time.monotonic() < deadline, f"{state}\n{text[-6000:]}"
        time.sleep(0.05)
    urgent_log = tmp_path / "urgent.out"
    urgent = slurm_cluster.sbatch("#!/bin/bash\necho urgent ran on $SLURM_JOB_NODELIST\n", "-p", "urgent",
                                  "--nodes=2", "--exclusive", "-o", str(urgent_log), cwd=tmp_path)

    # Meanwhile, the same run without any signal (2 ranks, same DeepSpeed config, on this machine).
    ref = tmp_path / "reference"
    launch = launch_config("zero3.yaml", tmp_path, ds_config=ds)
    run_train(recipe, ["--output_dir", str(ref)], launch=launch)

    assert slurm_cluster.wait(urgent, timeout=300) == "COMPLETED", urgent_log.read_text()
    state = slurm_cluster.wait(job, timeout=300)
    text = log.read_text()
    assert state == "COMPLETED", f"{state}\n{text[-6000:]}"
    assert slurm_cluster.job_info(job)["Restarts"] == "2", text[-6000:]
    first_run, rest = text.split(f"job {job} restart 1", 1)
    second_run, third_run = rest.split(f"job {job} restart 2", 1)

    # 1. USR1: both ranks (one per node) got it; the launchers ignored it; rank 0 requeued after the checkpoint.
    assert "USR1" in first_run and "forwarding to the ranks" in first_run, first_run[-6000:]
    assert len(re.findall(r"got SIGUSR1", first_run)) == 2, first_run[-6000:]
    assert f"Requeued Slurm job {job} (restart 1)" in first_run, first_run[-6000:]
    step0 = int(re.search(r"saving a checkpoint at step (\d+) and stopping", first_run).group(1))
    assert 4 <= step0 < steps
    assert "--resume_from_checkpoint auto" in second_run
    assert re.search(rf"resuming from \S+/checkpoint-{step0}\b", second_run), second_run[:6000]

    # 2. Preemption: SIGTERM reached both ranks from Slurm (not through srun, which would have SIGKILLed them), they
    # saved at the next step within GraceTime, and the batch script -- not the ranks -- requeued the preempted job.
    assert len(re.findall(r"got SIGTERM", second_run)) == 2, second_run[-6000:]
    assert "got SIGUSR1" not in second_run and "forcing job termination" not in second_run, second_run[-6000:]
    step1 = int(re.search(r"saving a checkpoint at step (\d+) and stopping", second_run).group(1))
    assert step0 < step1 < steps, (step0, step1)
    assert re.search(rf"preempted at \S+; requeueing job {job} \(restart 2\)", second_run), second_run[-6000:]
    assert "Requeued Slurm job" not in second_run  # SIGTERM: the ranks do not requeue (a scancel sends it too)
    assert re.search(rf"resuming from \S+/checkpoint-{step1}\b", third_run), third_run[:6000]
    assert "urgent ran on n[1-2]" in urgent_log.read_text()

    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [r["step"] for r in rows if "loss_exact" in r]
    assert logged == list(range(1, steps + 1)), logged  # each step once: every restart went on where it stopped
    assert all(r["pairs"] == 2 * BATCH for r in rows if "loss_exact" in r)
    ref_rows = [json.loads(line) for line in open(ref / "metrics.jsonl")]
    ref_loss = {r["step"]: r["loss_exact"] for r in ref_rows if "loss_exact" in r}
    for r in rows:
        if "loss_exact" in r:
            assert abs(r["loss_exact"] - ref_loss[r["step"]]) <= 1e-6, r["step"]
    from safetensors.torch import load_file

    got, want = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-6, name


def test_a_rank_killed_during_a_save_fails_the_job_fast_and_the_resubmit_resumes(slurm_cluster, tmp_path):
    """SIGKILL one rank's process on node n2 while checkpoint-8 is being written: its node's launcher exits non-zero,
    srun --kill-on-bad-exit ends the other node, the job is FAILED within seconds (no rank left waiting in a
    collective) and not requeued. The half-written checkpoint is ignored; a resubmit on 1 node is refused before the
    model loads (2-rank ZeRO-3 shards); a resubmit on 2 nodes resumes from the last complete checkpoint and finishes."""
    out = tmp_path / "out"
    recipe, _ = tiny_recipe(tmp_path, data={"train": ["rm_scale:demo/train"], "streaming": False},
                            output_dir=str(out), max_steps=5000, per_device_train_batch_size=BATCH,
                            save_strategy="steps", save_steps=4, ddp_timeout=120)
    ds = tiny_ds_config("zero3.json", tmp_path)
    job, log = _submit(slurm_cluster, tmp_path, recipe, ds)
    _wait_for(out / "checkpoint-4" / MARKER, slurm_cluster, job, log)
    ranks = _job_ranks(job)
    assert sorted(ranks) == [0, 1], ranks
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-8").exists():  # the save of step 8 has begun
        assert time.monotonic() < deadline, log.read_text()[-6000:]
        time.sleep(0.002)
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    completed_8 = (out / "checkpoint-8" / MARKER).exists()
    state = slurm_cluster.wait(job, timeout=150)
    elapsed = time.monotonic() - killed
    text = log.read_text()
    assert state == "FAILED", f"{state}\n{text[-6000:]}"
    assert elapsed < 60, f"{elapsed:.0f}s to fail: a rank waited in a collective\n{text[-6000:]}"
    assert slurm_cluster.job_info(job)["Restarts"] == "0"
    assert re.search(r"exitcode\s*:\s*-9", text), text[-6000:]  # torchrun on n2 reports the killed rank
    completed_8 = completed_8 or (out / "checkpoint-8" / MARKER).exists()
    expected = "checkpoint-8" if completed_8 else "checkpoint-4"
    print(f"killed {elapsed:.1f}s before the job ended; checkpoint-8 complete: {completed_8}")
    assert (out / "checkpoint-4" / MARKER).exists()

    # Resubmitted on 1 node, it would resume 2-rank ZeRO-3 shards with 1 rank: refused before the model is loaded.
    job, log = _submit(slurm_cluster, tmp_path, recipe, ds, sbatch_args=("--nodes=1",), log_name="one_node.out")
    assert slurm_cluster.wait(job, timeout=150) == "FAILED"
    text = log.read_text()
    assert re.search(r"checkpoint-\d+ was saved by 2 processes but this run has 1 \(ZeRO-3 shards are per rank\)",
                     text), text[-6000:]
    assert "nodes x GPUs per node = 2" in text

    # Resubmitted as it was (shorter), it resumes from the last complete checkpoint and finishes.
    job, log = _submit(slurm_cluster, tmp_path, recipe, ds, script_args=("--max_steps", "12"), log_name="again.out")
    state = slurm_cluster.wait(job, timeout=240)
    text = log.read_text()
    assert state == "COMPLETED", f"{state}\n{text[-6000:]}"
    assert re.search(rf"resuming from \S+/{expected}\b", text), text[:6000]
    if not completed_8:
        assert re.search(r"Ignoring \S+/checkpoint-8: no rm_scale_complete.json", text), text[:6000]
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "loss_exact" in line]
    assert steps == list(range(1, 13)), steps  # each step once: the killed run's records after the resume were cut
    assert (out / "final" / "model.safetensors").exists()


def _job_ranks(job):
    """{global rank: pid} of the training processes of a job (not the launchers), found by their environment."""
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            env_ = dict(kv.split(b"=", 1) for kv in open(f"/proc/{d}/environ", "rb").read().split(b"\0") if b"=" in kv)
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
        except OSError:
            continue
        if env_.get(b"SLURM_JOB_ID") == str(job).encode() and b"RANK" in env_ and b"accelerate" not in cmd:
            if b"rm_scale" in cmd:
                found[int(env_[b"RANK"])] = int(d)
    return found
