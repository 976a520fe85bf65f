"""Real multi-process runs: 2 ranks through `accelerate launch` with the shipped configs, DeepSpeed on gloo (CPU)."""

import json
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from launch import launch_config, metrics, run_train, tiny_ds_config, tiny_recipe
from rm_scale.data import RewardDataCollatorWithPadding, prepare_dataset
from rm_scale.model import forward_rewards
from rm_scale.commands.recipe import load_preference_files, resolve_data_files

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    # map-style data: the same global batch whatever the world size (the stream shards by rank instead)
    recipe, model_dir = tiny_recipe(
        tmp, data={"train": ["rm_scale:demo/train"], "eval": ["rm_scale:demo/eval"], "streaming": False},
        max_steps=STEPS, per_device_eval_batch_size=8, center_rewards_coefficient=0.01)
    return tmp, model_dir, recipe


@pytest.fixture(scope="module")
def one_process(setup):
    tmp, _, recipe = setup
    out = tmp / "single"
    run_train(recipe, ["--output_dir", str(out), "--per_device_train_batch_size", "4"])
    return {m["step"]: m for m in metrics(out) if "loss_exact" in m}


def _reloaded_eval_rewards(model_dir, tokenizer_dir, *, peft=False):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if peft:
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.eval()
    data = prepare_dataset(load_preference_files(["rm_scale:demo/eval"]), tok, max_length=1024)
    batch = RewardDataCollatorWithPadding(tok)([data[i] for i in range(len(data))])
    with torch.no_grad():
        chosen = forward_rewards(model, batch["input_ids_chosen"], batch["attention_mask_chosen"])
        rejected = forward_rewards(model, batch["input_ids_rejected"], batch["attention_mask_rejected"])
    return chosen.mean().item(), rejected.mean().item(), ((chosen > rejected).float().mean().item())


def _check_step1_equal(dist, one):
    # Same global batch (2 ranks x 2 pairs vs 1 x 4): same loss and same gradient norm at step 1.
    assert abs(dist[1]["loss_exact"] - one[1]["loss_exact"]) <= 1e-5, (dist[1], one[1])
    assert abs(dist[1]["grad_norm"] - one[1]["grad_norm"]) <= 1e-4 * max(1.0, one[1]["grad_norm"])
    assert dist[1]["pairs"] == one[1]["pairs"] == 4


def test_zero3_two_ranks_match_one_process_and_the_saved_model_reloads(setup, one_process):
    tmp, model_dir, recipe = setup
    out = tmp / "zero3"
    launch = launch_config("zero3.yaml", tmp, ds_config=tiny_ds_config("zero3.json", tmp))
    proc = run_train(recipe, ["--output_dir", str(out), "--per_device_train_batch_size", "2"], launch=launch)
    dist = {m["step"]: m for m in metrics(out) if "loss_exact" in m}
    assert sorted(dist) == list(range(1, STEPS + 1))
    _check_step1_equal(dist, one_process)
    # Later steps see the same data and the same (partitioned) Adam update: they stay together too.
    for step in range(2, STEPS + 1):
        assert abs(dist[step]["loss_exact"] - one_process[step]["loss_exact"]) <= 1e-4
    final = json.loads((out / "final_metrics.json").read_text())
    chosen, rejected, acc = _reloaded_eval_rewards(out / "final", out / "final")
    assert abs(chosen - final["eval_rewards_chosen_mean"]) <= 1e-5
    assert abs(rejected - final["eval_rewards_rejected_mean"]) <= 1e-5
    assert abs(acc - final["eval_accuracy"]) <= 1e-6
    assert "held-out accuracy" in proc.stdout


