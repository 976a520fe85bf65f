"""A run never exits 0 with a model that is not what was asked for: resuming from a checkpoint at the end of an
epoch trains the rest, resuming a finished run trains nothing, and data without a usable pair is an error before
the model loads. In one process (the Python API) and under 2-rank ZeRO-3 (`accelerate launch`), streamed and
map-style."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from launch import ROOT, env, launch_config, metrics, run_train, start_train, tiny_ds_config, tiny_recipe, worker_pids
from rm_scale import RewardConfig, RewardTrainer
from rm_scale.commands.recipe import load_preference_files
from rm_scale.data import PairFiles
from rm_scale.model import load_reward_model


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=2e-3, logging_steps=1,
                save_strategy="steps", report_to=[], seed=0, lr_scheduler_type="constant", save_on_signal=False)
    return RewardConfig(**{**base, **kw})


def _train(tiny_dir, out, data, *, resume=None, **kw):
    trainer = RewardTrainer(model=load_reward_model(str(tiny_dir)), args=_args(out, **kw),
                            tokenizer=AutoTokenizer.from_pretrained(tiny_dir), train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss_exact"] for h in trainer.state.log_history if "loss_exact" in h}
    return trainer, losses


def _logged_steps(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "loss_exact" in line]


def _data(streamed):
    # 128 pairs, 8 per step: one epoch is 16 steps
    return PairFiles(["rm_scale:demo/eval"]) if streamed else load_preference_files(["rm_scale:demo/eval"])


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "map-style"])
def test_resume_from_the_last_step_of_an_epoch_trains_the_next_epoch(tiny_dir, tmp_path, streamed):
    full, full_losses = _train(tiny_dir, tmp_path / "full", _data(streamed), max_steps=20, save_steps=16)
    assert sorted(full_losses) == list(range(1, 21))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-16", resumed_dir / "checkpoint-16")
    resumed, losses = _train(tiny_dir, resumed_dir, _data(streamed), max_steps=20, save_steps=16, resume="auto")
    assert resumed.state.global_step == 20 and _logged_steps(resumed_dir) == [17, 18, 19, 20]
    for step in range(17, 21):
        assert abs(losses[step] - full_losses[step]) <= 1e-6, step
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "map-style"])
def test_resuming_a_finished_run_trains_nothing(tiny_dir, tmp_path, streamed):
    first, _ = _train(tiny_dir, tmp_path, _data(streamed), max_steps=6, save_steps=6)
    weights = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    again, _ = _train(tiny_dir, tmp_path, _data(streamed), max_steps=6, save_steps=6, resume="auto")
    assert again.state.global_step == 6 and _logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]
    for name, p in again.model.named_parameters():
        assert torch.equal(p, weights[name]), name  # the checkpoint's weights, not one step more


def test_streamed_data_without_a_usable_pair_is_an_error_before_training(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "same", "rejected": "same"}\n{oops\n{"chosen": "a"}\n')
    trainer = RewardTrainer(model=load_reward_model(str(tiny_dir)), args=_args(tmp_path / "out", max_steps=4),
                            tokenizer=AutoTokenizer.from_pretrained(tiny_dir), train_dataset=PairFiles([str(bad)]))
    with pytest.raises(ValueError, match=r"No usable preference pair in .*bad\.jsonl: skipped 1 identical chosen "
                                         r"and rejected, 1 malformed JSON, 1 missing field\. Check the files"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "out" / "checkpoint-4").exists()


# ---- the same through `rm-scale train`: 1 process and 2-rank ZeRO-3 ------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finish")
    recipe, model_dir = tiny_recipe(tmp, data={"train": ["rm_scale:demo/eval"]}, per_device_train_batch_size=4,
                                    lr_scheduler_type="constant", save_strategy="steps")
    launch = launch_config("zero3.yaml", tmp, ds_config=tiny_ds_config("zero3.json", tmp))
    return tmp, recipe, launch


def _final_weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.slow
def test_zero3_resume_at_an_epoch_end_and_of_a_finished_run(setup):
    """2 ranks x 4 pairs: 16 steps an epoch. A checkpoint at step 16 resumes into the second epoch; that run is
    killed while publishing its model; running the job again trains no step and publishes the model of the last
    checkpoint, equal to the uninterrupted run's."""
    tmp, recipe, launch = setup
    common = ["--data.streaming", "true", "--max_steps", "20", "--save_steps", "16"]
    full = tmp / "z3_full"
    run_train(recipe, ["--output_dir", str(full), *common], launch=launch)
    steps = {m["step"]: m["loss_exact"] for m in metrics(full) if "loss_exact" in m}
    resumed = tmp / "z3_resumed"
    shutil.copytree(full / "checkpoint-16", resumed / "checkpoint-16")
    # The resumed run is killed (every process, as a node failure) while its exported model is staged, not yet moved.
    log = tmp / "z3_resumed.log"
    proc = start_train(recipe, ["--output_dir", str(resumed), *common, "--resume_from_checkpoint", "auto"],
                       launch=launch, log=log, extra_env={"RM_SCALE_HOLD_AT": "final:staged"})
    try:
        deadline = time.monotonic() + 300
        while "holding at final:staged" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        assert (resumed / "final.partial").is_dir() and not (resumed / "final").exists()
    finally:  # the workers too: torchrun starts each in a session of its own, out of the launcher's group
        for pid in [*worker_pids(proc).values(), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    proc = run_train(recipe, ["--output_dir", str(resumed), *common, "--resume_from_checkpoint", "auto"], launch=launch)
    assert "already finished" in proc.stderr
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-20"]
    again = {m["step"]: m["loss_exact"] for m in metrics(resumed) if "loss_exact" in m}
    assert sorted(again) == list(range(17, 21))  # steps 17-20 once: none trained again
    assert all(abs(again[s] - steps[s]) <= 1e-6 for s in again)
    resumed_weights, checkpoint = _final_weights(resumed), load_file(str(resumed / "checkpoint-20" / "model.safetensors"))
    for name, w in _final_weights(full).items():
        assert torch.allclose(w, resumed_weights[name], atol=1e-6), name
        assert torch.equal(resumed_weights[name], checkpoint[name]), name


def _train_cli(recipe, args, *, launch=None):
    if launch is None:
        cmd = [sys.executable, "-m", "rm_scale", "train", "--config", str(recipe), *args]
    else:
        from launch import free_port

        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch), "--num_processes",
               "2", "--main_process_port", str(free_port()), "-m", "rm_scale", "train", "--config", str(recipe), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("streaming", ["true", "false"])
