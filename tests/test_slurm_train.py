"""`sbatch slurm/train.sh` for real: 2 Slurm nodes x 1 CPU worker, one ZeRO-3 group across both, model saved.

Uses the single-host cluster of tests/slurm_cluster.py (nodes n1, n2 on 127.0.0.2, 127.0.0.3), so the script runs
exactly as users submit it: from the repository root, settings through environment variables.
"""

import json
import re
import sys
import time

import pytest
import torch
import yaml

from launch import ROOT, env, free_port, launch_config, run_train, tiny_ds_config
from rm_scale.checkpoint import MARKER
from slurm_cluster import TERMINAL_STATES
from tiny import make_tiny_model_dir

pytestmark = pytest.mark.slow

STEPS = 4
BATCH = 2  # per device


def _submit(cluster, tmp_path, recipe, ds, *, script_args=()):
    log = tmp_path / "job.out"
    # No Slurm variables of a surrounding job (sbatch reads SBATCH_*; SLURM_CONF must stay the test cluster's).
    job_env = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    job_env.update(RECIPE=str(recipe), DS_CONFIG=str(ds), PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    job_env.pop("GPUS_PER_NODE", None)  # exercise the detection: no GPU -> 1 worker per node
    # The script's defaults ask 16 CPUs a node; these emulated nodes have 2.
    job = cluster.sbatch(ROOT / "slurm" / "train.sh", "--cpus-per-task=2", "-o", str(log),
                         env=job_env, cwd=ROOT, script_args=script_args)
    return job, log


def test_sbatch_two_nodes_zero3_trains_and_saves(slurm_cluster, tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": ["rm_scale:demo/train"], "eval": ["rm_scale:demo/eval"]},
        "train": {"output_dir": str(out), "max_steps": 1000, "per_device_train_batch_size": BATCH,
                  "per_device_eval_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1,
                  "save_strategy": "no", "report_to": [], "seed": 0},
    }))
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
    from rm_scale.recipe import load_preference_files

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


def test_usr1_checkpoints_requeues_and_the_restart_resumes_to_the_uninterrupted_model(slurm_cluster, tmp_path):
    """Time limit near (USR1 to the batch shell) -> forwarded to the ranks -> checkpoint at the next step -> rank 0
    requeues the job -> the restart resumes from that checkpoint (RESUME=auto) -> same model as without the signal."""
    steps = 40
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": ["rm_scale:demo/train"], "streaming": False},
        "train": {"output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": BATCH,
                  "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "steps", "save_steps": 4,
                  "save_total_limit": 2, "report_to": [], "seed": 0},
    }))
    ds = tiny_ds_config("zero3.json", tmp_path)
    job, log = _submit(slurm_cluster, tmp_path, recipe, ds)
    first = out / "checkpoint-4" / MARKER
    deadline = time.monotonic() + 180
    while not first.exists():
        state = slurm_cluster.state(job)
        assert state not in TERMINAL_STATES and time.monotonic() < deadline, (
            f"{state}: no checkpoint-4\n{log.read_text()[-6000:] if log.exists() else ''}")
        time.sleep(0.05)
    slurm_cluster.signal(job, "USR1")  # what --signal=B:USR1@120 delivers before the time limit

    # Meanwhile, the same run without any signal (2 ranks, same DeepSpeed config, on this machine).
    ref = tmp_path / "reference"
    launch = launch_config("zero3.yaml", tmp_path, ds_config=ds)
    run_train(recipe, ["--output_dir", str(ref)], launch=launch)

    state = slurm_cluster.wait(job, timeout=300)
    text = log.read_text()
    assert state == "COMPLETED", f"{state}\n{text[-6000:]}"
    assert slurm_cluster.job_info(job)["Restarts"] == "1", text[-6000:]
    first_run, restart = text.split(f"job {job} restart 1", 1)
    assert "USR1" in first_run and "forwarding to the ranks" in first_run, first_run[-6000:]
    # Both ranks (one per node) got the signal; the launchers ignored it; rank 0 requeued after the checkpoint.
    assert len(re.findall(r"got SIGUSR1", first_run)) == 2, first_run[-6000:]
    assert f"Requeued Slurm job {job} (restart 1)" in first_run, first_run[-6000:]
    saved = re.search(r"saving a checkpoint at step (\d+) and stopping", first_run)
    assert saved, first_run[-6000:]
    step0 = int(saved.group(1))
    assert 4 <= step0 < steps
    assert "--resume_from_checkpoint auto" in restart
    assert re.search(rf"resuming from \S+/checkpoint-{step0}\b", restart), restart[:6000]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    logged = [r["step"] for r in rows if "loss_exact" in r]
    assert logged == list(range(1, steps + 1)), logged  # each step once: the restart went on after step0
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
