"""Per-rank measurements → per-run and per-contender statistics, the targets, and results.{json,md,png}."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# The targets ("Benchmarks against TRL and the bare-loop limit").
TARGETS = {
    # rm_scale (best batching) pairs/s over TRL's on the toy model, 1 process and 2-rank ZeRO-3: 2.5 before the shared
    # prefix, 4 with it (#14)
    "speedup_vs_trl": 4.0,
    "padding_efficiency": 0.95,  # rm_scale's best batching, real / computed tokens
    "overhead_vs_bare": 1.05,  # rm_scale step time over the bare loop's, identical batches
    "pipeline_vs_trainer": 10.0,  # data pipeline pairs/s over the trainer's consumption (per rank)
    "zero3_memory_2_vs_1": 0.55,  # per-rank ZeRO-3 model+optimizer state, 2 ranks over 1 rank
}
# `--real` (the pretrained SmolLM2-135M, #14): rm_scale packed with shared prefix against TRL on the same job
REAL_TARGETS = {
    "speedup_vs_trl_1p": 3.0,
    "speedup_vs_trl_z3x2": 2.5,  # 4 pairs per device
    "computed_tokens_shared_vs_unshared": 0.7,  # computed tokens per pair, packed with / without the shared prefix
    "peak_rss_vs_trl": 0.5,  # peak RSS per rank, same job
}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_run(records: list[dict[str, Any]], *, warmup: int, model: dict[str, Any]) -> dict[str, Any]:
    """One run (all its ranks): steps from ``warmup`` on. A step's time is the slowest rank's (ZeRO-3 ranks wait for
    each other every step anyway); pairs and tokens are summed over ranks."""
    from bench.model import model_flops
    from rm_scale.data.batching import rank_balance

    model_params = model["params"]
    durations = []
    for rec in records:
        ends = [rec["start"], *rec["step_ends"]]
        durations.append([b - a for a, b in zip(ends, ends[1:])])
    steps = min(len(d) for d in durations)
    measured = range(warmup, steps)
    if not measured:
        return {"error": f"only {steps} steps ran; warmup is {warmup}"}
    step_times = [max(d[i] for d in durations) for i in measured]
    cpu = [[b - a for a, b in zip([rec["cpu_start"], *rec["step_cpu"]], rec["step_cpu"])] for rec in records]
    seconds = sum(step_times)
    pairs = sum(rec["pairs"][i] for rec in records for i in measured)
    real = sum(rec["real_tokens"][i] for rec in records for i in measured)
    # placed: the non-pad tokens computed (a shared prefix once); records before it existed: the real tokens
    placed = sum(rec.get("placed_tokens", rec["real_tokens"])[i] for rec in records for i in measured)
    computed = sum(rec["computed_tokens"][i] for rec in records for i in measured)
    out = {
        "steps_measured": len(step_times),
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": real / seconds,  # each pair's chosen + rejected tokens, shared or not: the same for everyone
        "padding_efficiency": placed / max(computed, 1),
        "computed_tokens_per_pair": computed / max(pairs, 1),
        "step_time_s": step_times,
        "step_time_median_s": statistics.median(step_times),
        "step_time_p10_s": _quantile(step_times, 0.1),
        "step_time_p90_s": _quantile(step_times, 0.9),
        "cpu_s_per_step": [max(c[i] for c in cpu) for i in measured],  # the busiest rank's process CPU time
        # below 1, the other ranks wait for the busiest one in every ZeRO-3 collective
        "rank_balance": rank_balance([[rec["computed_tokens"][i] for i in measured] for rec in records]),
        "peak_rss_gb_per_rank": [round(rec["peak_rss_gb"], 3) for rec in records],
        # each rank's largest RSS per phase (bench.worker.RssPhases): which part of the step sets the peak
        "rss_phases_gb_per_rank": [rec.get("rss_phases_gb", {}) for rec in records],
        # per measured step, rank 0: lets the report check that two contenders saw identical batches
        "computed_tokens_per_step": [records[0]["computed_tokens"][i] for i in measured],
        "pairs_per_step": [sum(rec["pairs"][i] for rec in records) for i in measured],
    }
    if "attention_square_tokens" in records[0] and "matmul_params" in model:
        square = sum(rec["attention_square_tokens"][i] for rec in records for i in measured)
        out["model_tflops_per_s"] = model_flops(model, real_tokens=real, attention_square_tokens=square) / seconds / 1e12
    if "peak_gpu_gb" in records[0]:
        out["peak_gpu_gb_per_rank"] = [round(rec["peak_gpu_gb"], 3) for rec in records]
    gathers = records[0].get("gathers") or []
    if len(gathers) >= steps:
        first, last = gathers[warmup - 1], gathers[steps - 1]
        n = steps - warmup
        calls = (last["ds_allgather_calls"] - first["ds_allgather_calls"]) / n
        nbytes = (last["ds_allgather_bytes"] - first["ds_allgather_bytes"]) / n
        other = {k: (v - first["other_collectives"].get(k, 0)) / n for k, v in last["other_collectives"].items()}
        out["zero3_gathers_per_step"] = {
            "calls": calls,
            "bytes": nbytes,
            # each all-gather outputs whole parameters: bytes / full fp32 model = how many times the model was gathered
            "model_equivalents": nbytes / (4 * model_params),
            "other_collectives": {k: v for k, v in other.items() if v},
        }
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per contender over repeats, ratios, and the targets."""
    per: dict[str, Any] = {}
    for name in results["contenders"]:
        runs = [r for r in results["runs"] if r["contender"] == name and "pairs_per_s" in r]
        if not runs:
            continue
        rate = [r["pairs_per_s"] for r in runs]
        times = [t for r in runs for t in r["step_time_s"]]
        entry = {
            "repeats": len(runs),
            "pairs_per_s": statistics.median(rate),
            "pairs_per_s_min": min(rate),
            "pairs_per_s_max": max(rate),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "padding_efficiency": statistics.mean(r["padding_efficiency"] for r in runs),
            "computed_tokens_per_pair": statistics.mean(r.get("computed_tokens_per_pair", 0.0) for r in runs),
            "step_time_median_s": statistics.median(times),
            "step_time_p10_s": _quantile(times, 0.1),
            "step_time_p90_s": _quantile(times, 0.9),
            "step_time_mean_s": statistics.mean(times),
            "cpu_s_per_step_mean": statistics.mean(t for r in runs for t in r["cpu_s_per_step"]),
            # per step, the fastest of the repeats: the noise floor of a shared machine (identical batches per repeat)
            "step_time_min_over_repeats_sum_s": sum(min(ts) for ts in zip(*(r["step_time_s"] for r in runs))),
            "rank_balance": statistics.mean(r["rank_balance"] for r in runs),
            "peak_rss_gb_per_rank": max(max(r["peak_rss_gb_per_rank"]) for r in runs),
            "load_avg_1min": [r["load_avg"]["before"][0] for r in runs],
        }
        flops = [r["model_tflops_per_s"] for r in runs if "model_tflops_per_s" in r]
        if flops:
            entry["model_tflops_per_s"] = statistics.median(flops)
            peak = (results.get("environment") or {}).get("peak_tflops")
            ranks = (results["contenders"].get(name) or {}).get("ranks", 1)
            if peak:  # model FLOPs utilisation: of the peak of every GPU the contender ran on
                entry["mfu"] = entry["model_tflops_per_s"] / (peak * ranks)
        gpu = [max(r["peak_gpu_gb_per_rank"]) for r in runs if "peak_gpu_gb_per_rank" in r]
        if gpu:
            entry["peak_gpu_gb_per_rank"] = max(gpu)
        gathers = [r["zero3_gathers_per_step"] for r in runs if "zero3_gathers_per_step" in r]
        if gathers:
            entry["zero3_gathers_per_step"] = gathers[0]
        phases = rss_phases([p for r in runs for p in r.get("rss_phases_gb_per_rank", [])])
        if phases:
            entry["rss_phases_gb"] = phases
        per[name] = entry
    return {"contenders": per, "ratios": _ratios(per, results), "targets": _targets(per, results)}


