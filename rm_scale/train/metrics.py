"""What a reward-model run reports: training metrics as device-side sums reduced across ranks once per logging step
(never a mean of per-rank means), and evaluation metrics from the rewards the evaluation loop gathered.

Accuracy counts ties as half a correct pair everywhere (`rm_scale.loss.correct_pairs`).
"""

from __future__ import annotations

import resource
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers.trainer_utils import EvalPrediction

from rm_scale.distributed import all_reduce_max, all_reduce_sum
from rm_scale.loss import PairLossSums, best_of_k_correct, bradley_terry_sums, correct_pairs, total_loss

# Training reward histogram: fixed bins (so counts from ranks and steps simply add), plus under- and overflow.
HIST_EDGES = [x / 2 for x in range(-16, 17)]  # -8.0 .. 8.0 by 0.5

# Order of the per-step metric sums kept on device and reduced once per logging step.
SUM_KEYS = ("pairs", "bt", "center", "correct", "margin", "chosen", "chosen_sq", "rejected", "rejected_sq",
            "real_tokens", "padded_tokens", "pair_tokens", "objective", "units")


class EvalRewards(NamedTuple):
    """What the latest evaluation loop saw: its metric prefix, its data set and ``rewards[:, (chosen, rejected)]``."""

    prefix: str
    dataset: Any
    rewards: np.ndarray | None


def pairwise_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Share of pairs whose chosen reward is higher; a tie counts half."""
    diff = torch.from_numpy(np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64))
    return float(correct_pairs(diff)) / max(diff.numel(), 1)


def compute_reward_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Accuracy (ties count half), mean margin and reward statistics from ``predictions[:, (chosen, rejected)]``."""
    preds = np.asarray(eval_pred.predictions, dtype=np.float64)
    chosen, rejected = preds[:, 0], preds[:, 1]
    both = np.concatenate([chosen, rejected])
    return {
        "accuracy": pairwise_accuracy(chosen, rejected),
        "margin": float((chosen - rejected).mean()),
        "rewards_chosen_mean": float(chosen.mean()),
        "rewards_rejected_mean": float(rejected.mean()),
        "rewards_mean": float(both.mean()),
        "rewards_std": float(both.std()),
        # TRL's names (a TRL user's metric_for_best_model / dashboards): over chosen and rejected rewards alike
        "min_reward": float(both.min()),
        "mean_reward": float(both.mean()),
        "max_reward": float(both.max()),
    }


def pair_set_metrics(rewards: np.ndarray, margin: np.ndarray, subsets: list[str | None], *, prefix: str,
                     center_coef: float | None) -> dict[str, float]:
    """The evaluation metrics of a whole set of pairs, as the map-style evaluation computes them: ``<prefix>_loss``
    (the mean per-pair loss), accuracy, margin, reward statistics, per-subset accuracy and ``<prefix>_pairs``."""
    if rewards.shape[0] == 0:
        raise ValueError("The evaluation files hold no usable pair (every row was skipped): see data_report.json.")
    chosen, rejected = torch.from_numpy(rewards[:, 0]), torch.from_numpy(rewards[:, 1])
    sums = bradley_terry_sums(chosen, rejected, margin=torch.from_numpy(margin))
    loss = float(total_loss(sums, num_pairs=sums.num_pairs, center_coef=center_coef))
    out = {f"{prefix}_loss": loss, f"{prefix}_pairs": float(rewards.shape[0])}
    out.update({f"{prefix}_{k}": v for k, v in compute_reward_metrics(EvalPrediction(rewards, None)).items()})
    return {**out, **_accuracy_by_subset(rewards, subsets, prefix)}


def group_set_metrics(groups: list[tuple[list[float], list[int], Any]], ties: list[tuple[float, Any]], *,
                      prefix: str, tie_strength: float | None) -> dict[str, float]:
    """Evaluation metrics of response groups beyond their edges' pairwise accuracy: ``<prefix>_best_of_k_accuracy``
    (groups whose one best response, tier 0 alone, scores above all the others; a shared top reward counts
    1 / sharers), overall and per subset, over ``<prefix>_groups_ranked`` such groups; ``<prefix>_ties`` and, with the
    tie model's ``tie_strength`` nu, ``<prefix>_tie_accuracy``: tie edges where a tie is the most likely of Davidson's
    three outcomes (|gap| < 2 ln nu), and ``<prefix>_tie_gap``: their mean |reward gap|."""
    out: dict[str, float] = {}
    pre = f"{prefix}_" if prefix else ""
    if groups:
        rewards = torch.tensor([r for g in groups for r in g[0]], dtype=torch.float64)
        tier = torch.tensor([t for g in groups for t in g[1]], dtype=torch.long)
        which = torch.tensor([n for n, g in enumerate(groups) for _ in g[0]], dtype=torch.long)
        for name in [None, *sorted({g[2] for g in groups if g[2] is not None})]:
            keep = torch.ones_like(which, dtype=torch.bool) if name is None else torch.tensor(
                [groups[n][2] == name for n in which.tolist()])
            won, scored = best_of_k_correct(rewards[keep], which[keep], tier[keep])
            if scored:
                out[f"{pre}best_of_k_accuracy" + ("" if name is None else f"_{name}")] = float(won) / scored
                if name is None:
                    out[f"{pre}groups_ranked"] = float(scored)
    if ties:
        gaps = np.array([gap for gap, _ in ties], dtype=np.float64)
        out[f"{pre}ties"] = float(len(gaps))
        out[f"{pre}tie_gap"] = float(gaps.mean())
        if tie_strength is not None:
            out[f"{pre}tie_accuracy"] = float((gaps < 2 * np.log(tie_strength)).mean())
    return out


