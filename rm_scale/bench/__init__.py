"""Benchmarks: rm_scale against TRL's RewardTrainer and against a bare PyTorch loop, on one machine in one go.

    python -m rm_scale.bench [--quick | --smoke] [--out bench_results]     (make bench / make bench-quick)

Every contender trains the same small Llama (`rm_scale.bench.model`) on the hh-rlhf pairs in ``../shared/data`` with
the same optimizer, learning rate, clipping, precision (fp32), max_length and pairs per device, in its own process
(multi-rank ones through `accelerate launch` with ZeRO-3); `rm_scale.bench.worker` runs one, `rm_scale.bench.report`
turns the per-rank JSON files into the table, results.json, results.md and results.png. See docs/benchmarks.md.

Heavy imports (torch, transformers, trl, deepspeed) stay inside functions: the driver process itself only launches.
"""
