"""Weights & Biases for real: CLI runs with `report_to: [wandb]` in offline mode, whose run files are parsed.

Checks the VALUES logged (against metrics.jsonl and the saved model), the run identity (name, Slurm group, the id kept
across a resume from a checkpoint) and that no secret from the environment reaches any file W&B or rm_scale wrote.
"""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from launch import ROOT, launch_config, metrics, run_train, tiny_ds_config, tiny_recipe
from rm_scale.data import RewardDataCollatorWithPadding, prepare_dataset
from rm_scale.model import forward_rewards
from rm_scale.commands.recipe import load_preference_files
from rm_scale.train.wandb_logging import REDACTED, SAMPLE_PAIRS, STATE_KEY, is_secret_name, redact, run_group
from wandb_reader import read_run, run_files

FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # shaped like a W&B API key (40 hex digits)
FAKE_HF_TOKEN = "hf_SecretSecretSecretSecretXyz"
EVAL_PAIRS = 128  # rm_scale:demo/eval
SCALARS = ("loss_exact", "loss_bt", "loss_center", "accuracy", "margin", "pairs", "rewards_chosen_mean",
           "rewards_rejected_std", "grad_norm", "learning_rate")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    recipe, _ = tiny_recipe(tmp, data={"train": ["rm_scale:demo/train"], "eval": ["rm_scale:demo/eval"]},
                            max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                            report_to=["wandb"], run_name="rm-wandb-test", per_device_train_batch_size=4,
                            per_device_eval_batch_size=32, center_rewards_coefficient=0.01)
    out = tmp / "out"
    run_train(recipe, ["--output_dir", str(out)], extra_env={
        "WANDB_DIR": str(tmp / "wb1"), "WANDB_PROJECT": "rm-scale-tests", "WANDB_API_KEY": FAKE_WANDB_KEY,
        "HF_TOKEN": FAKE_HF_TOKEN, "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rmjob",
    })
    (run_file,) = run_files(tmp / "wb1")
    return {"tmp": tmp, "recipe": recipe, "out": out, "run_file": run_file, "run": read_run(run_file)}


def _rows(history, key):
    return [h for h in history if key in h]


@pytest.mark.slow
def test_run_identity_and_config(first_run):
    run, config = first_run["run"]["run"], first_run["run"]["config"]
    assert run.display_name == "rm-wandb-test"
    assert run.run_group == "rmjob-4242"  # defaulted from the Slurm job
    assert run.project == "rm-scale-tests"
    assert run.run_id == (first_run["out"] / "wandb_run_id").read_text().strip()
    # RewardConfig (resolved, from transformers' callback) and the recipe (from the CLI) are both in the config.
    assert config["center_rewards_coefficient"] == 0.01 and config["max_length"] == 1024
    assert config["recipe"]["train"]["center_rewards_coefficient"] == 0.01
    assert config["recipe"]["data"]["eval"] == ["rm_scale:demo/eval"]
    assert config["world_size"] == 1
    assert config["hub_token"] == "<HUB_TOKEN>"  # transformers masks *_token fields


@pytest.mark.slow
def test_logged_scalars_equal_metrics_jsonl(first_run):
    history, rows = first_run["run"]["history"], metrics(first_run["out"])
    train = {h["train/global_step"]: h for h in _rows(history, "train/loss_exact")}
    expected = {r["step"]: r for r in rows if "loss_exact" in r}
    assert sorted(train) == sorted(expected) == [1, 2, 3, 4]
    for step, row in expected.items():
        for key in SCALARS:
            assert math.isclose(train[step][f"train/{key}"], row[key], rel_tol=1e-12, abs_tol=0), (step, key)
    evals = [(h["train/global_step"], h["eval/accuracy"], h["eval/rewards_mean"])
             for h in _rows(history, "eval/accuracy")]
    # steps 2 and 4 during training; step 4's is also run.py's final evaluation (the same weights are not evaluated
    # and logged twice)
    assert evals == [(r["step"], r["eval_accuracy"], r["eval_rewards_mean"]) for r in rows if "eval_accuracy" in r]
    assert [s for s, _, _ in evals] == [2, 4]


