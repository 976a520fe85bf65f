"""The benchmark command (`make bench`, bench/): a smoke run of every contender, the skip without data, and the
per-run arithmetic of the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "pairs.jsonl.gz"


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_run_writes_every_contender(tmp_path: Path) -> None:
    if not DATA.is_file():
        pytest.skip(f"{DATA} not found (../shared/data is absent)")
    from bench.__main__ import CONTENDERS

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
        if c.kind != "bare":  # where each rank's peak RSS is reached: every phase of a step is seen (ZeRO-3 too)
            phases = s["rss_phases_gb"]
            assert {"load", "setup", "forward", "backward", "optimizer", "data"} <= set(phases), (c.name, phases)
            assert 0 < max(phases.values()) <= s["peak_rss_gb_per_rank"] + 1e-3, c.name
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
    assert "## Targets" in md and "## Ratios" in md and "## Peak RSS per phase" in md
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
    rec = {"start": 100.0, "step_ends": ends, "cpu_start": 0.0, "step_cpu": [e - 100.0 for e in ends], "pairs": pairs,
           "real_tokens": [p * 10 for p in pairs], "computed_tokens": [p * 20 for p in pairs],
           "attention_square_tokens": [p * 1000 for p in pairs], "peak_rss_gb": 0.5}
    if gathers is not None:
        rec["gathers"] = [{"ds_allgather_calls": g, "ds_allgather_bytes": g * 400, "other_collectives": {}}
                          for g in gathers]
    return rec


def test_summarize_run_takes_the_slowest_rank_and_sums_pairs() -> None:
    ranks = [_record([9.0, 1.0, 2.0, 1.0], [8, 8, 8, 8], gathers=[5, 10, 15, 20]),
             _record([9.0, 1.5, 1.0, 1.0], [8, 4, 8, 8], gathers=[5, 10, 15, 20])]
    model = {"params": 100, "matmul_params": 80, "layers": 2, "hidden": 4}
    out = report.summarize_run(ranks, warmup=1, model=model)  # step 0 (start-up) is not measured
    assert out["step_time_s"] == [1.5, 2.0, 1.0]
    assert out["pairs_per_s"] == pytest.approx((24 + 20) / 4.5)
    assert out["padding_efficiency"] == pytest.approx(0.5)
    # step 1: ranks computed 160 and 80 tokens (mean 120, busiest 160); steps 2-3: 160 each
    assert out["rank_balance"] == pytest.approx((120 + 160 + 160) / (3 * 160))
    gathers = out["zero3_gathers_per_step"]
    # 5 gathers of 400 bytes per step; the fp32 model is 4 x 100 bytes
    assert gathers["calls"] == 5 and gathers["model_equivalents"] == pytest.approx(5.0)
    # model FLOPs of the measured steps: 6 x 80 per real token (440 of them) + 6 x 2 layers x 4 hidden per s² (44,000)
    assert out["model_tflops_per_s"] == pytest.approx((6 * 80 * 440 + 6 * 2 * 4 * 44_000) / 4.5 / 1e12)


def test_mfu_is_of_the_peak_of_every_gpu_the_contender_used() -> None:
    run = {"pairs_per_s": 1.0, "tokens_per_s": 1.0, "padding_efficiency": 1.0, "step_time_s": [1.0],
           "cpu_s_per_step": [1.0], "rank_balance": 1.0, "peak_rss_gb_per_rank": [1.0], "load_avg": {"before": [0.0]},
           "model_tflops_per_s": 400.0, "peak_gpu_gb_per_rank": [30.0, 31.0]}
    results = {"contenders": {"trl-1p": {"ranks": 1}, "rm_scale-packed-z3x2": {"ranks": 2}},
               "runs": [{**run, "contender": "trl-1p", "model_tflops_per_s": 200.0},
                        {**run, "contender": "rm_scale-packed-z3x2"}],
               "environment": {"peak_tflops": 1000.0}, "settings": {"repeats": 1, "block_size": 1024}}
    per = report.summarize(results)["contenders"]
    assert per["trl-1p"]["mfu"] == pytest.approx(0.2)
    assert per["rm_scale-packed-z3x2"]["mfu"] == pytest.approx(0.2)  # 400 TFLOP/s over two 1000-TFLOP/s GPUs
    assert per["rm_scale-packed-z3x2"]["peak_gpu_gb_per_rank"] == 31.0


def test_batch_counts_sum_squared_sequence_lengths_padded_and_packed() -> None:
    import torch

    from bench.worker import batch_counts
    from rm_scale.data.collate import pack_pairs

    lengths = {"chosen": [5, 3], "rejected": [2, 7]}
    pairs = [{f"input_ids_{side}": list(range(1, 1 + lengths[side][i])) for side in ("chosen", "rejected")}
             for i in range(2)]
    squares = sum(n * n for side in lengths.values() for n in side)  # 25 + 9 + 4 + 49
    packed = batch_counts(pack_pairs(pairs, row_length=10, pad_id=0))
    assert (packed["pairs"], int(packed["real"]), int(packed["attn"])) == (2, 17, squares)
    assert packed["computed"] >= 17

    def padded(side: str) -> torch.Tensor:
        mask = torch.zeros(2, 7, dtype=torch.long)
        for i, n in enumerate(lengths[side]):
            mask[i, :n] = 1
        return mask

    batch = {"attention_mask_chosen": padded("chosen"), "attention_mask_rejected": padded("rejected")}
    batch.update({f"input_ids_{side}": torch.ones_like(batch[f"attention_mask_{side}"]) for side in ("chosen", "rejected")})
    counts = batch_counts(batch)
    assert (counts["pairs"], int(counts["real"]), counts["computed"], int(counts["attn"])) == (2, 17, 28, squares)


def test_model_flops_of_the_gpu_model_and_known_gpu_peaks() -> None:
    from bench.__main__ import peak_bf16_tflops
    from bench.model import GPU, model_flops

    # the --gpu model's matrices: per layer 4 h² (attention) + 3 h·i (MLP), plus the 1-row score head
    matmul = GPU.layers * (4 * GPU.hidden**2 + 3 * GPU.hidden * GPU.intermediate) + GPU.hidden
    assert 0.4e9 < matmul < 0.5e9
    info = {"matmul_params": matmul, "layers": GPU.layers, "hidden": GPU.hidden}
    assert model_flops(info, real_tokens=1000, attention_square_tokens=0) == 6 * matmul * 1000
    assert model_flops(info, real_tokens=0, attention_square_tokens=10) == 6 * GPU.layers * GPU.hidden * 10
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("Some Future Card") is None


@pytest.mark.slow
def test_bf16_smoke_run_reports_model_flops(tmp_path: Path) -> None:
    """The --gpu mode's code path (bf16 autocast in TRL, rm_scale and the bare loop; model FLOPs) on CPU."""
    if not DATA.is_file():
        pytest.skip(f"{DATA} not found (../shared/data is absent)")
    names = "trl-1p,rm_scale-packed-1p,bare-packed-1p,bare-fixed-1p"
    proc = _bench("--smoke", "--bf16", "--only", names, "--no-extras", "--peak-tflops", "1.0", "--out", str(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["errors"] == [] and results["settings"]["bf16"] is True
    per = results["summary"]["contenders"]
    assert set(per) == set(names.split(","))
    for name, s in per.items():
        assert s["model_tflops_per_s"] > 0 and 0 < s["mfu"] < 1, name
    assert "rm_scale-packed/trl MFU (1p)" in results["summary"]["ratios"]
    assert "bf16 autocast" in (tmp_path / "results.md").read_text()


def test_zero3_overrides_reach_the_launch_config(tmp_path: Path) -> None:
    import yaml

    from bench.__main__ import ZERO3_BENCH_DEFAULTS, Settings, _launch_config, main

    assert Settings(mode="x", steps=2, warmup=1, repeats=1, model="SMOKE").zero3 == ZERO3_BENCH_DEFAULTS
    launch = yaml.safe_load(_launch_config(tmp_path, {"reduce_bucket_size": 123, "overlap_comm": True}).read_text())
    ds = json.loads(Path(launch["deepspeed_config"]["deepspeed_config_file"]).read_text())["zero_optimization"]
    assert ds["reduce_bucket_size"] == 123 and ds["overlap_comm"] is True
    assert ds["stage3_param_persistence_threshold"] == 0 and ds["stage"] == 3
    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["--data", str(data), "--zero3", "reduce_bucket_size"])
    with pytest.raises(SystemExit, match="must be JSON"):
        main(["--data", str(data), "--zero3", "reduce_bucket_size=lots"])
