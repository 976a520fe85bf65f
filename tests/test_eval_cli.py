"""`rm-scale eval` for real: train tiny models through the CLI, then score them in a subprocess and in-process.

The scoring is checked against the trainer's own final evaluation (same pairs, same model), per subset by
construction (a subset of swapped pairs must score 1 - accuracy), and the reward statistics exported with the model.
"""

import json
import subprocess
import sys

import pytest

from launch import ROOT, env, run_train, tiny_recipe
from rm_scale.commands.evaluate import PLOT_NAME, evaluate_model, run_eval
from rm_scale.model import REWARD_STATS_FILE, read_reward_stats

pytestmark = pytest.mark.slow

DEMO_EVAL = ROOT / "rm_scale" / "data" / "demo_data" / "eval.jsonl"
STAT_KEYS = {"rm_scale_reward_mean", "rm_scale_reward_std", "rm_scale_eval_accuracy", "rm_scale_eval_pairs"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    recipe, _ = tiny_recipe(tmp, data={"train": ["rm_scale:demo/train"], "eval": ["rm_scale:demo/eval"]},
                            max_steps=6, learning_rate=2e-3, logging_steps=2, eval_strategy="steps", eval_steps=3,
                            per_device_train_batch_size=8, per_device_eval_batch_size=16)
    # The demo eval pairs in two subsets (a, b: alternate rows), then every pair again with chosen and rejected
    # swapped (subset "swapped"): its accuracy must be 1 - the accuracy of the originals.
    rows = [json.loads(line) for line in DEMO_EVAL.read_text().splitlines()]
    pairs = tmp / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({**r, "subset": "ab"[i % 2]}) + "\n")
        for r in rows:
            f.write(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"], "subset": "swapped"}) + "\n")
    return tmp, recipe, pairs, len(rows)


def _final_metrics(out):
    return json.loads((out / "final_metrics.json").read_text())


def _check_against_training_eval(result, final, n):
    assert result["pairs"] == 2 * n and result["dropped"] == 0
    subsets = result["subsets"]
    assert {k: v["pairs"] for k, v in subsets.items()} == {"a": n // 2, "b": n // 2, "swapped": n}
    originals = (subsets["a"]["accuracy"] + subsets["b"]["accuracy"]) / 2
    assert abs(originals - final["eval_accuracy"]) <= 1e-9
    assert abs(subsets["swapped"]["accuracy"] - (1 - final["eval_accuracy"])) <= 1e-9
    assert abs(result["accuracy"] - 0.5) <= 1e-9
    # Each reward appears twice (original and swapped): the mean and std over both sides are the trainer's.
    assert abs(result["rewards_mean"] - final["eval_rewards_mean"]) <= 1e-5
    assert abs(result["rewards_std"] - final["eval_rewards_std"]) <= 1e-5


def test_eval_cli_scores_a_full_model_per_subset_and_plots(setup):
    tmp, recipe, pairs, n = setup
    out = tmp / "full"
    run_train(recipe, ["--output_dir", str(out)])
    final = _final_metrics(out)
    # eval_steps 3 divides max_steps 6: the evaluation logged at step 6 is the final one, not run (and logged) twice.
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "eval_loss" in line]
    assert [e["step"] for e in evals] == [3, 6]
    assert {k: v for k, v in evals[-1].items() if k != "step"} == final
    # The exported statistics are those of the final evaluation, in config.json.
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["rm_scale_reward_mean"] == final["eval_rewards_mean"]
    assert config["rm_scale_reward_std"] == final["eval_rewards_std"]
    assert config["rm_scale_eval_accuracy"] == final["eval_accuracy"] and config["rm_scale_eval_pairs"] == n
    assert read_reward_stats(str(out / "final")) == {k: config[k] for k in STAT_KEYS}

    cmd = [sys.executable, "-m", "rm_scale", "eval", "--model", str(out / "final"), "--data", str(pairs), "--json",
           "--batch-size", "7"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)  # one JSON object and nothing else on stdout
    _check_against_training_eval(result, final, n)
    assert result["saved_stats"]["rm_scale_eval_accuracy"] == final["eval_accuracy"]
    png = (out / "final" / PLOT_NAME).read_bytes()
    assert result["plot"] == str(out / "final" / PLOT_NAME)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    # Two panels (rewards + the accuracy curves from <output_dir>/metrics.jsonl) make the figure 1100 px wide.
    assert int.from_bytes(png[16:20], "big") == 1100


def test_eval_scores_a_lora_adapter_and_its_stats_sit_beside_it(setup, tmp_path, capsys):
    tmp, recipe, pairs, n = setup
    out = tmp / "lora"
    run_train(recipe, ["--output_dir", str(out), "--max_steps", "2", "--lora.r", "8",
                       "--lora.lora_alpha", "32", "--lora.lora_dropout", "0.0"])
    final = _final_metrics(out)
    adapter = out / "final"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    stats = json.loads((adapter / REWARD_STATS_FILE).read_text())
    assert set(stats) == STAT_KEYS and stats["rm_scale_reward_mean"] == final["eval_rewards_mean"]
    plot = tmp_path / "lora.png"
    result = evaluate_model(str(adapter), [str(pairs)], batch_size=32, plot_path=str(plot))
    _check_against_training_eval(result, final, n)
    assert result["saved_stats"] == stats
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The text report: one line per subset.
    assert run_eval(str(adapter), [str(pairs)], max_length=24, plot_path=str(plot)) == 0  # drops the longest
    text = capsys.readouterr().out
    assert "accuracy" in text and "swapped" in text and "dropped" in text


def test_eval_reads_a_public_set_through_its_preset(setup, tmp_path):
    """rm-scale eval reads data as training does: a preset's mapping (SHP: labels decide A or B), counted drops."""
    tmp, recipe, _, _ = setup
    out = tmp / "full"
    if not (out / "final").exists():
        run_train(recipe, ["--output_dir", str(out)])
    rows = [{"history": "How do I cook rice?", "human_ref_A": "no", "human_ref_B": "Rinse the rice, then simmer.",
             "labels": 0, "domain": "askculinary_train"},
            {"history": "How do I cook rice?", "human_ref_A": "Rinse the rice, then simmer.", "human_ref_B": "no",
             "labels": 1, "domain": "askculinary_test"},
            {"history": "x", "human_ref_A": "a", "human_ref_B": "b", "labels": 5, "domain": "bad"}]
    data = tmp_path / "shp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_model(str(out / "final"), [str(data)], data_format="shp", plot_path=str(tmp_path / "p.png"))
    assert result["pairs"] == 2 and result["dropped_by_reason"] == {"bad labels": 1}
    assert set(result["subsets"]) == {"askculinary_train", "askculinary_test"}
    # the same pair both ways round: equal rewards, so the same accuracy in both subsets
    assert result["subsets"]["askculinary_train"]["accuracy"] == result["subsets"]["askculinary_test"]["accuracy"]
