"""`rm-scale eval`: score a trained reward model on preference files, without training.

    rm-scale eval --model outputs/run/final --data test.jsonl [--json] [--batch-size 16] [--max-length 1024]
    rm-scale eval --model outputs/run/final --data ultrafeedback.jsonl --format ultrafeedback --groups

Loads a full model folder or a PEFT adapter folder (`adapter_config.json`; the base model is read from the path the
adapter names), reads the files as training does (rm_scale.data: formats, `--format` presets, bad rows counted),
and reads every reward with `rm_scale.model.reward.forward_rewards`, one forward per batch over chosen and rejected
together. Prints accuracy (ties count half), per `subset` column when there is one, the number of pairs and the reward
statistics; `--json` prints them as one JSON object. Writes a PNG (default `<model>/reward_eval.png`): the chosen and
rejected reward distributions and, when the run's `metrics.jsonl` is in the model folder's parent (the model is
`<output_dir>/final`), the train and eval accuracy curves.

One process on one device (the GPU when there is one): the model must fit there whole. That is enough to score a
test set; scoring huge sets or models that need ZeRO-3 to fit is `RewardTrainer.evaluate` under `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.trainer_utils import EvalPrediction

from rm_scale.data.collate import RewardDataCollatorWithPadding
from rm_scale.data.sources import parse_sources
from rm_scale.data.stream import PairStream, StreamConfig, materialize_pairs
from rm_scale.model.packed_attention import use_packed_attention
from rm_scale.model.reward import base_model, forward_rewards, read_reward_stats
from rm_scale.scoring.scorer import load_scoring_model
from rm_scale.train.batch_loss import forward_batch
from rm_scale.train.metrics import compute_reward_metrics, group_set_metrics
from rm_scale.train.stream_eval import EvalRows

PLOT_NAME = "reward_eval.png"
GROUP_BATCH_TOKENS = 16384  # --groups: tokens per packed forward


def score_pairs(model: torch.nn.Module, tokenizer: Any, data: Any, *, batch_size: int) -> np.ndarray:
    """``rewards[:, (chosen, rejected)]`` of every pair of a tokenised data set, in data-set order.

    Pairs are batched by length (less padding); each batch is one forward over chosen and rejected together.
    """
    collate = RewardDataCollatorWithPadding(tokenizer)
    lengths = [max(len(c), len(r)) for c, r in zip(data["input_ids_chosen"], data["input_ids_rejected"])]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    device = next(model.parameters()).device
    rewards = np.empty((len(order), 2), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([data[i] for i in idx])
        ids = torch.cat([batch["input_ids_chosen"], batch["input_ids_rejected"]]).to(device)
        mask = torch.cat([batch["attention_mask_chosen"], batch["attention_mask_rejected"]]).to(device)
        with torch.no_grad():
            out = forward_rewards(model, ids, mask).float().cpu().numpy()
        rewards[idx, 0], rewards[idx, 1] = out[: len(idx)], out[len(idx) :]
    return rewards


def score_groups(model: torch.nn.Module, tokenizer: Any, config: StreamConfig) -> tuple[EvalRows, Any]:
    """Every group of ``config``'s files scored in packed shared-prefix forwards (the prompt once, each response
    once), as the trainer's evaluation scores them: the pairs (preference edges), groups and tie edges, and the
    stream's counts."""
    if not use_packed_attention(base_model(model)):
        raise ValueError("--groups needs a decoder model on 'sdpa' attention (rm_scale's packed attention); score "
                         "this model's rows as pairs (without --groups).")
    device = next(model.parameters()).device
    stream, rows = PairStream(config, tokenizer, rank=0, world_size=1), EvalRows()
    for batch in stream:
        batch.pop("_state", None)
        subsets = batch.pop("_subsets", None)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            out = forward_batch(model, inputs)
        rows.add(out.rewards, out.chosen, out.rejected, {**batch, "_subsets": subsets})
    return rows, stream.stats


def summarize(rewards: np.ndarray, subsets: Sequence[Any] | None) -> dict[str, Any]:
    """`compute_reward_metrics` over all pairs (accuracy with ties as half, margin, reward mean/std), and per subset."""
    def metrics(preds: np.ndarray) -> dict[str, float]:
        return compute_reward_metrics(EvalPrediction(predictions=preds, label_ids=None))

    out: dict[str, Any] = {"pairs": len(rewards), **metrics(rewards)}
    if subsets is not None:
        names = np.asarray([str(s) for s in subsets])
        out["subsets"] = {
            name: {"pairs": int((names == name).sum()), "accuracy": metrics(rewards[names == name])["accuracy"]}
            for name in sorted(set(names.tolist()))
        }
    return out


def accuracy_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """Train accuracy (logged per logging step) and eval accuracy per step from a run's metrics.jsonl."""
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if "eval_accuracy" in row:
            curves["eval"].append((row["step"], row["eval_accuracy"]))
        elif "accuracy" in row:
            curves["train"].append((row["step"], row["accuracy"]))
    return curves


def write_plot(path: Path, rewards: np.ndarray, curves: dict[str, list[tuple[int, float]]] | None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no pyplot global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11 if curves else 6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if curves else 1, 1)
    bins = np.histogram_bin_edges(rewards, bins=min(50, max(10, int(math.sqrt(rewards.size)))))
    ax.hist(rewards[:, 0], bins=bins, alpha=0.6, label=f"chosen (mean {rewards[:, 0].mean():.3f})")
    ax.hist(rewards[:, 1], bins=bins, alpha=0.6, label=f"rejected (mean {rewards[:, 1].mean():.3f})")
    ax.set(xlabel="reward", ylabel="pairs", title=f"Rewards on {len(rewards)} pairs")
    ax.legend()
    if curves:
        ax = fig.add_subplot(1, 2, 2)
        for name, style in (("train", "-"), ("eval", "o-")):
            if curves[name]:
                steps, acc = zip(*sorted(curves[name]))
                ax.plot(steps, acc, style, label=name)
        ax.set(xlabel="step", ylabel="accuracy", title="Pairwise accuracy during training", ylim=(0, 1.05))
        ax.legend()
    fig.savefig(path, dpi=100)