def test_zero3_lora_trains_saves_and_reloads(setup):
    tmp, model_dir, recipe = setup
    out = tmp / "zero3_lora"
    launch = launch_config("zero3.yaml", tmp, ds_config=tiny_ds_config("zero3.json", tmp))
    run_train(recipe, ["--output_dir", str(out), "--per_device_train_batch_size", "2", "--lora.r", "8",
                       "--lora.lora_alpha", "32", "--lora.lora_dropout", "0.0",
                       "--activation_checkpointing", "true"], launch=launch)  # PEFT + ZeRO-3 + checkpointing: trl#2514
    dist = {m["step"]: m for m in metrics(out) if "loss_exact" in m}
    assert sorted(dist) == list(range(1, STEPS + 1))
    assert (out / "final" / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    adapter = load_file(out / "final" / "adapter_model.safetensors")
    # ZeRO-3 LoRA saves must not hold empty [0]-shaped or all-zero lora_B tensors (OpenRLHF#682, trl#939).
    assert all(t.numel() > 0 for t in adapter.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items())
    assert any("score" in k for k in adapter)
    final = json.loads((out / "final_metrics.json").read_text())
    chosen, rejected, _ = _reloaded_eval_rewards(out / "final", out / "final", peft=True)
    assert abs(chosen - final["eval_rewards_chosen_mean"]) <= 1e-5
    assert abs(rejected - final["eval_rewards_rejected_mean"]) <= 1e-5


def test_zero2_two_ranks_match_one_process(setup, one_process):
    tmp, _, recipe = setup
    out = tmp / "zero2"
    launch = launch_config("zero2.yaml", tmp)
    run_train(recipe, ["--output_dir", str(out), "--per_device_train_batch_size", "2"], launch=launch)
    dist = {m["step"]: m for m in metrics(out) if "loss_exact" in m}
    _check_step1_equal(dist, one_process)
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("mode", ["ddp", "zero1", "zero3_offload"])
def test_every_shipped_launch_mode_trains_two_ranks_like_one_process(setup, one_process, mode):
    """The launch files not covered above, each with its shipped DeepSpeed JSON (ZeRO-3 + offload: DeepSpeed's own
    CPU AdamW, built on first use): step 1 has the loss and gradient of one process on the same global batch, the
    loss falls, and a model folder is written. (ZeRO-2 and ZeRO-3: the tests above.)"""
    tmp, _, recipe = setup
    out = tmp / mode
    ds = None if mode == "ddp" else tiny_ds_config(f"{mode}.json", tmp)
    launch = launch_config(f"{mode}.yaml", tmp, ds_config=ds)
    extra = {"ACCELERATE_USE_CPU": "true"} if mode == "ddp" else None  # DDP without GPUs (launch/ddp.yaml says so)
    run_train(recipe, ["--output_dir", str(out), "--per_device_train_batch_size", "2"], launch=launch,
              extra_env=extra)
    dist = {m["step"]: m for m in metrics(out) if "loss_exact" in m}
    _check_step1_equal(dist, one_process)
    assert sorted(dist) == list(range(1, STEPS + 1))
    assert (out / "final" / "model.safetensors").exists()


def test_a_bf16_model_with_lora_trains_under_zero2(setup, tmp_path):
    """Under DeepSpeed the adapters keep the model's dtype (fp32 adapters next to the bf16 score head fail ZeRO-1/2's
    forward: "expected m1 and m2 to have the same dtype"); without DeepSpeed they are fp32 (tests/test_trl_parity)."""
    import yaml

    tmp, _, recipe = setup
    r = yaml.safe_load(recipe.read_text())
    r["model"]["dtype"], r["lora"] = "bfloat16", {"r": 4, "lora_alpha": 8}
    bf16 = tmp_path / "bf16_lora.yaml"
    bf16.write_text(yaml.safe_dump(r))
    launch = launch_config("zero2.yaml", tmp_path, ds_config=tiny_ds_config("zero2.json", tmp_path))
    run_train(bf16, ["--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_steps", "2"],
              launch=launch)
    assert (tmp_path / "out" / "final" / "adapter_config.json").exists()


def _uneven_files(tmp):
    """Two files, so the stream shards by file: rank 0 gets 24 pairs, rank 1 only 3."""
    rows = [json.loads(line) for line in open(resolve_data_files(["rm_scale:demo/train"])[0])]
    big, small = tmp / "big.jsonl", tmp / "small.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[24:27]))
    return f"[{big}, {small}]"


def test_zero3_stream_with_uneven_shards_finishes_and_resumes_exactly(setup):
    """Rank 1 runs out after 2 micro-batches per epoch while rank 0 has 12: no hang, several epochs, and a run
    resumed from a mid-run checkpoint logs exactly the losses of the uninterrupted run."""
    tmp, _, recipe = setup
    launch = launch_config("zero3.yaml", tmp, ds_config=tiny_ds_config("zero3.json", tmp))
    files = _uneven_files(tmp)
    common = ["--data.streaming", "true", "--data.train", files, "--per_device_train_batch_size", "2",
              "--max_steps", "16", "--save_strategy", "steps", "--save_steps", "7", "--data.eval", "null",
              "--batching", "length_grouped", "--stream_block_size", "8"]
    full = tmp / "stream_full"
    run_train(recipe, ["--output_dir", str(full), *common], launch=launch)
    steps = {m["step"]: m for m in metrics(full) if "loss_exact" in m}
    assert sorted(steps) == list(range(1, 17))
    # 27 pairs a pass, 4 at most a step: more than one epoch happened, and steps where rank 1 padded count 2 pairs
    assert {m["pairs"] for m in steps.values()} >= {2.0, 4.0}
    # rank_balance = mean / busiest rank's computed tokens: where rank 1 ran only its 1-token padding batch, rank 0
    # computed all but a sliver of the step's tokens, so the mean rank is just over half of the busiest one
    assert all(0 < m["rank_balance"] <= 1 for m in steps.values())
    padded = [m["rank_balance"] for m in steps.values() if m["pairs"] == 2.0]
    assert padded and 0.5 < min(padded) < 0.6, padded
    assert max(m["rank_balance"] for m in steps.values()) > 0.6
    state = json.loads((full / "checkpoint-7" / "rm_scale_data_rank1.json").read_text())
    assert state["rank"] == 1 and state["world_size"] == 2

    resumed = tmp / "stream_resumed"
    import shutil

    shutil.copytree(full / "checkpoint-7", resumed / "checkpoint-7")
    run_train(recipe, ["--output_dir", str(resumed), *common, "--resume_from_checkpoint", "true"], launch=launch)
    again = {m["step"]: m for m in metrics(resumed) if "loss_exact" in m}
    assert sorted(again) == list(range(8, 17))
    for step in range(8, 17):
        assert again[step]["pairs"] == steps[step]["pairs"]
        assert abs(again[step]["loss_exact"] - steps[step]["loss_exact"]) <= 1e-6, step
        assert again[step]["rank_balance"] == steps[step]["rank_balance"], step  # the same batches on each rank


def test_zero3_eval_of_an_odd_sized_set_counts_each_pair_once(setup):
    """13 eval pairs over 2 ranks x 4 per batch: the last batches are uneven; no hang, no duplicated pair."""
    tmp, _, recipe = setup
    rows = [json.loads(line) for line in open(resolve_data_files(["rm_scale:demo/eval"])[0])][:13]
    odd = tmp / "odd_eval.jsonl"
    odd.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "zero3_odd_eval"
    launch = launch_config("zero3.yaml", tmp, ds_config=tiny_ds_config("zero3.json", tmp))
    run_train(recipe, ["--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "1",
                       "--per_device_eval_batch_size", "4", "--data.eval", f"[{odd}]"], launch=launch)
    final = json.loads((out / "final_metrics.json").read_text())
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    data = prepare_dataset(load_preference_files([str(odd)]), tok, max_length=1024)
    batch = RewardDataCollatorWithPadding(tok)([data[i] for i in range(len(data))])
    with torch.no_grad():
        chosen = forward_rewards(model, batch["input_ids_chosen"], batch["attention_mask_chosen"])
    assert len(data) == 13
    assert abs(chosen.mean().item() - final["eval_rewards_chosen_mean"]) <= 1e-5
    assert json.loads((out / "final" / "config.json").read_text())["rm_scale_eval_pairs"] == 13


ENGINE_SCRIPT = """
import atexit, os, sys, time
import torch.distributed as dist
from transformers import AutoTokenizer
from rm_scale import RewardConfig, RewardTrainer
from rm_scale.data import PairFiles
from rm_scale.model import load_reward_model

# registered first, so it runs last: after RewardTrainer's own exit hook
# os.write: one write per line, so the two ranks' lines cannot interleave (print writes the text and its end apart)
atexit.register(lambda: os.write(1, f"EXIT {args.process_index} {dist.is_initialized()} {time.time()}\\n".encode()))
args = RewardConfig(output_dir=sys.argv[2], per_device_train_batch_size=2, max_steps=1, report_to=[],
                    save_strategy="no", activation_checkpointing=False)
trainer = RewardTrainer(model=load_reward_model(sys.argv[1]), args=args,
                        tokenizer=AutoTokenizer.from_pretrained(sys.argv[1]),
                        train_dataset=PairFiles(["rm_scale:demo/train"]))
trainer.train()
if args.process_index == 0:
    time.sleep(2)  # still busy after train(): the other rank must wait for it before the group goes
    os.write(1, f"reduce_scatter: {trainer.model_wrapped.optimizer.reduce_scatter}\\nDONE {time.time()}\\n".encode())
# like every TRL script: no barrier, no destroy_process_group
"""


@pytest.mark.parametrize("given", [None, True], ids=["unset", "set_in_the_json"])
def test_zero3_on_gloo_all_reduces_gradients_in_place_unless_the_json_says(setup, given):
    """rm_scale.dsconfig.gloo_defaults reaches the real engine: with reduce_scatter unset in the DeepSpeed JSON the
    ZeRO-3 optimizer all-reduces the contiguous bucket (no full-size copies on gloo); a value in the JSON is kept."""
    import subprocess
    import sys

    from launch import ROOT, env, free_port

    tmp, model_dir, _ = setup
    folder = tmp / f"engine_{given}"
    folder.mkdir()
    ds = tiny_ds_config("zero3.json", folder)
    if given is not None:
        config = json.loads(ds.read_text())
        config["zero_optimization"]["reduce_scatter"] = given
        ds.write_text(json.dumps(config))
    launch = launch_config("zero3.yaml", folder, ds_config=ds)
    script = folder / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
                           "--num_processes", "2", "--main_process_port", str(free_port()), str(script),
                           str(model_dir), str(folder / "out")], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = False if given is None else given
    assert f"reduce_scatter: {want}" in proc.stdout, proc.stdout[-2000:]
    # The ranks left together (the gloo exit abort that failed CI once): the group was gone at exit on both, and
    # rank 1 left only after rank 0 was done.
    done = float(re.search(r"DONE (\d+\.\d+)", proc.stdout).group(1))  # no anchors: the launcher may glue lines
    exits = {int(r): (flag, float(t)) for r, flag, t in re.findall(r"EXIT (\d) (True|False) (\d+\.\d+)", proc.stdout)}
    assert set(exits) == {0, 1} and all(flag == "False" for flag, _ in exits.values()), proc.stdout[-2000:]
    assert exits[1][1] >= done


LEAVE_SCRIPT = """
import sys, time
import torch.distributed as dist
from rm_scale.distributed import leave_together_at_exit

dist.init_process_group("gloo")
leave_together_at_exit(armed=sys.argv[1] != "disarmed")
if dist.get_rank() == 0:
    time.sleep(90)  # busy: an armed rank 1 would wait this long for it at exit
elif sys.argv[1] == "disarmed":
    sys.exit(3)  # as a script does that caught an error from train() (which leaves the hook disarmed)
else:
    raise ValueError("boom")  # unhandled
"""


@pytest.mark.parametrize("case", ["disarmed", "unhandled"])
def test_a_failing_rank_exits_at_once_rather_than_wait_to_leave_together(tmp_path, case):
    """The exit hook's barrier is for runs that ended well: after train() raised, or after an unhandled exception,
    the rank exits at once (the launcher then ends the others) instead of waiting for peers that may never come."""
    import subprocess
    import sys
    import time

    from launch import ROOT, env, free_port

    script = tmp_path / "leave.py"
    script.write_text(LEAVE_SCRIPT)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), case], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert ("ValueError: boom" in proc.stderr) == (case == "unhandled")
    assert time.monotonic() - start < 60, "the failing rank waited for its peer at exit"