@pytest.mark.slow
def test_reward_histograms_and_sample_table(first_run):
    history = first_run["run"]["history"]
    hists = _rows(history, "eval/rewards_chosen_hist")
    eval_rows = _rows(history, "eval/rewards_chosen_mean")
    assert [h["train/global_step"] for h in hists] == [2, 4]
    for hist_row, eval_row in zip(hists, eval_rows):
        for side in ("chosen", "rejected"):
            hist = hist_row[f"eval/rewards_{side}_hist"]
            assert hist["_type"] == "histogram"
            counts, bins = np.asarray(hist["values"]), np.asarray(hist["bins"])
            assert counts.sum() == EVAL_PAIRS  # every pair, once
            centres = (bins[:-1] + bins[1:]) / 2
            mean = (counts * centres).sum() / counts.sum()
            assert abs(mean - eval_row[f"eval/rewards_{side}_mean"]) <= bins[1] - bins[0]
        assert hist_row["eval/margin_hist"]["_type"] == "histogram"
        table = hist_row["eval/samples"]
        assert table["_type"] == "table-file" and table["nrows"] == SAMPLE_PAIRS
    _check_last_table_against_saved_model(first_run["run_file"], hists, first_run["out"] / "final")


def _check_last_table_against_saved_model(run_file, hists, final):
    # The last table is the final evaluation of the saved model: each row's rewards are the reloaded model's rewards
    # of the pair the row shows (a streamed evaluation reads the pairs in its own order; the row names them).
    table = json.loads((run_file.parent / "files" / hists[-1]["eval/samples"]["path"]).read_text())
    assert table["columns"] == ["pair", "chosen", "rejected", "reward_chosen", "reward_rejected"]
    assert len(table["data"]) == SAMPLE_PAIRS
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    pairs = prepare_dataset(load_preference_files(["rm_scale:demo/eval"]), tok, max_length=None)
    decoded = [tuple(tok.decode(pairs[i][f"input_ids_{side}"], skip_special_tokens=True) for side in
                     ("chosen", "rejected")) for i in range(len(pairs))]
    shown = []
    for row in table["data"]:
        ends = [t.lstrip("…") for t in row[1:3]]
        matches = [i for i, (c, r) in enumerate(decoded) if c.endswith(ends[0]) and r.endswith(ends[1])]
        assert matches, row
        shown.append(matches[0])
    batch = RewardDataCollatorWithPadding(tok)([pairs[i] for i in shown])
    with torch.no_grad():
        chosen = forward_rewards(model, batch["input_ids_chosen"], batch["attention_mask_chosen"])
        rejected = forward_rewards(model, batch["input_ids_rejected"], batch["attention_mask_rejected"])
    logged = np.asarray([row[3:5] for row in table["data"]])
    np.testing.assert_allclose(logged, torch.stack([chosen, rejected], 1).numpy(), atol=1e-5)


@pytest.mark.slow
def test_two_rank_zero3_run_logs_once_with_rewards_from_every_rank(first_run):
    tmp = first_run["tmp"]
    out = tmp / "zero3"
    launch = launch_config("zero3.yaml", tmp, ds_config=tiny_ds_config("zero3.json", tmp))
    run_train(first_run["recipe"], ["--output_dir", str(out), "--per_device_train_batch_size", "2"], launch=launch,
              extra_env={"WANDB_DIR": str(tmp / "wb_zero3")})
    (run_file,) = run_files(tmp / "wb_zero3")  # rank 1 started no run
    history = read_run(run_file)["history"]
    train = {h["train/global_step"]: h for h in _rows(history, "train/loss_exact")}
    for row in (r for r in metrics(out) if "loss_exact" in r):
        assert train[row["step"]]["train/loss_exact"] == row["loss_exact"]
    hists = _rows(history, "eval/rewards_chosen_hist")
    assert [sum(h["eval/rewards_chosen_hist"]["values"]) for h in hists] == [EVAL_PAIRS] * 2  # both ranks' pairs
    _check_last_table_against_saved_model(run_file, hists, out / "final")
    config = json.loads((out / "final" / "config.json").read_text())  # written by a collective ZeRO-3 save
    final = json.loads((out / "final_metrics.json").read_text())
    assert config["rm_scale_reward_mean"] == final["eval_rewards_mean"]
    assert config["rm_scale_reward_std"] == final["eval_rewards_std"]


@pytest.mark.slow
def test_two_rank_zero3_resume_continues_the_same_run(first_run):
    """The 2-rank run's checkpoint resumed by 2 ranks in a new folder: rank 0 alone reopens the same W&B run, which
    goes on at step 3."""
    tmp = first_run["tmp"]
    out = tmp / "zero3"
    if not (out / "checkpoint-2").exists():
        test_two_rank_zero3_run_logs_once_with_rewards_from_every_rank(first_run)
    (first,) = run_files(tmp / "wb_zero3")
    run_id = read_run(first)["run"].run_id
    launch = launch_config("zero3.yaml", tmp, ds_config=tiny_ds_config("zero3.json", tmp))
    resumed = tmp / "zero3_resumed"
    run_train(first_run["recipe"], ["--output_dir", str(resumed), "--per_device_train_batch_size", "2",
                                    "--resume_from_checkpoint", str(out / "checkpoint-2")], launch=launch,
              extra_env={"WANDB_DIR": str(tmp / "wb_zero3_resumed")})
    (run_file,) = run_files(tmp / "wb_zero3_resumed")  # one run, from rank 0 only
    again = read_run(run_file)
    assert again["run"].run_id == run_id and (resumed / "wandb_run_id").read_text().strip() == run_id
    assert [h["train/global_step"] for h in _rows(again["history"], "train/loss_exact")] == [3, 4]


