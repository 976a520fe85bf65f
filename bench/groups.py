"""K responses per prompt (#15): pairs (edges) per second training on the FineGrained QA feedback (4 answers per
question, 6 pairwise labels with ties) with the real model of the benchmark (SmolLM2-135M-Instruct, fp32, 1 process),
rm_scale's one-forward-per-group training against TRL fed the same rows expanded to pairs.

    python -m bench.groups [--steps 16] [--repeats 2] [--eval-steps 30] [--passages] [--out bench_results/groups]

- TRL: `trl.RewardTrainer` on the pairs rm_scale's pair path makes of the rows (the question as the user turn, each
  answer as the assistant turn; ties dropped, as TRL has no tie), 8 pairs per step (4 with ``--passages``: 8 run out
  of memory on 24 GB), padded batches in random order.
- rm_scale: `response_groups` (Bradley-Terry over each group's edges), `per_device_train_batch_size` groups per
  step, packed: each question computed once, each answer once.
Both: the same optimizer (AdamW, lr 1e-5 constant), max_length 512, no dropout, no gradient checkpointing, on the
train split (80% of the questions by a seeded hash; the other 20% are the held-out set). Each contender runs in its
own process, alternating, ``--repeats`` times; the first 2 steps are warm-up and not timed. Pairs/s = preference
edges trained / seconds. With ``--eval-steps``, each contender then scores the held-out pairs (the same model state after
an equal number of trained pairs: TRL's steps x its pairs per step) and reports pairwise accuracy. ``--passages``:
the prompt is the question and its Wikipedia passages (what the FineGrained QA task conditions on), max_length 1536.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "finegrained-qa-feedback" / "dev_feedback.json"
WARMUP = 2


def _trl_pairs() -> int:
    """TRL's pairs per step: 8, or 4 with --passages (8 padded ~1,300-token pairs without gradient checkpointing are
    killed out of memory on a 24 GB machine: measured)."""
    return int(os.environ.get("BENCH_GROUPS_TRL_PAIRS", "8"))


def _common(out: Path, steps: int, batch: int) -> dict[str, Any]:
    return dict(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                max_length=int(os.environ.get("BENCH_GROUPS_MAX_LENGTH", "512")),
                logging_steps=1000, save_strategy="no", report_to="none", seed=0, bf16=False,
                gradient_checkpointing=False, disable_dropout=True, dataloader_pin_memory=False)


def _split(eval_fraction: float = 0.2) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows as one JSONL file, and the train / held-out pairs the pair path makes of them (by question)."""
    from rm_scale.data.mapping import parse_mapping
    from rm_scale.data.pairs import in_eval_split, to_pairs

    rows = json.loads(DATA.read_text())
    if os.environ.get("BENCH_GROUPS_PASSAGES") == "1":  # the question with its Wikipedia passages, as the task has it
        rows = [{**r, "question": "\n\n".join([r["question"], *(" ".join(p[1:]) for p in r["passages"])])} for r in rows]
    path = Path(tempfile.mkdtemp()) / "finegrained.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = [], []
    for row in rows:
        for pair in to_pairs(row, parse_mapping(None)):
            if "drop" not in pair:
                (held if in_eval_split(pair, eval_fraction, 0) else train).append(pair)
    return path, train, held


class _Clock:
    def __init__(self, stop_after_pairs: int | None = None) -> None:
        self.ends: list[float] = []
        self.batch_pairs: list[int] = []
        self.stop_after_pairs = stop_after_pairs

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class StepClock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.ends.append(time.perf_counter())
                if clock.stop_after_pairs and sum(clock.batch_pairs) >= clock.stop_after_pairs:
                    control.should_training_stop = True  # --eval: as many pairs trained as TRL's steps x 8

        return StepClock()

    def result(self) -> dict[str, Any]:
        batch_pairs = self.batch_pairs
        # pairs of step i (after the warm-up) over the time between the ends of steps i-1 and i
        seconds = self.ends[-1] - self.ends[WARMUP - 1]
        pairs = sum(batch_pairs[WARMUP:len(self.ends)])
        return {"steps": len(self.ends) - WARMUP, "seconds": seconds, "pairs": pairs, "pairs_per_s": pairs / seconds,
                "trained_pairs": sum(batch_pairs[:len(self.ends)])}


