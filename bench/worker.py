"""One benchmark contender in its own process — under `accelerate launch`, one rank of it.

    python -m bench.worker SPEC.json

SPEC.json is a list of contender specs (normally one; `--smoke` and `--gpu` run several in one process to save
start-ups). Each rank writes ``<out_dir>/<name>.rank<k>.json``: per-step end times, pairs, real and computed (padded)
tokens, the sum of squared sequence lengths (for attention FLOPs), its peak memory (host, and GPU on CUDA), and — in
multi-rank runs — the ZeRO-3 parameter all-gathers it issued. `bench.report` aggregates.

A spec's ``device`` ("cpu" or "cuda") and ``bf16`` apply to every contender alike: on CUDA each rank uses the GPU of its
local rank, step ends are taken after `torch.cuda.synchronize()`, and bf16 is autocast over fp32 weights (what
`TrainingArguments(bf16=True)` does for TRL and rm_scale; the bare loop uses the same autocast).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    specs = json.loads(Path(argv[0]).read_text())
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    counter = GatherCounter() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if counter is not None:
        counter.install()
    failed = 0
    for spec in specs:
        cuda = spec.get("device") == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.reset_peak_memory_stats()
        run = {"trl": run_trl, "rm_scale": run_rm_scale, "bare": run_bare, "zero3_memory": run_zero3_memory,
               "pipeline": run_pipeline}[spec["kind"]]
        if counter is not None:
            counter.reset()
        if len(specs) > 1 and counter is None:
            # one process, several contenders: a contender that fails (an OOM on a GPU, say) is reported (no record:
            # the driver lists it with this traceback) and the next one still runs. Not with several ranks: a rank
            # that went on alone would wait in a collective its peers never join.
            try:
                record = run(spec, counter)
            except Exception:
                import traceback

                traceback.print_exc()
                print(f"bench.worker: {spec['name']} failed; going on with the next contender",
                      file=sys.stderr, flush=True)
                failed += 1
                _release(cuda)
                continue
        else:
            record = run(spec, counter)
        rank = int(os.environ.get("RANK", "0"))
        record.update(name=spec["name"], kind=spec["kind"], rank=rank, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                      peak_rss_gb=peak_rss_gb())
        if cuda:
            record["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out = Path(spec["out_dir"]) / f"{spec['name']}.rank{rank}.json"
        out.write_text(json.dumps(record))
        if len(specs) > 1:  # the next contender in this process starts from a clean slate
            _release(cuda)
    return 1 if failed else 0


def _release(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


# ---- measurement helpers -------------------------------------------------------------------------------------------

def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


_WATCHED: RssPhases | None = None  # the contender whose phases the DeepSpeed step marks


class RssPhases:
    """Where a rank's peak resident memory is reached: a thread samples RSS every 20 ms and keeps the largest value
    seen in each labelled phase ("load", "setup", "forward", "backward", "optimizer", "data"). ``ru_maxrss`` gives
    the peak alone; this says which part of the run sets it, for every contender alike. ``BENCH_MALLINFO=1`` also
    keeps glibc's in-use heap + mmapped bytes per phase (``live:<phase>``): RSS above it is freed memory the allocator
    kept."""

    def __init__(self) -> None:
        import threading

        self.phase = "load"
        self.peaks: dict[str, float] = {}
        self._mallinfo = bool(os.environ.get("BENCH_MALLINFO"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-phases", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.mark()

    def mark(self, phase: str | None = None) -> None:
        """Record the current RSS under the phase that is ending, then switch to ``phase``."""
        rss = current_rss_gb()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
        if self._mallinfo:
            live = _malloc_live_gb()
            self.peaks["live:" + self.phase] = max(self.peaks.get("live:" + self.phase, 0.0), live)
        if phase is not None:
            self.phase = phase

    def watch_deepspeed_step(self) -> None:
        """Under DeepSpeed the optimizer step runs inside the trainer's backward call (the engine's step): mark it.
        The engine class is wrapped once per process; the wrapper marks the latest contender's phases."""
        global _WATCHED
        _WATCHED = self
        try:
            from deepspeed.runtime.engine import DeepSpeedEngine
        except ImportError:
            return
        if getattr(DeepSpeedEngine.step, "_rss_phases", False):
            return
        step = DeepSpeedEngine.step

        def marked(engine: Any, *args: Any, **kwargs: Any) -> Any:
            phases = _WATCHED
            phases.mark("optimizer")
            try:
                return step(engine, *args, **kwargs)
            finally:
                phases.mark("data")

        marked._rss_phases = True  # type: ignore[attr-defined]
        DeepSpeedEngine.step = marked

    def record(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.mark()
        return {k: round(v, 3) for k, v in self.peaks.items()}


def _malloc_live_gb() -> float:
    """Bytes glibc's malloc has handed out and not had back (mallinfo2: arenas' in-use + mmapped chunks), in GB."""
    m = _mallinfo2()()
    return (m.uordblks + m.hblkhd) / 2**30


@functools.cache
def _mallinfo2() -> Any:
    """glibc's mallinfo2, bound once (the sampler calls it every 20 ms)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn = ctypes.CDLL("libc.so.6").mallinfo2
    fn.restype = MallInfo2
    return fn


class GatherCounter:
    """Counts the ZeRO-3 parameter all-gathers (calls and bytes) this rank issues, by wrapping the two DeepSpeed comm
    functions that stage 3 fetches parameters with (`allgather_fn` via `_dist_allgather_fn`, and
    `all_gather_into_tensor`). Other collectives (metric gathers) are counted at the torch.distributed level."""

    DS_NAMES = ("allgather_fn", "all_gather_into_tensor")
    TORCH_NAMES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "broadcast",
                   "reduce_scatter_tensor", "reduce_scatter")

    def __init__(self) -> None:
        self.reset()
        self._depth = 0  # DeepSpeed's wrappers call torch's: count each call once, at the outermost level

    def reset(self) -> None:
        self.ds_calls, self.ds_bytes = 0, 0
        self.torch_calls: dict[str, int] = {}

    def install(self) -> None:
        import deepspeed.comm as ds_comm
        import torch.distributed as tdist

        for name in self.DS_NAMES:
            setattr(ds_comm, name, self._wrap_ds(getattr(ds_comm, name)))
        for name in self.TORCH_NAMES:
            if hasattr(tdist, name):
                setattr(tdist, name, self._wrap_torch(name, getattr(tdist, name)))

    def _wrap_ds(self, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:  # allgather_fn calls all_gather_into_tensor: one gather, counted once
                out = args[0] if args else kwargs["output_tensor"]
                self.ds_calls += 1
                self.ds_bytes += out.numel() * out.element_size()
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return wrapped

    def _wrap_torch(self, name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.torch_calls[name] = self.torch_calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapped

    def snapshot(self) -> dict[str, Any]:
        return {"ds_allgather_calls": self.ds_calls, "ds_allgather_bytes": self.ds_bytes,
                "other_collectives": dict(self.torch_calls)}


class StepLog:
    """Per optimizer step: end time, pairs, real and computed tokens and the sum of squared sequence lengths (summed
    over the step's micro-batches), and the all-gather counters at the step's end. ``sync``: wait for the GPU's queued
    work before reading the clock (on CUDA a step's Python returns long before its kernels finish)."""

    def __init__(self, counter: GatherCounter | None, *, sync: bool = False) -> None:
        self.counter = counter
        self.sync = sync
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.ends: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds at each step end: robust to other load on the machine
        self.pairs: list[int] = []
        self.real: list[int] = []
        self.placed: list[int] = []
        self.computed: list[int] = []
        self.attn: list[int] = []
        self.gathers: list[dict[str, Any]] = []
        self._pending = [0, 0, 0, 0, 0]

    def batch(self, *, pairs: int, real: Any, computed: int, attn: Any, placed: Any = None) -> None:
        """Counts may be 0-d tensors on the device: they are read at the step's end, after its synchronize, so that
        counting adds no host sync inside the step."""
        self._pending[0] += pairs
        self._pending[1] += real
        self._pending[2] += computed
        self._pending[3] += attn
        self._pending[4] += real if placed is None else placed

    def step_end(self) -> None:
        if self.sync:
            import torch

            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.pairs.append(int(self._pending[0]))
        self.real.append(int(self._pending[1]))
        self.computed.append(int(self._pending[2]))
        self.attn.append(int(self._pending[3]))
        self.placed.append(int(self._pending[4]))
        self._pending = [0, 0, 0, 0, 0]
        if self.counter is not None:
            self.gathers.append(self.counter.snapshot())

    def record(self) -> dict[str, Any]:
        return {"start": self.start, "cpu_start": self.cpu_start, "step_ends": self.ends, "step_cpu": self.cpu,
                "pairs": self.pairs, "real_tokens": self.real, "placed_tokens": self.placed,
                "computed_tokens": self.computed,
                "attention_square_tokens": self.attn, "gathers": self.gathers}

    def begin(self) -> None:
        if self.sync:
            import torch

            torch.cuda.synchronize()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()


def _step_callback(log: StepLog, phases: RssPhases) -> Any:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        # on_step_end fires after the optimizer step; differences of consecutive ends include data loading, logging
        # and everything else the trainer does between steps.
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if phases.phase == "backward":  # without DeepSpeed (under it, the engine's step is marked)
                phases.mark("optimizer")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            log.step_end()
            phases.mark("data")

    return StepClock()


def _common_args(spec: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments shared by TRL and rm_scale: the same optimizer, schedule, clipping, precision and logging."""
    args = {
        "output_dir": str(Path(spec["out_dir"]) / f"{spec['name']}.run"),
        "per_device_train_batch_size": spec["pairs_per_device"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["steps"],
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "optim": spec.get("optim", "adamw_torch"),
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_length": spec["max_length"],
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "seed": spec["seed"],
        "bf16": bool(spec.get("bf16")),  # fp32 on CPU; bf16 autocast (fp32 weights) on GPU -- TRL's default is bf16
        "gradient_checkpointing": False,  # TRL's default would be True; rm_scale's and transformers' is False
        "disable_dropout": True,
        "dataloader_pin_memory": spec.get("device") == "cuda",
        # the same for every contender: TRL's collator pads in the worker, rm_scale's stream tokenises and batches there
        "dataloader_num_workers": spec.get("dataloader_workers", 0),
    }
    if spec.get("bf16") and spec.get("device", "cpu") == "cpu":
        args["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told to train on the CPU
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and spec.get("device", "cpu") == "cpu":
        args["ddp_backend"] = "gloo"  # PLATFORM.md item 1/8: Accelerate picks no backend without a GPU
    return args


# ---- contenders ----------------------------------------------------------------------------------------------------

def run_trl(spec: dict[str, Any], counter: GatherCounter | None) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    log = StepLog(counter, sync=spec.get("device") == "cuda")
    phases = RssPhases()
    phases.watch_deepspeed_step()

    class TimedRewardTrainer(RewardTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            mask = inputs["attention_mask"]
            lengths = mask.sum(dim=1)
            log.batch(pairs=mask.shape[0] // 2, real=lengths.sum(), computed=mask.numel(),
                      attn=(lengths * lengths).sum())
            phases.mark("forward")
            loss = super().compute_loss(model, inputs, *a, **k)
            phases.mark("backward")
            return loss

    args = RewardConfig(**_common_args(spec))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = _read_pairs(spec["data"])
    model = _load(spec)  # as TRL would from the path (after the config: partitioned under ZeRO-3), plus the fold
    phases.mark("setup")
    trainer = TimedRewardTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=Dataset.from_list(rows), callbacks=[_step_callback(log, phases)])
    log.begin()
    trainer.train()
    return {**log.record(), "train_pairs": len(trainer.train_dataset), "rss_phases_gb": phases.record()}


def run_rm_scale(spec: dict[str, Any], counter: GatherCounter | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from rm_scale.config import RewardConfig
    from rm_scale.model import load_reward_model
    from rm_scale.data.stream import PairFiles
    from bench.model import fold_vocab
    from rm_scale.train.trainer import RewardTrainer

    log = StepLog(counter, sync=spec.get("device") == "cuda")
    phases = RssPhases()
    phases.watch_deepspeed_step()

    class TimedRewardTrainer(RewardTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            if not inputs.get("_pad", False):
                log.batch(**batch_counts(inputs))
            phases.mark("forward")
            loss = super().compute_loss(model, inputs, *a, **k)
            phases.mark("backward")
            return loss

    packed = spec["batching"] == "packed"
    args = RewardConfig(**_common_args(spec), batching=spec["batching"], token_budget=spec.get("token_budget"),
                        stream_block_size=spec["block_size"], save_on_signal=False,
                        shared_prefix=spec.get("shared_prefix", packed) if packed else None,
                        lean_activations=spec.get("lean_activations", True))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = load_reward_model(spec["model_dir"])  # after RewardConfig: loads partitioned under ZeRO-3
    fold_vocab(model, spec["vocab"])
    phases.mark("setup")
    trainer = TimedRewardTrainer(model=model, args=args, processing_class=tokenizer,
                                 train_dataset=PairFiles([spec["data"]]), callbacks=[_step_callback(log, phases)])
    log.begin()
    trainer.train()
    return {**log.record(), "rss_phases_gb": phases.record()}


def batch_counts(batch: dict[str, Any]) -> dict[str, Any]:
    """Pairs, real tokens (each side's whole length: what a trainer without sharing computes unpadded), placed tokens
    (the non-pad tokens the forward computes: a shared prefix once), computed tokens (the forward's input size) and
    the sum over sequences of length² (causal attention's work grows with it) of a padded or a packed micro-batch.
    Token counts stay tensors (no host sync when the batch is on a GPU); `StepLog` reads them at the step's end."""
    import torch

    from rm_scale.data.collate import computed_tokens

    if "packed_input_ids" in batch:
        index = torch.cat([batch["chosen_index"], batch["rejected_index"]])
        pos = batch["packed_position_ids"]
        lengths = pos[index[:, 0].to(pos.device), index[:, 1].to(pos.device)] + 1  # last position + 1
        return {"pairs": batch["chosen_index"].shape[0], "real": lengths.sum(), "placed": batch["packed_real_tokens"],
                "computed": computed_tokens(batch), "attn": (lengths * lengths).sum()}
    c, r = batch["attention_mask_chosen"], batch["attention_mask_rejected"]
    lengths = torch.cat([c.sum(dim=1), r.sum(dim=1)])
    return {"pairs": c.shape[0], "real": lengths.sum(), "placed": lengths.sum(), "computed": computed_tokens(batch),
            "attn": (lengths * lengths).sum()}


def bare_batches(spec: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
    """The micro-batches rm_scale's stream yields for this spec (same files, seed, block size, batching), in order."""
    import itertools

    from rm_scale.data.stream import PairStream, StreamConfig

    config = StreamConfig(sources=[spec["data"]], pairs_per_batch=spec["pairs_per_device"],
                          max_length=spec["max_length"], batching=spec["batching"],
                          token_budget=spec.get("token_budget"), block_size=spec["block_size"], seed=spec["seed"],
                          shared_prefix=spec.get("shared_prefix", spec["batching"] == "packed"))
    return list(itertools.islice(PairStream(config, tokenizer, rank=0, world_size=1), spec["steps"]))


def run_bare(spec: dict[str, Any], counter: GatherCounter | None) -> dict[str, Any]:
    """The framework-overhead limit: one concatenated forward, BT loss, backward, clip, AdamW — nothing else."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    device = torch.device(spec.get("device", "cpu"))
    # materialised first (and moved to the device): no data cost inside the timed loop
    host = bare_batches(spec, tokenizer)
    counted = [batch_counts(b) for b in host]
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in host]
    torch.manual_seed(spec["seed"])
    model = _load(spec).to(device)  # HF pools at the last id != pad_token_id: right padding, pad never inside the text
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(spec.get("bf16")))
    # The bare loops that mirror an rm_scale contender (length_grouped, packed batches) compute the model as rm_scale
    # does -- rm_scale's reward forward, last layer only at the read tokens, SDPA per packed sequence, lean RMSNorm and
    # MLP -- so that rm_scale / bare measures framework overhead alone. bare-fixed (TRL's batches) runs the stock HF
    # forward, as TRL.
    mirror = spec["batching"] != "fixed"
    if mirror:
        from rm_scale.model.last_layer import use_sparse_last_layer
        from rm_scale.model.lean_layers import use_lean_layers
        from rm_scale.model.packed_attention import use_packed_attention

        use_sparse_last_layer(model)
        if spec.get("lean_activations", True):
            use_lean_layers(model)
        if spec["batching"] == "packed":
            use_packed_attention(model)
    fused = spec.get("optim") == "adamw_torch_fused"  # the kernel transformers picks for that name
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0, fused=fused or None)
    log = StepLog(counter, sync=device.type == "cuda")
    log.begin()
    for batch, counts in zip(batches, counted):
        log.batch(**counts)
        n = counts["pairs"]
        with autocast:
            rewards = _bare_rewards(model, batch, mirror)
        loss = -F.logsigmoid(rewards[:n].float() - rewards[n:].float()).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.step_end()
    return log.record()


def _bare_rewards(model: Any, batch: dict[str, Any], mirror: bool) -> Any:
    """One concatenated forward over chosen + rejected: rm_scale's forward for the mirroring loops, else stock HF."""
    import torch

    from rm_scale.model import forward_packed_rewards, forward_rewards

    if "packed_input_ids" in batch:
        # padding-free: restarting position_ids, no attention mask; each sequence's reward at its last token
        index = torch.cat([batch["chosen_index"], batch["rejected_index"]])
        spans = torch.cat([batch["chosen_span"], batch["rejected_span"]]) if "chosen_span" in batch else None
        return forward_packed_rewards(model, batch["packed_input_ids"], batch["packed_position_ids"], index,
                                      groups=batch.get("packed_groups"), spans=spans)
    ids = torch.cat([batch["input_ids_chosen"], batch["input_ids_rejected"]])
    mask = torch.cat([batch["attention_mask_chosen"], batch["attention_mask_rejected"]])
    if mirror:
        return forward_rewards(model, ids, mask)
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0]


def run_zero3_memory(spec: dict[str, Any], counter: GatherCounter | None) -> dict[str, Any]:
    """Bytes of model and optimizer state this rank holds under ZeRO-3 after a few optimizer steps, counted from the
    DeepSpeed engine (parameter partitions, fp32 master partitions, optimizer moments, gradient partitions), and the
    resident memory before the model was loaded and after training."""
    rss_before = current_rss_gb()
    holder: dict[str, Any] = {}
    result: dict[str, Any] = {}
    from transformers import TrainerCallback

    class Inspect(TrainerCallback):
        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            result.update(zero3_state_bytes(holder["trainer"].model_wrapped))

    spec = {**spec, "batching": "fixed", "block_size": 64}
    from transformers import AutoTokenizer

    from bench.model import fold_vocab
    from rm_scale.config import RewardConfig
    from rm_scale.model import load_reward_model
    from rm_scale.data.stream import PairFiles
    from rm_scale.train.trainer import RewardTrainer

    args = RewardConfig(**_common_args(spec), truncation="keep_end", stream_block_size=64, save_on_signal=False)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = load_reward_model(spec["model_dir"])
    fold_vocab(model, spec["vocab"])
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=PairFiles([spec["data"]]),
                            callbacks=[Inspect()])
    holder["trainer"] = trainer
    trainer.train()
    return {**result, "rss_before_model_gb": rss_before, "rss_after_train_gb": current_rss_gb(),
            "model_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())}


def run_pipeline(spec: dict[str, Any], counter: GatherCounter | None) -> dict[str, Any]:
    """rm_scale's data pipeline alone (read, tokenise, batch, collate; no model): one pass per batching, in the process
    and through a DataLoader with one background worker; pairs/s and padding efficiency (real / computed tokens)."""
    import itertools

    import torch
    from transformers import AutoTokenizer

    from rm_scale.data.stream import PairStream, StreamConfig

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    results = []
    for variant in spec["variants"]:
        config = StreamConfig(sources=[spec["data"]], pairs_per_batch=spec["pairs_per_device"],
                              max_length=spec["max_length"], batching=variant["batching"],
                              token_budget=variant.get("token_budget"), block_size=variant["block_size"],
                              seed=spec["seed"], shared_prefix=variant["batching"] == "packed")
        stream = PairStream(config, tokenizer, rank=0, world_size=1)
        source: Any = stream
        if variant["workers"]:
            source = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=variant["workers"])
        pairs = real = computed = batches = 0
        start = time.perf_counter()
        for batch in itertools.islice(source, spec.get("max_batches")):
            counts = batch_counts(batch)
            pairs += counts["pairs"]
            real += int(counts["real"])
            computed += counts["computed"]
            batches += 1
        seconds = time.perf_counter() - start
        results.append({**variant, "pairs": pairs, "batches": batches, "seconds": seconds,
                        "pairs_per_s": pairs / seconds, "padding_efficiency": real / max(computed, 1),
                        "mean_pairs_per_batch": pairs / max(batches, 1)})
    return {"variants": results}


def zero3_state_bytes(engine: Any) -> dict[str, int]:
    """What this rank holds of the model and optimizer state, by category (bytes)."""
    import torch

    def nbytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    module = engine.module
    params = list(module.parameters())
    out = {
        # the rank's shard of each (fp32) parameter; params stay partitioned outside forward/backward
        "param_partition_bytes": nbytes(p.ds_tensor for p in params if hasattr(p, "ds_tensor")),
        # parameters gathered whole at this moment (persistent small params, or not released)
        "param_full_bytes": nbytes(p.data for p in params),
    }
    zero_opt = engine.optimizer
    out["fp32_master_bytes"] = nbytes(getattr(zero_opt, "fp32_partitioned_groups_flat", []))
    inner = getattr(zero_opt, "optimizer", zero_opt)
    out["optimizer_state_bytes"] = nbytes(v for state in inner.state.values() for v in state.values())
    grads = getattr(zero_opt, "grad_partitions_flat_buffer", None)
    out["grad_partition_bytes"] = nbytes([grads]) if grads is not None else 0
    out["total_state_bytes"] = (out["param_partition_bytes"] + out["fp32_master_bytes"] + out["optimizer_state_bytes"]
                                + out["grad_partition_bytes"])
    return out


def _load(spec: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification

    from bench.model import fold_vocab

    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32)
    fold_vocab(model, spec["vocab"])
    return model


def _read_pairs(path: str) -> list[dict[str, str]]:
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in map(json.loads, f)]


if __name__ == "__main__":
    sys.exit(main())