PHASES = ("load", "setup", "forward", "backward", "optimizer", "data")


def rss_phases(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """The largest RSS of each phase over ranks and repeats (the phases bench.worker.RssPhases labels)."""
    out: dict[str, float] = {}
    for phases in per_rank:
        for phase, gb in phases.items():
            if phase in PHASES:
                out[phase] = max(out.get(phase, 0.0), gb)
    return {p: out[p] for p in PHASES if p in out}


def _get(per: dict[str, Any], name: str, key: str) -> float | None:
    return per.get(name, {}).get(key)


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _identical_batches(results: dict[str, Any], a: str, b: str) -> bool | None:
    ra = [r for r in results["runs"] if r["contender"] == a and "computed_tokens_per_step" in r]
    rb = [r for r in results["runs"] if r["contender"] == b and "computed_tokens_per_step" in r]
    if not ra or not rb:
        return None
    return ra[0]["computed_tokens_per_step"] == rb[0]["computed_tokens_per_step"]


BATCHINGS = ("fixed", "lg", "packed")  # contender name parts: rm_scale-<batching>-<ws>, bare-<batching>-1p


def best_batching(per: dict[str, Any], ws: str) -> str | None:
    """rm_scale's batching with the highest pairs/s at ``ws`` ("1p" or "z3x2")."""
    rates = {b: _get(per, f"rm_scale-{b}-{ws}", "pairs_per_s") for b in BATCHINGS}
    rates = {b: r for b, r in rates.items() if r is not None}
    return max(rates, key=rates.get) if rates else None


def _ratios(per: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ws in ("1p", "z3x2"):
        for batching in BATCHINGS:
            out[f"rm_scale-{batching}/trl pairs/s ({ws})"] = _div(
                _get(per, f"rm_scale-{batching}-{ws}", "pairs_per_s"), _get(per, f"trl-{ws}", "pairs_per_s"))
    for batching in BATCHINGS:
        a, b = f"rm_scale-{batching}-1p", f"bare-{batching}-1p"
        out[f"{a}/{b} step time (mean)"] = _div(_get(per, a, "step_time_mean_s"), _get(per, b, "step_time_mean_s"))
        out[f"{a}/{b} step time (median)"] = _div(_get(per, a, "step_time_median_s"),
                                                  _get(per, b, "step_time_median_s"))
        out[f"{a}/{b} step time (per-step min over repeats, summed)"] = _div(
            _get(per, a, "step_time_min_over_repeats_sum_s"), _get(per, b, "step_time_min_over_repeats_sum_s"))
        out[f"{a}/{b} CPU s per step (mean)"] = _div(_get(per, a, "cpu_s_per_step_mean"),
                                                     _get(per, b, "cpu_s_per_step_mean"))
        out[f"{a} vs {b}: identical batches"] = _identical_batches(results, a, b)
    for ws in ("1p", "z3x2"):
        for batching in BATCHINGS:
            out[f"rm_scale-{batching}/trl MFU ({ws})"] = _div(_get(per, f"rm_scale-{batching}-{ws}", "mfu"),
                                                             _get(per, f"trl-{ws}", "mfu"))
    for batching in ("lg", "packed"):
        out[f"bare-{batching}-1p/trl-1p pairs/s (batching alone, no framework)"] = _div(
            _get(per, f"bare-{batching}-1p", "pairs_per_s"), _get(per, "trl-1p", "pairs_per_s"))
    out.update(_twin_ratios(per, results["contenders"]))
    return {k: v for k, v in out.items() if v is not None}


def _twin_ratios(per: dict[str, Any], contenders: dict[str, Any]) -> dict[str, Any]:
    """Each rm_scale contender against the TRL contender of the same ranks and pairs per device (pairs/s, peak RSS
    per rank), and packed with the shared prefix against packed without it (computed tokens per pair)."""
    out: dict[str, Any] = {}
    for name, c in contenders.items():
        if c.get("kind") != "rm_scale":
            continue
        twin = next((t for t, o in contenders.items() if o.get("kind") == "trl" and o.get("ranks") == c.get("ranks")
                     and o.get("pairs_per_device") == c.get("pairs_per_device")), None)
        if twin is not None:
            out[f"{name}/{twin} pairs/s"] = _div(_get(per, name, "pairs_per_s"), _get(per, twin, "pairs_per_s"))
            out[f"{name}/{twin} peak RSS per rank"] = _div(_get(per, name, "peak_rss_gb_per_rank"),
                                                          _get(per, twin, "peak_rss_gb_per_rank"))
        if "-unshared-" in name:
            shared = name.replace("-unshared", "")
            out[f"{shared}/{name} computed tokens per pair"] = _div(_get(per, shared, "computed_tokens_per_pair"),
                                                                   _get(per, name, "computed_tokens_per_pair"))
    return out


def _real_targets(ratios: dict[str, Any]) -> dict[str, Any]:
    t = REAL_TARGETS
    out = {
        f"rm_scale packed >= {t['speedup_vs_trl_1p']}x TRL pairs/s (1 process)": _check(
            ratios.get("rm_scale-packed-1p/trl-1p pairs/s"), t["speedup_vs_trl_1p"]),
        f"rm_scale packed >= {t['speedup_vs_trl_z3x2']}x TRL pairs/s (2-rank ZeRO-3, 4 pairs/device)": _check(
            ratios.get("rm_scale-packed-z3x2/trl-z3x2 pairs/s"), t["speedup_vs_trl_z3x2"]),
    }
    for ws in ("1p", "z3x2"):
        out[f"computed tokens per pair, shared prefix <= {t['computed_tokens_shared_vs_unshared']}x without ({ws})"] = (
            _check(ratios.get(f"rm_scale-packed-{ws}/rm_scale-packed-unshared-{ws} computed tokens per pair"),
                   t["computed_tokens_shared_vs_unshared"], at_most=True))
        out[f"peak RSS per rank <= {t['peak_rss_vs_trl']}x TRL's ({ws})"] = _check(
            ratios.get(f"rm_scale-packed-{ws}/trl-{ws} peak RSS per rank"), t["peak_rss_vs_trl"], at_most=True)
    return out


def _check(value: float | None, target: float, *, at_most: bool = False) -> dict[str, Any]:
    met = None if value is None else (value <= target if at_most else value >= target)
    return {"measured": value, "target": f"{'<=' if at_most else '>='} {target}", "met": met}


def _targets(per: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    ratios = _ratios(per, results)
    if results["settings"].get("mode") == "real":
        return _real_targets(ratios)
    best = {ws: best_batching(per, ws) or "lg" for ws in ("1p", "z3x2")}
    out = {
        f"rm_scale >= {TARGETS['speedup_vs_trl']}x TRL pairs/s (1 process; best batching: {best['1p']})": _check(
            ratios.get(f"rm_scale-{best['1p']}/trl pairs/s (1p)"), TARGETS["speedup_vs_trl"]),
        f"rm_scale >= {TARGETS['speedup_vs_trl']}x TRL pairs/s (2-rank ZeRO-3; best batching: {best['z3x2']})": _check(
            ratios.get(f"rm_scale-{best['z3x2']}/trl pairs/s (z3x2)"), TARGETS["speedup_vs_trl"]),
    }
    padded = {b: _get(per, f"rm_scale-{b}-1p", "padding_efficiency") for b in BATCHINGS}
    tightest = max((b for b in BATCHINGS if padded[b] is not None), key=padded.get, default="lg")
    out[f"padding efficiency >= 0.95 (rm_scale-{tightest}-1p)"] = _check(padded.get(tightest),
                                                                         TARGETS["padding_efficiency"])
    # Identical batches in every repeat: the per-step minimum over repeats is the cost without the other processes of
    # a shared machine (timeit's rule); with one repeat only the mean is there.
    robust = results["settings"]["repeats"] > 1
    key = "step time (per-step min over repeats, summed)" if robust else "step time (mean)"
    # the fastest rm_scale batching that has its bare twin in this run
    twins = [b for b in BATCHINGS if f"rm_scale-{b}-1p/bare-{b}-1p {key}" in ratios]
    twin = max(twins, key=lambda b: _get(per, f"rm_scale-{b}-1p", "pairs_per_s"), default=best["1p"])
    a = f"rm_scale-{twin}-1p"
    out[f"{a} step time <= 1.05x bare loop (identical batches, {key})"] = _check(
        ratios.get(f"{a}/bare-{twin}-1p {key}"), TARGETS["overhead_vs_bare"], at_most=True)
    pipeline = results.get("pipeline") or {}
    variants = {(v["batching"], v["block_size"], v["workers"]): v for v in pipeline.get("variants", [])}
    names = {"fixed": "fixed", "lg": "length_grouped", "packed": "packed"}
    lg = variants.get((names[best["1p"]], results["settings"]["block_size"], 0))
    consumption = _get(per, f"rm_scale-{best['1p']}-1p", "pairs_per_s")
    out["data pipeline >= 10x trainer consumption"] = _check(
        _div(lg["pairs_per_s"], consumption) if lg else None, TARGETS["pipeline_vs_trainer"])
    memory = results.get("zero3_memory") or {}
    if "ws1" in memory and "ws2" in memory:
        one = memory["ws1"]["per_rank"][0]["total_state_bytes"]
        two = max(r["total_state_bytes"] for r in memory["ws2"]["per_rank"])
        out["ZeRO-3 state per rank, 2 ranks <= 0.55x 1 rank"] = _check(two / one, TARGETS["zero3_memory_2_vs_1"],
                                                                        at_most=True)
    return out


# ---- output --------------------------------------------------------------------------------------------------------

def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    per = results["summary"]["contenders"]
    for name, c in results["contenders"].items():
        s = per.get(name)
        pairs_per_device = c.get("pairs_per_device") or results["settings"]["pairs_per_device"]
        if s is None:
            rows.append([name, _failure(results, name), str(pairs_per_device)] + [""] * (len(HEADER) - 3))
            continue
        g = s.get("zero3_gathers_per_step")
        rows.append([
            name,
            f"{s['pairs_per_s']:.2f} [{s['pairs_per_s_min']:.2f}–{s['pairs_per_s_max']:.2f}]",
            str(pairs_per_device),
            f"{s['tokens_per_s']:.0f}",
            f"{s.get('computed_tokens_per_pair', 0.0):.1f}",
            f"{s['padding_efficiency']:.3f}",
            f"{s['step_time_median_s']:.3f} ({s['step_time_p10_s']:.3f}–{s['step_time_p90_s']:.3f})",
            f"{s['cpu_s_per_step_mean']:.3f}",
            f"{s['rank_balance']:.3f}",
            f"{s['peak_rss_gb_per_rank']:.2f}",
            _flops(s),
            f"{s['peak_gpu_gb_per_rank']:.2f}" if "peak_gpu_gb_per_rank" in s else "—",
            f"{g['calls']:.0f} / {g['model_equivalents']:.2f}" if g else "—",
            _other(g),
            " ".join(f"{x:.1f}" for x in s["load_avg_1min"]),
        ])
    return rows


def _failure(results: dict[str, Any], name: str) -> str:
    runs = [r for r in results["runs"] if r["contender"] == name]
    if runs and all(r.get("killed") for r in runs):
        return "killed (SIGKILL: out of memory)"
    return "failed"


def _flops(s: dict[str, Any]) -> str:
    if "model_tflops_per_s" not in s:
        return "—"
    tflops = s["model_tflops_per_s"]
    text = f"{tflops:.3f}" if tflops < 1 else f"{tflops:.1f}"
    return text + (f" ({100 * s['mfu']:.1f} %)" if "mfu" in s else "")


def _other(g: dict[str, Any] | None) -> str:
    if not g or not g["other_collectives"]:
        return "—"
    return ", ".join(f"{k} {v:.2g}" for k, v in sorted(g["other_collectives"].items()))


HEADER = ["contender", "pairs/s median [min–max]", "pairs/device", "real tok/s", "computed tok/pair", "padding eff.", "step s median (p10–p90)",
          "CPU s/step (mean)", "rank balance",
          "peak RSS/rank GB", "model TFLOP/s (MFU)", "peak GPU mem/rank GB", "ZeRO-3 all-gathers/step (calls / model-equiv.)", "other collectives/step",
          "load avg (1 min) at start"]


def text_table(results: dict[str, Any]) -> str:
    rows = [HEADER] + _rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for name, t in results["summary"]["targets"].items():
        lines.append(f"target: {name}: measured {_f(t['measured'], 3)} ({t['target']}) -> "
                     f"{'MET' if t['met'] else 'MISSED' if t['met'] is not None else 'n/a'}")
    for err in results["errors"]:
        lines.append(f"ERROR: {err[:400]}")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict[str, Any]) -> str:
    s, m, env = results["settings"], results["model"], results["environment"]
    summary = results["summary"]
    lines = [
        f"# rm_scale benchmark ({s['mode']}: {s['steps']} steps, measured from step {s['warmup']}, "
        f"{s['repeats']} repeat(s))",
        "",
        f"{env['date']}; {env['cpu_count']} CPU cores, "
        + ("the cores split over the ranks (threads = cores / ranks), " if env.get("threads_per_rank") == "cores"
           else "1 thread per rank, ")
        + (f"{len(env['gpus'])} x {env['gpus'][0]} (peak {_f(env.get('peak_tflops'), 1)} TFLOP/s for MFU)"
           if env.get("gpus") else "no GPU") + "; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".",
        (f"Model: pretrained {m['name']}, " if m.get("name") else "Model: Llama ")
        + f"hidden {m['hidden']}, {m['layers']} layers, {m['params'] / 1e6:.2f}M parameters "
        + (f"(embedding {m['embedding_params'] / 1e6:.2f}M: SmolLM2's {m['tokenizer_vocab']} ids folded into "
           f"{m['vocab']} rows)" if m["vocab"] < m["tokenizer_vocab"] else
           f"(embedding {m['embedding_params'] / 1e6:.2f}M)")
        + f"; max_length {s['max_length']}, {s['pairs_per_device']} pairs per device, "
        f"AdamW ({s.get('optim', 'adamw_torch')}) lr {s['lr']}, clip 1.0, {'bf16 autocast' if s.get('bf16') else 'fp32'}"
        + (f", {s['dataloader_workers']} data worker(s) per rank" if s.get("dataloader_workers") else "")
        + f". 2-rank runs: accelerate launch + ZeRO-3 ({'NCCL' if s.get('device') == 'cuda' else 'gloo'}), "
        "ds_configs/zero3.json with stage3_param_persistence_threshold 0"
        + "".join(f", {k} {v}" for k, v in (s.get("zero3") or {}).items()) + ".",
        "Model TFLOP/s: 6 x matrix parameters x real tokens + causal attention, the same count for every contender "
        "(bench.model.model_flops); MFU = that / the GPUs' dense peak. Real tokens: every pair's chosen + rejected "
        "tokens (a shared prefix counted on both sides); computed: the forward's input positions, padding included; "
        "padding eff.: non-pad computed / computed.",
        "",
        "## Contenders",
        "",
        *_md_table(HEADER, _rows(results)),
        "",
        "## Ratios",
        "",
        *_md_table(["ratio", "value"], [[k, _f(v, 3)] for k, v in summary["ratios"].items()]),
        "",
        "## Targets",
        "",
        *_md_table(["target", "measured", "bound", "met"],
                   [[k, _f(t["measured"], 3), t["target"], _f(t["met"])] for k, t in summary["targets"].items()]),
    ]
    phased = {n: e["rss_phases_gb"] for n, e in summary["contenders"].items() if e.get("rss_phases_gb")}
    if phased:
        lines += ["", "## Peak RSS per phase (GB, the largest over ranks and repeats; the peak's phase in bold)", "",
                  "load: imports and the model; setup: trainer and DeepSpeed engine; forward: the loss's forward; "
                  "backward: from the loss to the optimizer step (under ZeRO-3 the gradient reduce-scatter too); "
                  "optimizer: the step; data: from a step's end to the next forward.", ""]
        rows = []
        for name, phases in phased.items():
            top = max(phases.values())
            rows.append([name] + [(f"**{phases[p]:.2f}**" if phases[p] == top else f"{phases[p]:.2f}")
                                  if p in phases else "" for p in PHASES])
        lines += _md_table(["contender", *PHASES], rows)
    pipeline = results.get("pipeline") or {}
    if pipeline.get("variants"):
        lines += ["", "## Data pipeline alone (PairStream: read, tokenise, batch, collate; no model)", ""]
        lines += _md_table(
            ["batching", "block", "DataLoader workers", "pairs", "pairs/s", "padding eff.", "pairs/batch"],
            [[v["batching"] + (f" ({v['token_budget']})" if v.get("token_budget") else ""), str(v["block_size"]),
              str(v["workers"]), str(v["pairs"]), f"{v['pairs_per_s']:.0f}", f"{v['padding_efficiency']:.3f}",
              f"{v['mean_pairs_per_batch']:.2f}"] for v in pipeline["variants"]])
    memory = results.get("zero3_memory") or {}
    if "ws1" in memory and "ws2" in memory:
        mm = memory["model"]
        lines += ["", f"## ZeRO-3 model + optimizer state per rank ({mm['params'] / 1e6:.1f}M-parameter Llama, "
                  f"hidden {mm['hidden']}, {mm['layers']} layers)", ""]
        keys = ["param_partition_bytes", "fp32_master_bytes", "optimizer_state_bytes", "grad_partition_bytes",
                "total_state_bytes"]
        rows = []
        for ws in ("ws1", "ws2"):
            for rec in memory[ws]["per_rank"]:
                rows.append([ws, str(rec["rank"])] + [f"{rec[k] / 2**20:.1f}" for k in keys]
                            + [f"{rec['rss_after_train_gb'] - rec['rss_before_model_gb']:.2f}",
                               f"{rec['peak_rss_gb']:.2f}"])
        lines += _md_table(["world size", "rank"] + [k.replace("_bytes", " MiB") for k in keys]
                           + ["RSS delta GB", "peak RSS GB"], rows)
    if results["errors"]:
        lines += ["", "## Errors", ""] + [f"- `{e[:300]}`" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = results["summary"]["contenders"]
    names = [n for n in results["contenders"] if n in per]
    colors = ["tab:gray" if n.startswith("trl") else "tab:blue" if n.startswith("rm_scale") else "tab:green"
              for n in names]
    mfu = all("mfu" in per[n] for n in names)
    fig, axes = plt.subplots(1, 3 if mfu else 2, figsize=(16 if mfu else 11, 4))
    rate = [per[n]["pairs_per_s"] for n in names]
    err = [[r - per[n]["pairs_per_s_min"] for r, n in zip(rate, names)],
           [per[n]["pairs_per_s_max"] - r for r, n in zip(rate, names)]]
    axes[0].bar(names, rate, yerr=err, color=colors, capsize=3)
    axes[0].set_ylabel("pairs / s (median, min–max over repeats)")
    eff = [per[n]["padding_efficiency"] for n in names]
    axes[1].bar(names, eff, color=colors)
    axes[1].axhline(TARGETS["padding_efficiency"], color="k", ls="--", lw=1)
    axes[1].set_ylim(0, 1)
    axes[1].set_ylabel("padding efficiency (real / computed tokens)")
    if mfu:
        axes[2].bar(names, [100 * per[n]["mfu"] for n in names], color=colors)
        axes[2].set_ylabel("MFU % (model FLOPs of real tokens / peak)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle(f"rm_scale vs TRL vs bare loop ({results['settings']['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "results.png")