def _accuracy_by_subset(rewards: np.ndarray, subsets: list[Any], prefix: str) -> dict[str, float]:
    """`<prefix>_accuracy_<subset>` over the rows of ``rewards[:, (chosen, rejected)]`` of each subset."""
    out = {}
    for name in sorted({s for s in subsets if s is not None}):
        rows = [i for i, s in enumerate(subsets) if s == name]
        out[f"{prefix}_accuracy_{name}"] = pairwise_accuracy(rewards[rows, 0], rewards[rows, 1])
    return out


def subset_accuracy(ev: EvalRewards) -> dict[str, float]:
    """`<prefix>_accuracy_<subset>` for each value of a `subset` column (ties count half)."""
    columns = getattr(ev.dataset, "column_names", None) or []
    if ev.rewards is None or "subset" not in columns:
        return {}
    subsets = ev.dataset["subset"]
    if len(subsets) != len(ev.rewards):
        return {}
    return _accuracy_by_subset(np.asarray(ev.rewards, dtype=np.float64), subsets, ev.prefix)


def histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts per HIST_EDGES bin, with under- and overflow bins: device-side, no host sync."""
    edges = torch.tensor(HIST_EDGES, device=values.device, dtype=values.dtype)
    index = torch.bucketize(values, edges, right=True)  # 0: below the first edge; len(edges): at or above the last
    return torch.bincount(index, minlength=len(HIST_EDGES) + 1).float()


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def pair_metrics(s: dict[str, float], center_coef: float | None) -> dict[str, float]:
    """Means over the pairs of a logging window from its summed records."""
    n = max(s["pairs"], 1.0)
    out = {
        "loss_bt": s["bt"] / n,
        "accuracy": s["correct"] / n,
        "margin": s["margin"] / n,
        "rewards_chosen_mean": s["chosen"] / n,
        "rewards_rejected_mean": s["rejected"] / n,
        "rewards_chosen_std": max(s["chosen_sq"] / n - (s["chosen"] / n) ** 2, 0.0) ** 0.5,
        "rewards_rejected_std": max(s["rejected_sq"] / n - (s["rejected"] / n) ** 2, 0.0) ** 0.5,
        "pairs": s["pairs"],
    }
    if center_coef:
        out["loss_center"] = s["center"] / n
    # the objective as trained: Bradley-Terry over pairs (or the groups' loss, over their edges or groups)
    units = max(s["units"], 1.0)
    out["loss_exact"] = (s["objective"] + (center_coef or 0.0) * s["center"]) / units
    return out


class TrainMetrics:
    """The training metrics of one logging window, kept as (sum, count) records and reduced once per log.

    - pair records (`add_pairs`): device tensors, no host sync per micro-step;
    - rank balance (`add_balance`): each step's mean and busiest rank's computed tokens, from the step's all-gather;
    - whole-step terms (`add_terms`): host numbers, once per optimizer step.
    `reduce` is a collective: every rank calls it at the same logging step.
    """

    def __init__(self, *, center_coef: float | None) -> None:
        self.center_coef = center_coef
        self._sums: torch.Tensor | None = None
        self._extremes: torch.Tensor | None = None  # (max reward, -min reward): reduced with a max
        self._tokens_seen = 0.0  # the pairs' tokens trained on by all ranks since this process started (TRL's too)
        self._balance: torch.Tensor | None = None
        self._terms: dict[str, float] = {}
        self._terms_step = -1
        self._last_log_time: float | None = None

    def add_pairs(self, sums: PairLossSums, chosen: torch.Tensor, rejected: torch.Tensor, tokens: torch.Tensor, *,
                  objective: torch.Tensor | None = None, units: int | None = None) -> None:
        """One micro-batch's pairs; ``objective`` / ``units``: the loss it trains and its divisor share when that
        is not the pairs' Bradley-Terry sum (response groups)."""
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        objective = sums.bt if objective is None else objective
        units = sums.num_pairs if units is None else units
        step = torch.stack([
            torch.tensor(float(sums.num_pairs), device=chosen.device),
            sums.bt.detach().float(), sums.center.detach().float(), sums.correct.float(), sums.margin.float(),
            chosen.sum(), (chosen**2).sum(), rejected.sum(), (rejected**2).sum(),
            tokens[0].float().to(chosen.device), tokens[1].float().to(chosen.device),
            tokens[2].float().to(chosen.device), objective.detach().float(),
            torch.tensor(float(units), device=chosen.device),
        ])
        step = torch.cat([step, histogram(chosen), histogram(rejected)])
        self._sums = step if self._sums is None else self._sums + step
        both = torch.cat([chosen.reshape(-1), rejected.reshape(-1)])
        if both.numel():
            extremes = torch.stack([both.max(), -both.min()])
            self._extremes = extremes if self._extremes is None else torch.maximum(self._extremes, extremes)

    def add_balance(self, rank_tokens: torch.Tensor) -> None:
        """``rank_tokens``: every rank's computed tokens of one step (the same tensor on every rank)."""
        balance = torch.stack([rank_tokens.mean(), rank_tokens.max()])  # device-side: no host sync here
        self._balance = balance if self._balance is None else self._balance + balance

    def add_terms(self, step: int, values: dict[str, float], total: float) -> None:
        """The whole-step terms of optimizer step ``step``; later calls in the same step are ignored."""
        if self._terms_step == step:
            return
        self._terms_step = step
        for key, value in values.items():
            self._terms[key] = self._terms.get(key, 0.0) + value
        self._terms["steps"] = self._terms.get("steps", 0.0) + 1
        self._terms["total"] = self._terms.get("total", 0.0) + total

    def reduce(self, device: torch.device, *, world_size: int) -> tuple[dict[str, float], dict[str, Any]]:
        """(metrics, reward histogram) of the window since the last call, over all ranks; starts a new window."""
        width = len(SUM_KEYS) + 2 * (len(HIST_EDGES) + 1)
        sums = self._sums if self._sums is not None else torch.zeros(width, device=device)
        sums = all_reduce_sum(sums).tolist()
        totals = dict(zip(SUM_KEYS, sums))
        bins = len(HIST_EDGES) + 1
        hist = {"edges": HIST_EDGES, "chosen": sums[len(SUM_KEYS):][:bins], "rejected": sums[-bins:]}
        # one max-reduction for the window's reward extremes and the peak memory; -inf where a rank had no pair in the
        # window, so the others' extremes win
        extremes = self._extremes if self._extremes is not None else torch.full((2,), -float("inf"), device=device)
        peak = torch.tensor([peak_memory_gb(device)], device=extremes.device, dtype=extremes.dtype)
        top, neg_low, peak_gb = all_reduce_max(torch.cat([extremes, peak])).tolist()
        logs = pair_metrics(totals, self.center_coef)
        logs.update(self._trl_names(totals, top=top, low=-neg_low))
        if self._terms:
            steps = self._terms.pop("steps")
            logs["loss_exact"] += self._terms.pop("total") / steps
            logs.update({k: v / steps for k, v in self._terms.items()})
        logs.update(self._throughput(totals, peak_gb=peak_gb, world_size=world_size))
        self._sums, self._extremes, self._balance, self._terms = None, None, None, {}
        return logs, hist

    def _trl_names(self, totals: dict[str, float], *, top: float, low: float) -> dict[str, float]:
        """TRL's min_reward / mean_reward / max_reward (over chosen and rejected rewards of the window, all ranks: true
        extremes and mean, not means of per-batch ones) and num_tokens (the pairs' tokens so far)."""
        self._tokens_seen += totals["pair_tokens"]
        out = {"num_tokens": self._tokens_seen}
        if totals["pairs"]:
            out.update({"min_reward": low, "mean_reward": (totals["chosen"] + totals["rejected"]) /
                        (2 * totals["pairs"]), "max_reward": top})
        return out

    def _throughput(self, totals: dict[str, float], *, peak_gb: float, world_size: int) -> dict[str, float]:
        """Pairs/s and real tokens/s since the last log, padding efficiency, peak memory over ranks, rank balance."""
        now = time.perf_counter()
        last, self._last_log_time = self._last_log_time, now
        # real tokens: those of the pairs' sequences (what an unshared forward computes unpadded); placed: the row
        # positions that hold a token (fewer with a shared prefix); padded: every position computed.
        out = {"padding_efficiency": totals["real_tokens"] / max(totals["padded_tokens"], 1.0),
               "prefix_sharing": totals["pair_tokens"] / max(totals["real_tokens"], 1.0),
               "computed_tokens_per_pair": totals["padded_tokens"] / max(totals["pairs"], 1.0),
               "peak_memory_gb": peak_gb}
        if last is not None:
            out["pairs_per_s"] = totals["pairs"] / (now - last)
            out["tokens_per_s"] = totals["pair_tokens"] / (now - last)
        if self._balance is not None and world_size > 1:
            mean, busiest = self._balance.tolist()  # the same on every rank (from the step's all-gather)
            out["rank_balance"] = mean / max(busiest, 1.0)
        return out