def run_trl(steps: int, out: Path, evaluate: bool) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rm_scale.model import load_reward_model
    from rm_scale.model.pretrained import smollm2_path

    _, train, held = _split()
    clock, tokens = _Clock(), [0, 0]
    batch_pairs = clock.batch_pairs

    class Timed(RewardTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            mask = inputs["attention_mask"]
            batch_pairs.append(mask.shape[0] // 2)
            tokens[0] += int(mask.sum())
            tokens[1] += mask.numel()
            return super().compute_loss(model, inputs, *a, **k)

    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in train]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    trainer = Timed(model=load_reward_model(str(smollm2_path())), args=RewardConfig(**_common(out, steps, _trl_pairs())),
                    processing_class=tokenizer, train_dataset=Dataset.from_list(rows), callbacks=[clock.callback()])
    trainer.train()
    result = {**clock.result(), "computed_tokens_per_pair": tokens[1] / max(sum(batch_pairs), 1)}
    if evaluate:
        result["eval_accuracy"] = _accuracy(trainer.model, tokenizer, held)
    return result


def run_rm_scale(steps: int, groups: int, out: Path, evaluate: bool, pairs: int | None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from rm_scale import RewardConfig, RewardTrainer
    from rm_scale.data import PairFiles
    from rm_scale.model import load_reward_model
    from rm_scale.model.pretrained import smollm2_path

    path, _, held = _split()
    clock, tokens = _Clock(stop_after_pairs=pairs), [0, 0]
    batch_pairs = clock.batch_pairs

    class Timed(RewardTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            if not inputs.get("_pad", False):
                batch_pairs.append(int(inputs["group_edges"]))
                tokens[0] += int(inputs["packed_pair_tokens"])
                tokens[1] += int(inputs["packed_input_ids"].numel())
            return super().compute_loss(model, inputs, *a, **k)

    args = RewardConfig(**_common(out, steps, groups), batching="packed", token_budget=16384, response_groups=True,
                        eval_fraction=0.2, save_on_signal=False, activation_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    trainer = Timed(model=load_reward_model(str(smollm2_path())), args=args, processing_class=tokenizer,
                    train_dataset=PairFiles([str(path)]), callbacks=[clock.callback()])
    trainer.train()
    result = {**clock.result(), "computed_tokens_per_pair": tokens[1] / max(sum(batch_pairs), 1),
              "pair_tokens_per_pair": tokens[0] / max(sum(batch_pairs), 1)}
    if evaluate:
        result["eval_accuracy"] = _accuracy(trainer.model, tokenizer, held)
    return result


def _accuracy(model: Any, tokenizer: Any, pairs: list[dict[str, Any]]) -> float:
    """Pairwise accuracy on the held-out pairs, both contenders scored by the same code (one pair at a time)."""
    import torch

    from rm_scale.data.formats import tokenize_canonical
    from rm_scale.model.reward import forward_rewards

    model.eval()
    right = 0.0
    with torch.no_grad():
        for pair in pairs:
            ids = tokenize_canonical(pair, tokenizer)
            r = [forward_rewards(model, torch.tensor([ids[f"input_ids_{s}"]]), torch.ones(1, len(ids[f"input_ids_{s}"]),
                 dtype=torch.long))[0] for s in ("chosen", "rejected")]
            right += 1.0 if r[0] > r[1] else 0.5 if r[0] == r[1] else 0.0
    return right / len(pairs)


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contender", choices=["trl", "rm_scale"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--groups", type=int)
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--pairs", type=int, default=None, help="rm_scale: stop once this many pairs are trained")
    parser.add_argument("--result")
    a = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    out = Path(tempfile.mkdtemp())
    result = run_trl(a.steps, out, a.eval) if a.contender == "trl" else run_rm_scale(
        a.steps if a.pairs is None else 10**6, a.groups, out, a.eval, a.pairs)
    import resource

    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(a.result).write_text(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return _child(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.groups", description=__doc__)
    parser.add_argument("--steps", type=int, default=16, help="timed steps + 2 warm-up, per run")
    parser.add_argument("--groups", type=int, default=4, help="rm_scale's groups (questions) per step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval-steps", type=int, default=0,
                        help="then train TRL this many steps (x 8 pairs) and rm_scale as many pairs, and compare "
                        "held-out accuracy (0: skip)")
    parser.add_argument("--passages", action="store_true", help="the prompt is the question and its passages (as the "
                        "FineGrained QA task gives them; max_length 1536) instead of the question alone")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "groups"))
    args = parser.parse_args(argv)
    if args.passages:  # read by the child processes
        os.environ.update(BENCH_GROUPS_PASSAGES="1", BENCH_GROUPS_MAX_LENGTH="1536", BENCH_GROUPS_TRL_PAIRS="4")
    if not DATA.is_file():
        print(f"bench.groups: skipped: {DATA} not found")
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"trl": [], "rm_scale": []}
    for repeat in range(args.repeats):
        for contender in ("trl", "rm_scale") if repeat % 2 == 0 else ("rm_scale", "trl"):
            result = Path(tempfile.mkdtemp()) / "result.json"
            subprocess.run([sys.executable, "-m", "bench.groups", "--child", "--contender", contender,
                            "--steps", str(args.steps + WARMUP), "--groups", str(args.groups),
                            "--result", str(result)], cwd=ROOT, check=True)
            runs[contender].append(json.loads(result.read_text()))
            print(contender, runs[contender][-1], flush=True)
    report = _report(runs, args)
    if args.eval_steps:
        report["evaluation"] = {}
        for contender in ("trl", "rm_scale"):
            result = Path(tempfile.mkdtemp()) / "result.json"
            subprocess.run([sys.executable, "-m", "bench.groups", "--child", "--contender", contender, "--eval",
                            "--steps", str(args.eval_steps), "--groups", str(args.groups),
                            "--pairs", str(_trl_pairs() * args.eval_steps), "--result", str(result)], cwd=ROOT, check=True)
            got = json.loads(result.read_text())
            report["evaluation"][contender] = {"trained_pairs": sum_pairs(got), "eval_accuracy": got["eval_accuracy"]}
            print(contender, report["evaluation"][contender], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"runs": runs, **report}, indent=2))
    print(json.dumps(report, indent=2))
    return 0


def sum_pairs(result: dict[str, Any]) -> int:
    return int(result["trained_pairs"])


def _report(runs: dict[str, list[dict[str, Any]]], args: Any) -> dict[str, Any]:
    def rate(name: str) -> float:
        return sum(r["pairs"] for r in runs[name]) / sum(r["seconds"] for r in runs[name])

    trl, ours = rate("trl"), rate("rm_scale")
    return {"steps": args.steps, "groups_per_step": args.groups, "passages": args.passages,
            "max_length": int(os.environ.get("BENCH_GROUPS_MAX_LENGTH", "512")), "trl_pairs_per_step": _trl_pairs(),
            "trl_pairs_per_s": trl, "rm_scale_pairs_per_s": ours,
            "speedup": ours / trl, "target": 8.0,
            "computed_tokens_per_pair": {k: sum(r["computed_tokens_per_pair"] for r in v) / len(v)
                                         for k, v in runs.items()},
            "peak_rss_gb": {k: max(r["peak_rss_gb"] for r in v) for k, v in runs.items()}}


if __name__ == "__main__":
    sys.exit(main())
