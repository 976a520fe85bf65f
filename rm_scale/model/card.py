"""The model card (README.md) of an exported reward model: what it was trained from and how, how well it did, and
how to load and score with it."""

from __future__ import annotations

import json
import os
from typing import Any

CARD = "README.md"


def model_card(*, base_model: str, data: list[str], hyperparameters: dict[str, Any], metrics: dict[str, Any],
               adapter: bool, model_name: str | None = None, tags: list[str] = ()) -> str:
    """The card's Markdown: a YAML header (base model, tags), data, hyper-parameters, final evaluation, usage."""
    tags = list(dict.fromkeys(["reward-model", "rm_scale", *tags]))
    header = ["---", f"base_model: {json.dumps(base_model)}", "library_name: transformers" if not adapter else
              "library_name: peft", "pipeline_tag: text-classification", "tags:",
              *(f"- {json.dumps(t)}" for t in tags), "---"]
    lines = [*header, "", f"# {model_name or 'Reward model'}", "",
             f"A pairwise (Bradley-Terry) reward model trained from `{base_model}` "
             "with rm_scale (a ZeRO-3-aware reward trainer with TRL's RewardTrainer API).", ""]
    lines += ["## Data", ""] + [f"- `{d}`" for d in data or ["(in-memory data set)"]] + [""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyperparameters.items()] + [""]
    if metrics:
        lines += ["## Final evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines += [""]
    lines += ["## Use", "", "```python", _usage(adapter), "```", "",
              "The reward is the score head's output at the last real token (the rightmost attention-mask 1). "
              "`rm_scale_reward_mean` / `rm_scale_reward_std` (config.json, or reward_stats.json beside an adapter) "
              "normalise rewards: `(r - mean) / std`. Score preference files with `rm-scale eval --model <this "
              "folder> --data pairs.jsonl`.", ""]
    return "\n".join(lines)


def _usage(adapter: bool) -> str:
    load = ("from peft import AutoPeftModelForSequenceClassification\n"
            "model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1)") if adapter else (
            "from transformers import AutoModelForSequenceClassification\n"
            "model = AutoModelForSequenceClassification.from_pretrained(path)")
    return (f"import torch\nfrom transformers import AutoTokenizer\n{load}\ntokenizer = AutoTokenizer.from_pretrained(path)\n"
            "messages = [{\"role\": \"user\", \"content\": \"How do I cook rice?\"},\n"
            "            {\"role\": \"assistant\", \"content\": \"Rinse it, then simmer it covered for 15 minutes.\"}]\n"
            "ids = tokenizer.apply_chat_template(messages, return_tensors=\"pt\", return_dict=True)\n"
            "with torch.no_grad():\n    reward = model(**ids).logits[0, 0].item()")


def write_model_card(folder: str, **kwargs: Any) -> str:
    path = os.path.join(folder, CARD)
    with open(path, "w") as f:
        f.write(model_card(**kwargs))
    return path