def test_data_without_a_usable_pair_fails_before_the_model_loads(setup, ranks, streaming):
    tmp, recipe, launch = setup
    bad = tmp / f"bad_{ranks}_{streaming}.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "same", "rejected": "same"}\n' * 3 + "[1, 2]\n")
    out = tmp / f"empty_{ranks}_{streaming}"
    proc = _train_cli(recipe, ["--output_dir", str(out), "--data.train", str(bad), "--data.streaming", streaming,
                               "--max_steps", "4"], launch=launch if ranks == 2 else None)
    assert proc.returncode != 0
    assert f"No usable preference pair in {bad}: skipped 3 identical chosen and rejected, 1 malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr if ranks == 1 else True  # 1 process: a clean message, exit 2
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
    assert "No score head" not in proc.stderr  # the tiny model has none: loading it would have said so


@pytest.mark.slow
def test_strict_bad_row_on_one_rank_stops_every_rank(setup):
    """Two files, one per rank (file-level shards): rank 1's file has a bad row. Both ranks stop before the first
    step: rank 1 with the row's file and line, rank 0 saying another rank stopped (instead of waiting in a
    collective until the launcher's grace time). Blocks of 8 rows: the check that the data has a usable pair at all
    (which reads the data as one rank would, until its first batch) finds one in the first block of good rows."""
    tmp, recipe, launch = setup
    rows = [json.loads(line) for line in open(ROOT / "rm_scale" / "data" / "demo_data" / "eval.jsonl")]
    good, bad = tmp / "strict_a.jsonl", tmp / "strict_b.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows[32:40]) + "{oops\n")
    out = tmp / "strict"
    proc = _train_cli(recipe, ["--output_dir", str(out), "--data.train", json.dumps([str(good), str(bad)]),
                               "--data.streaming", "true", "--max_steps", "4", "--strict_data", "true",
                               "--stream_block_size", "8"],
                      launch=launch)
    assert proc.returncode != 0
    assert f"{bad}:9: malformed JSON" in proc.stderr
    assert "another rank stopped at a bad row" in proc.stderr


@pytest.mark.slow
def test_zero3_resume_when_one_rank_never_had_a_batch(setup):
    """Two files, one per rank: one holds no usable pair, so its rank only ever pads. Its checkpoint still holds a
    data position (the start of the epoch), and the resumed run logs the uninterrupted run's losses."""
    tmp, recipe, launch = setup
    rows = [json.loads(line) for line in open(ROOT / "rm_scale" / "data" / "demo_data" / "eval.jsonl")]
    good, empty = tmp / "pad_a.jsonl", tmp / "pad_b.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows[:40]))
    empty.write_text(json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")
    common = ["--data.train", json.dumps([str(good), str(empty)]), "--data.streaming", "true", "--max_steps", "8",
              "--save_steps", "4", "--per_device_train_batch_size", "4"]
    full = tmp / "pad_full"
    run_train(recipe, ["--output_dir", str(full), *common], launch=launch)
    states = [json.loads((full / "checkpoint-4" / f"rm_scale_data_rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(s["upstream"] is None and s["emitted"] == 0 for s in states) == [False, True]  # files are shuffled
    resumed = tmp / "pad_resumed"
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    run_train(recipe, ["--output_dir", str(resumed), *common, "--resume_from_checkpoint", "auto"], launch=launch)
    steps = {m["step"]: m["loss_exact"] for m in metrics(full) if "loss_exact" in m}
    again = {m["step"]: m["loss_exact"] for m in metrics(resumed) if "loss_exact" in m}
    assert sorted(again) == [5, 6, 7, 8] and all(abs(again[s] - steps[s]) <= 1e-6 for s in again)


# ---- streamed evaluation: each rank its shard, every pair counted once -----------------------------------------


@pytest.mark.slow
def test_streamed_evaluation_counts_every_pair_once_on_two_ranks(setup):
    """13 evaluation pairs (odd: a rank gets one more, and the other pads) with one bad row: 2-rank ZeRO-3 gives the
    metrics of one process, map-style (the files materialised) and streamed alike."""
    tmp, recipe, launch = setup
    rows = [json.loads(line) for line in open(ROOT / "rm_scale" / "data" / "demo_data" / "eval.jsonl")][:13]
    held = tmp / "held_out.jsonl"
    held.write_text("".join(json.dumps({**r, "subset": "ab"[i % 3 == 0]}) + "\n" for i, r in enumerate(rows))
                    + '{"prompt": "x", "chosen": "same", "rejected": "same"}\n')
    common = ["--data.eval", str(held), "--max_steps", "2", "--per_device_eval_batch_size", "2", "--save_strategy",
              "no", "--learning_rate", "0"]  # the same model in each run: only the evaluation differs
    results = {}
    for name, streaming, use in (("map1", "false", None), ("stream1", "true", None), ("stream2", "true", launch)):
        out = tmp / f"eval_{name}"
        proc = _train_cli(recipe, ["--output_dir", str(out), "--data.streaming", streaming, *common], launch=use)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "held-out accuracy" in proc.stdout and "on 13 pairs" in proc.stdout, proc.stdout[-2000:]
        results[name] = json.loads((out / "final_metrics.json").read_text())
    reference = results["map1"]
    keys = ["eval_loss", "eval_accuracy", "eval_accuracy_a", "eval_accuracy_b", "eval_margin", "eval_rewards_mean",
            "eval_rewards_std"]
    for name in ("stream1", "stream2"):
        assert results[name]["eval_pairs"] == 13, results[name]
        for k in keys:
            assert results[name][k] == pytest.approx(reference[k], abs=1e-5), (name, k)
    report = json.loads((tmp / "eval_stream2" / "data_report.json").read_text())
    assert sum(r["pairs"] for r in report["eval_stream_per_rank"]) == 13
    assert sum(r["dropped"].get("identical chosen and rejected", 0) for r in report["eval_stream_per_rank"]) == 1
