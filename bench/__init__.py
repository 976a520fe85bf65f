"""Benchmarks: rm_scale against TRL's RewardTrainer and against a bare PyTorch loop, on one machine in one go.

    python -m bench [--quick | --smoke] [--out bench_results]     (make bench / make bench-quick)

Every contender trains the same small Llama (`bench.model`) on the hh-rlhf pairs in ``../shared/data`` with the
same optimizer, learning rate, clipping, precision (fp32; with --gpu bf16 autocast for all alike), max_length and
pairs per device, in its own process (multi-rank ones through `accelerate launch` with ZeRO-3); `bench.worker` runs
one, `bench.report` turns the per-rank JSON files into the table, results.json, results.md and results.png. Not part
of the installed package: it imports trl and needs a checkout with ../shared. See docs/benchmarks.md.

Heavy imports (torch, transformers, trl, deepspeed) stay inside functions: the driver process itself only launches.
"""
