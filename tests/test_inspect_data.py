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
    proc = _inspect(HH, "--model", tok_dir, "--max-length", "512", "--batching", "packed", "--token-budget", "8192",
                    "--json")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["padding_efficiency"] >= 0.95 > report["padding_efficiency_fixed_batches"]
    assert report["length_percentiles"]["100"] <= 512
