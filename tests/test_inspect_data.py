"""`rm-scale inspect-data`: the report a user reads before training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "pairs.jsonl.gz"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _inspect(*args):
    proc = subprocess.run([sys.executable, "-m", "rm_scale", "inspect-data", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)
    return proc


def test_report_counts_ranks_drops_and_padding(tmp_path, tok_dir):
    rows = [{"prompt": f"User: How do I cook rice {i}?", "chosen": " Rinse the rice" * (1 + i % 5), "rejected": " no"}
            for i in range(30)]
    rows.append({"prompt": "User: x", "chosen": " same", "rejected": " same"})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    proc = _inspect(path, "--model", tok_dir, "--world-size", "3", "--pairs-per-batch", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["formats"] == ["prompt"]
    assert report["pairs_kept"] == 30 and sum(r["pairs"] for r in report["ranks"]) == 30
    assert len(report["ranks"]) == 3 and all(r["pairs"] > 0 for r in report["ranks"])
    assert report["pairs_dropped"] == {"identical chosen and rejected": 1, "malformed JSON": 1}
    assert 0 < report["padding_efficiency_fixed_batches"] < report["padding_efficiency"] <= 1
    assert 0 < report["rank_balance"] <= 1
    human = _inspect(path, "--model", tok_dir)
    assert "malformed JSON" in human.stdout and "padding efficiency" in human.stdout


def test_strict_inspection_stops_at_the_bad_line(tmp_path, tok_dir):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "User: a", "chosen": " Sure", "rejected": " no"}) + "\n"
                    + json.dumps({"prompt": "User: b", "chosen": 3, "rejected": " no"}) + "\n")
    proc = _inspect(path, "--model", tok_dir, "--strict")
    assert proc.returncode != 0
    assert f"{path}:2" in proc.stderr and "'chosen' must be a string" in proc.stderr


@pytest.mark.skipif(not HH.exists(), reason=f"real data not found at {HH} (shared/data beside the checkout)")
def test_real_hh_rlhf_report(tok_dir):
    proc = _inspect(HH, "--model", tok_dir, "--max-length", "512", "--world-size", "2", "--batching",
                    "length_grouped", "--json")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["formats"] == ["implicit_prompt"]
    assert report["pairs_kept"] + sum(report["pairs_dropped"].values()) == 2000
    assert report["rank_balance"] >= 0.95  # rm_scale.data.batching.balanced_order (independent shuffles: ~0.76)


@pytest.mark.skipif(not HH.exists(), reason=f"real data not found at {HH} (shared/data beside the checkout)")
def test_real_hh_rlhf_packed_report(tok_dir):
    """Packed batches of the real hh-rlhf pairs: almost no padding, and with each pair's prompt computed once
    (the default) at most 0.7x the tokens per pair of packing without sharing."""
    reports = {}
    for name, extra in (("shared", []), ("plain", ["--no-shared-prefix"])):
        proc = _inspect(HH, "--model", tok_dir, "--max-length", "512", "--batching", "packed", "--token-budget",
                        "8192", "--json", *extra)
        reports[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    shared, plain = reports["shared"], reports["plain"]
    assert plain["padding_efficiency"] >= 0.95 > plain["padding_efficiency_fixed_batches"]
    assert shared["padding_efficiency"] >= 0.9 and plain["prefix_sharing"] == 1.0 < 1.4 <= shared["prefix_sharing"]
    assert shared["computed_tokens_per_pair"] <= 0.7 * plain["computed_tokens_per_pair"]
    assert shared["pairs_kept"] == plain["pairs_kept"] and shared["length_percentiles"]["100"] <= 512


SHP_ROWS = [
    {"post_id": "p1", "domain": "askculinary_train", "history": "How do I keep rice from sticking?",
     "score_A": 3, "score_B": 40, "human_ref_A": "Use more oil.", "human_ref_B": "Rinse it first.", "labels": 0},
    {"post_id": "p2", "domain": "askscience_train", "history": "Why is the sky blue?", "score_A": 90, "score_B": 4,
     "human_ref_A": "Rayleigh scattering.", "human_ref_B": "It reflects the sea.", "labels": 1},
]


def _recipe(tmp_path, tok_dir, source):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tok_dir)}, "data": {"train": [source]},
                                      "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2,
                                                "report_to": []}}))
    return recipe


def test_config_shows_the_mapping_formats_and_the_first_pairs(tmp_path, tok_dir):
    data = tmp_path / "shp.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SHP_ROWS))
    recipe = _recipe(tmp_path, tok_dir, {"path": str(data), "format": "shp"})
    report = json.loads(_inspect("--config", recipe, "--json").stdout.strip().splitlines()[-1])
    assert report["formats"] == ["shp → conversational"] and report["pairs_kept"] == 2
    first = report["samples"][0]
    assert first["chosen"] == "assistant: Rinse it first." and first["rejected"] == "assistant: Use more oil."
    assert first["prompt"] == "user: How do I keep rice from sticking?"
    # the old README mapping: pairs kept, but the ignored labels column is a warning with the fix
    recipe = _recipe(tmp_path, tok_dir, {"path": str(data), "columns": {
        "prompt": "history", "chosen": "human_ref_A", "rejected": "human_ref_B"}})
    proc = _inspect("--config", recipe)
    assert proc.returncode == 0 and "look like preference labels" in proc.stdout and "format: shp" in proc.stdout
    dry = subprocess.run([sys.executable, "-m", "rm_scale", "train", "--config", str(recipe), "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0 and "# data.train (streamed)" in dry.stdout and "Use more oil." in dry.stdout


def test_no_usable_pair_is_a_non_zero_exit_in_inspect_and_dry_run(tmp_path, tok_dir):
    data = tmp_path / "unmapped.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SHP_ROWS))  # SHP without a mapping: no chosen/rejected
    recipe = _recipe(tmp_path, tok_dir, str(data))
    proc = _inspect("--config", recipe)
    assert proc.returncode == 1 and "missing field" in proc.stdout and "not a single usable pair" in proc.stderr
    assert "unknown: no usable row among the first 2 (first:" in proc.stdout and "format:" in proc.stdout
    dry = subprocess.run([sys.executable, "-m", "rm_scale", "train", "--config", str(recipe), "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 2 and "No usable preference pair" in dry.stderr and "2 missing field" in dry.stderr


def test_a_group_recipe_is_inspected_as_it_trains(tmp_path, tok_dir):
    """The demo's held-out ties (UltraFeedback-binarized columns, equal scores) under the demo recipe's `ties:
    tie_model`: tie edges trained, every row a group of two -- not "0 pairs, dropped: tie" and exit 1, as the pair
    path reports them (and as it reports them under `ties: drop`)."""
    import yaml

    demo = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe = tmp_path / "groups.yaml"

    def write(ties):
        recipe.write_text(yaml.safe_dump({"model": {"name_or_path": str(tok_dir)}, "data": {"train": [
            {"path": "rm_scale:demo/ties_eval", "format": "ultrafeedback_binarized"}]}, "train": {
            **demo["train"], "ties": ties, "output_dir": str(tmp_path / "out")}}))

    write("tie_model")
    proc = _inspect("--config", recipe, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["groups"] == {"groups": 24, "responses": 48, "preference_edges": 0, "tie_edges": 24}
    assert report["pairs_kept"] == 0 and report["pairs_dropped"] == {}
    assert "24 (48 responses, each computed once): 0 preference edges (the pairs kept), 24 tie edges trained" in (
        _inspect("--config", recipe).stdout)
    write("drop")
    proc = _inspect("--config", recipe, "--json")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1 and "groups" not in report and report["pairs_dropped"] == {"tie": 24}