@pytest.mark.slow
def test_no_secret_reaches_any_file(first_run):
    written = [p for d in (first_run["tmp"] / "wb1", first_run["out"]) for p in d.rglob("*") if p.is_file()]
    assert len(written) > 10 and first_run["run_file"] in written
    for path in written:
        data = path.read_bytes()
        assert FAKE_WANDB_KEY.encode() not in data, path
        assert FAKE_HF_TOKEN.encode() not in data, path
    config_values = [v for v in first_run["run"]["config"].values() if isinstance(v, str)]
    assert FAKE_WANDB_KEY not in config_values and FAKE_HF_TOKEN not in config_values


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_the_same_run(first_run):
    tmp, out = first_run["tmp"], first_run["out"]
    run_id = first_run["run"]["run"].run_id
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"][STATE_KEY] == {"run_id": run_id}
    # A new process, another output folder: the id travels with the checkpoint.
    resumed_out = tmp / "resumed"
    run_train(first_run["recipe"], ["--output_dir", str(resumed_out), "--resume_from_checkpoint",
                                    str(out / "checkpoint-2")], extra_env={"WANDB_DIR": str(tmp / "wb2")})
    (run_file,) = run_files(tmp / "wb2")
    resumed = read_run(run_file)
    assert resumed["run"].run_id == run_id and run_file.name == f"run-{run_id}.wandb"
    assert (resumed_out / "wandb_run_id").read_text().strip() == run_id
    steps = [h["train/global_step"] for h in _rows(resumed["history"], "train/loss_exact")]
    assert steps == [3, 4]


def test_redact_masks_secret_keys_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", "sk-abcdefgh12345")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to scrub from strings safely
    recipe = {"train": {"hub_token": "hf_x", "max_length": 8, "output_dir": "/runs/sk-abcdefgh12345/x"},
              "model": {"name_or_path": "m"}, "ignore_keys": ["a"]}
    assert redact(recipe) == {"train": {"hub_token": REDACTED, "max_length": 8, "output_dir": f"/runs/{REDACTED}/x"},
                              "model": {"name_or_path": "m"}, "ignore_keys": ["a"]}
    assert is_secret_name("WANDB_API_KEY") and is_secret_name("HF_TOKEN") and is_secret_name("db_password")
    assert not is_secret_name("max_length") and not is_secret_name("ignore_keys") and not is_secret_name("PATH")


def test_run_group_prefers_env_then_slurm(monkeypatch):
    for name in ("WANDB_RUN_GROUP", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SLURM_JOB_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert run_group() is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert run_group() == "77"
    monkeypatch.setenv("SLURM_JOB_NAME", "rm")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")  # every task of an array job in one group
    assert run_group() == "rm-70"
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-3")
    assert run_group() == "sweep-3"


@pytest.mark.slow
def test_group_evaluation_metrics_reach_wandb_as_metrics_jsonl(tmp_path):
    """The demo recipe's data (pairs + ties in UltraFeedback-binarized columns) under the tie model: best-of-K and
    the tie metrics of each evaluation reach the W&B run with the values metrics.jsonl has."""
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    path, _ = tiny_recipe(tmp_path, data=recipe["data"], max_steps=2, eval_strategy="steps", eval_steps=1,
                          report_to=["wandb"], per_device_train_batch_size=8, per_device_eval_batch_size=16,
                          batching="packed", token_budget=1024, ties="tie_model", tie_strength=2.0)
    out = tmp_path / "out"
    run_train(path, ["--output_dir", str(out)], extra_env={"WANDB_DIR": str(tmp_path / "wb")})
    (run_file,) = run_files(tmp_path / "wb")
    logged = {h["train/global_step"]: h for h in _rows(read_run(run_file)["history"], "eval/best_of_k_accuracy")}
    rows = {r["step"]: r for r in metrics(out) if "eval_best_of_k_accuracy" in r}
    assert sorted(logged) == sorted(rows) == [1, 2]
    for step, row in rows.items():
        assert row["eval_ties"] == 24 and row["eval_groups_ranked"] == EVAL_PAIRS  # each held-out row once
        for key in ("best_of_k_accuracy", "best_of_k_accuracy_units", "ties", "tie_gap", "tie_accuracy"):
            assert logged[step][f"eval/{key}"] == row[f"eval_{key}"], (step, key)