def run_eval(model_dir: str, data_files: Sequence[str], *, as_json: bool = False, **kwargs: Any) -> int:
    """The `rm-scale eval` command: `evaluate_model`, printed as text or as one JSON object."""
    # Libraries print on import (transformers: "[INFO] Running in WANDB offline mode"): keep stdout for the result.
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate_model(model_dir, data_files, **kwargs)
    print(json.dumps(result) if as_json else _text(result))
    return 0


def evaluate_model(
    model_dir: str,
    data_files: Sequence[Any],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    plot_path: str | None = None,
    dtype: str = "float32",
    data_format: str | None = None,
    groups: bool = False,
    tie_strength: float | None = None,
) -> dict[str, Any]:
    """Score ``model_dir`` on ``data_files`` (read as training reads them: formats, ``data_format`` preset, bad rows
    skipped and counted); returns the summary (see `summarize`) and writes the PNG. ``groups``: each multi-response
    row as one group (README, 'K responses per prompt'): accuracy over its edges, plus best-of-K and ties
    (`tie_strength`: the tie model's nu, for tie accuracy)."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"--model {model_dir!r} is not a folder (expected <output_dir>/final or an adapter folder).")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}.")
    model, tokenizer = load_scoring_model(model_dir, dtype=dtype)
    specs = [{"path": f, "format": data_format} if data_format else f for f in data_files]
    rewards, subsets, stats, extra = _score(model, tokenizer, parse_sources(specs), batch_size=batch_size,
                                            max_length=max_length, groups=groups, tie_strength=tie_strength)
    if not len(rewards):
        raise ValueError(f"No usable preference pair in {', '.join(map(str, data_files))}: skipped {stats.dropped}.")
    result: dict[str, Any] = {"model": model_dir, "data": list(data_files), "dropped": sum(stats.dropped.values()),
                              "dropped_by_reason": stats.dropped}
    result.update(summarize(rewards, subsets))
    result.update(extra)
    saved = read_reward_stats(model_dir)
    if saved:
        result["saved_stats"] = saved
    plot = Path(plot_path) if plot_path else Path(model_dir) / PLOT_NAME
    metrics_file = Path(model_dir).resolve().parent / "metrics.jsonl"
    write_plot(plot, rewards, accuracy_curves(metrics_file) if metrics_file.exists() else None)
    result["plot"] = str(plot)
    return result


def _score(model: torch.nn.Module, tokenizer: Any, sources: list[Any], *, batch_size: int, max_length: int | None,
           groups: bool, tie_strength: float | None) -> tuple[np.ndarray, Any, Any, dict[str, float]]:
    """(rewards[:, (chosen, rejected)], subsets or None, stream counts, group metrics) of the files' pairs, or of
    their groups' preference edges."""
    if not groups:
        data, stats = materialize_pairs(StreamConfig(sources=sources, pairs_per_batch=1, max_length=max_length,
                                                     read_once=True), tokenizer)
        subsets = data["subset"] if "subset" in data.column_names else None
        return score_pairs(model, tokenizer, data, batch_size=batch_size), subsets, stats, {}
    config = StreamConfig(sources=sources, pairs_per_batch=batch_size, max_length=max_length, batching="packed",
                          token_budget=GROUP_BATCH_TOKENS, shared_prefix=True, response_groups=True, keep_ties=True,
                          read_once=True)
    rows, stats = score_groups(model, tokenizer, config)
    rewards = np.array([rows.chosen, rows.rejected], dtype=np.float64).T.reshape(-1, 2)
    subsets = rows.subset if any(s is not None for s in rows.subset) else None
    return rewards, subsets, stats, group_set_metrics(rows.groups, rows.ties, prefix="", tie_strength=tie_strength)


def _text(r: dict[str, Any]) -> str:
    lines = [
        f"model     {r['model']}",
        f"pairs     {r['pairs']}" + (f" ({r['dropped']} dropped: {r['dropped_by_reason']})" if r["dropped"] else ""),
        f"accuracy  {r['accuracy']:.4f}  (ties count half)",
        f"margin    {r['margin']:.4f}",
        f"rewards   mean {r['rewards_mean']:.4f}  std {r['rewards_std']:.4f}  "
        f"(chosen {r['rewards_chosen_mean']:.4f}, rejected {r['rewards_rejected_mean']:.4f})",
    ]
    if "best_of_k_accuracy" in r:
        lines.append(f"best-of-K {r['best_of_k_accuracy']:.4f}  ({int(r['groups_ranked'])} groups with one best "
                     "response)")
    if "ties" in r:
        lines.append(f"ties      {int(r['ties'])}, mean |gap| {r['tie_gap']:.4f}"
                     + (f", tie accuracy {r['tie_accuracy']:.4f}" if "tie_accuracy" in r else ""))
    if "subsets" in r:
        width = max(len(n) for n in r["subsets"])
        lines.append(f"{'subset':<{width}}  pairs  accuracy")
        lines += [f"{n:<{width}}  {s['pairs']:>5}  {s['accuracy']:.4f}" for n, s in r["subsets"].items()]
    lines.append(f"plot      {r['plot']}")
    return "\n".join(lines)
