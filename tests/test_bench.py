"""The benchmark command (`make bench`, rm_scale.bench): a smoke run of every contender, the skip without data, and the
per-run arithmetic of the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rm_scale.bench import report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "pairs.jsonl.gz"


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "rm_scale.bench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_run_writes_every_contender(tmp_path: Path) -> None:
    if not DATA.is_file():
        pytest.skip(f"{DATA} not found (../shared/data is absent)")
    from rm_scale.bench.__main__ import CONTENDERS

    proc = _bench("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["errors"] == []
    per = results["summary"]["contenders"]
    assert set(per) == {c.name for c in CONTENDERS}
    for c in CONTENDERS:
        s = per[c.name]
        assert s["pairs_per_s"] > 0 and s["tokens_per_s"] > 0, c.name
        assert 0 < s["padding_efficiency"] <= 1, c.name
        assert s["step_time_p10_s"] <= s["step_time_median_s"] <= s["step_time_p90_s"], c.name
        if c.ranks > 1:  # every ZeRO-3 step gathers the whole model at least once
            assert s["zero3_gathers_per_step"]["model_equivalents"] >= 1.0, c.name
    ratios = results["summary"]["ratios"]
    # the bare loop trains on exactly rm_scale's batches: the overhead comparison is like for like
    assert ratios["rm_scale-lg-1p vs bare-lg-1p: identical batches"] is True
    assert ratios["rm_scale-fixed-1p vs bare-fixed-1p: identical batches"] is True
    assert ratios["rm_scale-packed-1p vs bare-packed-1p: identical batches"] is True
    assert per["rm_scale-lg-1p"]["padding_efficiency"] > per["rm_scale-fixed-1p"]["padding_efficiency"]
    assert per["rm_scale-packed-1p"]["padding_efficiency"] > per["rm_scale-fixed-1p"]["padding_efficiency"]
    assert {v["workers"] for v in results["pipeline"]["variants"]} == {0, 1}
    md = (tmp_path / "results.md").read_text()
    for c in CONTENDERS:
        assert f"| {c.name} |" in md
    assert "## Targets" in md and "## Ratios" in md
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_skips_with_a_message_without_data(tmp_path: Path) -> None:
    proc = _bench("--data", str(tmp_path / "missing.jsonl.gz"), "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and "missing.jsonl.gz" in proc.stdout
    assert not (tmp_path / "out").exists()


def _record(durations: list[float], pairs: list[int], *, gathers: list[int] | None = None) -> dict:
    ends, t = [], 100.0
    for d in durations:
        t += d
        ends.append(t)
    rec = {"start": 100.0, "step_ends": ends, "cpu_start": 0.0, "step_cpu": [e - 100.0 for e in ends], "pairs": pairs, "real_tokens": [p * 10 for p in pairs],
           "computed_tokens": [p * 20 for p in pairs], "peak_rss_gb": 0.5}
    if gathers is not None:
        rec["gathers"] = [{"ds_allgather_calls": g, "ds_allgather_bytes": g * 400, "other_collectives": {}}
                          for g in gathers]
    return rec


def test_summarize_run_takes_the_slowest_rank_and_sums_pairs() -> None:
    ranks = [_record([9.0, 1.0, 2.0, 1.0], [8, 8, 8, 8], gathers=[5, 10, 15, 20]),
             _record([9.0, 1.5, 1.0, 1.0], [8, 4, 8, 8], gathers=[5, 10, 15, 20])]
    out = report.summarize_run(ranks, warmup=1, model_params=100)  # step 0 (start-up) is not measured
    assert out["step_time_s"] == [1.5, 2.0, 1.0]
    assert out["pairs_per_s"] == pytest.approx((24 + 20) / 4.5)
    assert out["padding_efficiency"] == pytest.approx(0.5)
    # step 1: ranks computed 160 and 80 tokens (mean 120, busiest 160); steps 2-3: 160 each
    assert out["rank_balance"] == pytest.approx((120 + 160 + 160) / (3 * 160))
    gathers = out["zero3_gathers_per_step"]
    # 5 gathers of 400 bytes per step; the fp32 model is 4 x 100 bytes
    assert gathers["calls"] == 5 and gathers["model_equivalents"] == pytest.approx(5.0)
