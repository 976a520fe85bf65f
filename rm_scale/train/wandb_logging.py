"""Weights & Biases for reward-model runs: `RewardWandbCallback`, in place of transformers' `WandbCallback`.

transformers' callback already logs every scalar the trainer logs (loss_exact, accuracy, margin, rewards_*, pairs and
their eval_* twins) and the resolved `RewardConfig` (`args.to_dict()`, tokens masked). This subclass adds:
- the run: name from `run_name`; group from `WANDB_RUN_GROUP`, else the Slurm job (`<SLURM_JOB_NAME>-<job id>`, the
  array job id for array jobs); the same run id when training resumes from a checkpoint. The id is stored in every
  checkpoint (`trainer_state.json`, `stateful_callbacks["rm_scale_wandb"]`) so it travels with the checkpoint, and in
  `<output_dir>/wandb_run_id` for people. An explicit `WANDB_RUN_ID` wins; `WANDB_RESUME` defaults to "allow".
- the recipe (when run from the CLI) next to `RewardConfig` in the run config, with secret-like keys and the values of
  secret-like environment variables (WANDB_API_KEY, HF_TOKEN, ...) redacted.
- at each evaluation: histograms of the chosen and rejected rewards and of the margins, and a table of the first
  `SAMPLE_PAIRS` pairs of the eval set (decoded, truncated) with their rewards. Under ZeRO-3/DDP the rewards are the
  ones transformers' evaluation loop gathered from all ranks.

It replaces transformers' callback instead of running after it because that one calls `wandb.init` in
`on_train_begin` and then reuses the existing run: the id, group and resume mode must be set before it runs.
Only the world-process-zero rank talks to W&B. W&B itself records the command line (`sys.argv`) in the run's
metadata: pass secrets through the environment, never as `--key value` overrides.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sized
from typing import Any

import numpy as np
from transformers.integrations import WandbCallback
from transformers.integrations.integration_utils import rewrite_logs

STATE_KEY = "rm_scale_wandb"
RUN_ID_FILE = "wandb_run_id"
SAMPLE_PAIRS = 8
SAMPLE_CHARS = 300
REDACTED = "<redacted>"
_SECRET_WORDS = {"token", "key", "apikey", "secret", "password", "passwd", "auth", "credential", "credentials"}


class RewardWandbCallback(WandbCallback):
    """transformers' `WandbCallback` plus run id/group/resume, the recipe, reward histograms and sample pairs."""

    def __init__(self, *, recipe: dict[str, Any] | None = None) -> None:
        super().__init__()
        # Set by the trainer after each evaluation loop: (metric prefix, data set, gathered rewards[:, (c, r)]).
        self.last_eval: Any = None
        self.recipe = recipe

    def setup(self, args: Any, state: Any, model: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self._wandb.run is None:
            self._init_run(args, state)
        super().setup(args, state, model, **kwargs)  # reuses our run: adds args.to_dict() and the model config

    def _init_run(self, args: Any, state: Any) -> None:
        stored = (state.stateful_callbacks or {}).get(STATE_KEY) or {}
        run = self._wandb.init(
            project=os.environ.get("WANDB_PROJECT", "huggingface"),
            id=os.environ.get("WANDB_RUN_ID") or stored.get("run_id"),
            resume=os.environ.get("WANDB_RESUME", "allow"),
            name=args.run_name,
            group=run_group(),
            config=redact({"recipe": self.recipe, "world_size": args.world_size}),
        )
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, RUN_ID_FILE), "w") as f:
            f.write(run.id + "\n")

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, model=model, **kwargs)
        if state.is_world_process_zero and self._wandb.run is not None:
            # Saved in every checkpoint's trainer_state.json: a resumed job reads it back in _init_run.
            state.stateful_callbacks[STATE_KEY] = {"run_id": self._wandb.run.id}

    def on_evaluate(self, args: Any, state: Any, control: Any, processing_class: Any = None, **kwargs: Any) -> None:
        last = self.last_eval
        if not state.is_world_process_zero or self._wandb.run is None or last is None:
            return
        rewards = last.rewards
        if not isinstance(rewards, np.ndarray) or rewards.ndim != 2 or rewards.shape[1] != 2:
            return  # prediction_loss_only, batch_eval_metrics or a preprocess_logits_for_metrics changed the shape
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        media: dict[str, Any] = {
            f"{last.prefix}_rewards_chosen_hist": self._wandb.Histogram(chosen),
            f"{last.prefix}_rewards_rejected_hist": self._wandb.Histogram(rejected),
            f"{last.prefix}_margin_hist": self._wandb.Histogram(chosen - rejected),
        }
        if processing_class is not None and isinstance(last.dataset, Sized) and hasattr(last.dataset, "__getitem__"):
            media[f"{last.prefix}_samples"] = self._sample_table(last.dataset, processing_class, chosen, rejected)
        self._wandb.log({**rewrite_logs(media), "train/global_step": state.global_step})

    def _sample_table(self, dataset: Any, tokenizer: Any, chosen: np.ndarray, rejected: np.ndarray) -> Any:
        # The evaluation loop keeps dataset order (sequential sampler; ranks' batches gathered in turn), so row i of
        # the rewards is pair i of the data set.
        rows = []
        for i in range(min(SAMPLE_PAIRS, len(dataset), len(chosen))):
            pair = dataset[i]
            rows.append([
                i,
                _tail(tokenizer.decode(pair["input_ids_chosen"], skip_special_tokens=True)),
                _tail(tokenizer.decode(pair["input_ids_rejected"], skip_special_tokens=True)),
                float(chosen[i]),
                float(rejected[i]),
            ])
        return self._wandb.Table(columns=["pair", "chosen", "rejected", "reward_chosen", "reward_rejected"], data=rows)


def use_reward_wandb_callback(callbacks: list[Any]) -> RewardWandbCallback:
    """Put a `RewardWandbCallback` where transformers' `WandbCallback` is in a trainer's ``callbacks`` list."""
    ours = RewardWandbCallback()
    stock = [i for i, cb in enumerate(callbacks) if type(cb) is WandbCallback]
    if stock:
        callbacks[stock[0]] = ours
    else:
        callbacks.append(ours)
    return ours


def set_wandb_recipe(trainer: Any, recipe: dict[str, Any]) -> None:
    """Log ``recipe`` (model, data, lora, train sections) in the run config; a no-op without W&B."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, RewardWandbCallback):
            cb.recipe = recipe


def run_group() -> str | None:
    """`WANDB_RUN_GROUP`, else the Slurm job (all ranks and requeues of one job share it), else None."""
    group = os.environ.get("WANDB_RUN_GROUP")
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if group or not job:
        return group
    name = os.environ.get("SLURM_JOB_NAME")
    return f"{name}-{job}" if name else job


def is_secret_name(name: str) -> bool:
    parts = re.split(r"[^a-z0-9]+", name.lower())
    return any(p in _SECRET_WORDS or p.endswith(("token", "apikey", "secret", "password")) for p in parts)


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """Copy of ``obj`` with secret-like keys masked and secret env values (len >= 8) cut out of every string."""
    if secrets is None:
        secrets = [v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8]
    if isinstance(obj, dict):
        return {
            k: REDACTED if is_secret_name(str(k)) and v is not None else redact(v, secrets) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
    return obj


def _tail(text: str) -> str:
    # The responses differ at the end of the sequence: keep the end.
    return text if len(text) <= SAMPLE_CHARS else "…" + text[-SAMPLE_CHARS:]
