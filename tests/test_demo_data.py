"""The demo pairs (rm_scale/data/demo_data): the shipped files are the generator's output, and the preferences are
properties to learn: subsets present, sides of balanced length, no side picked by length, eval topics disjoint."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from rm_scale.data.demo_data import make

HERE = Path(make.__file__).parent


def _shipped(split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (HERE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def splits():
    return {split: _shipped(split) for split in ("train", "eval")}


def test_shipped_files_are_the_generators_output(splits):
    for split, seed in (("train", 0), ("eval", 1)):
        assert splits[split] == make.make_pairs(split, seed=seed), f"{split}.jsonl: rerun python -m {make.__name__}"


def test_every_subset_is_present_in_both_splits(splits):
    for split, rows in splits.items():
        assert Counter(r["subset"] for r in rows) == {s: make.PER_SUBSET[split] for s in make.SUBSETS}
        assert len({(r["prompt"], r["chosen"], r["rejected"]) for r in rows}) == len(rows)  # no repeated pair
        assert all(r["chosen"] != r["rejected"] and r["chosen"].strip() and r["rejected"].strip() for r in rows)


def test_length_is_no_cue(splits):
    for subset in make.SUBSETS:
        rows = [r for rows in splits.values() for r in rows if r["subset"] == subset]
        chosen = sum(len(r["chosen"]) for r in rows) / len(rows)
        rejected = sum(len(r["rejected"]) for r in rows) / len(rows)
        assert 0.85 <= chosen / rejected <= 1.15, (subset, chosen, rejected)
        # "prefer the longer side" (ties half) must be near chance in every subset
        longer = sum((len(r["chosen"]) > len(r["rejected"])) + 0.5 * (len(r["chosen"]) == len(r["rejected"]))
                     for r in rows) / len(rows)
        assert 0.3 <= longer <= 0.7, (subset, longer)


def test_instructions_ask_each_instruction_as_often_as_its_opposite(splits):
    rows = [r for r in splits["train"] if r["subset"] == "instructions"]
    for pair in make.INSTRUCTION_PAIRS:
        asked = [sum(text in r["prompt"] for r in rows) for text, _ in pair]
        assert min(asked) >= 0.6 * max(asked) and min(asked) > 0, (pair[0][0], asked)


def _topic(row: dict[str, str]) -> str:
    """Which fact, template or amount of the generator the row is about."""
    prompt, subset = row["prompt"], row["subset"]
    if subset == "instructions":
        return next(f[0] for f in make.FACTS if f[0] in prompt)
    if subset == "consistency":
        return next(q for q, _, _ in make.CONSISTENCY
                    if re.search(re.escape(q).replace(re.escape("{x}"), ".+"), prompt))
    if subset == "units":
        return re.search(r"\d+", prompt).group()
    return prompt


def test_eval_topics_are_disjoint_from_train_topics(splits):
    for subset in make.SUBSETS:
        topics = {split: {_topic(r) for r in rows if r["subset"] == subset} for split, rows in splits.items()}
        assert len(topics["eval"]) >= 3 and len(topics["train"]) > len(topics["eval"]), (subset, topics)
        assert not topics["eval"] & topics["train"], (subset, topics["eval"] & topics["train"])
    facts = {f[0] for f in make.FACTS[-make.EVAL_FACTS:]}
    train_text = " ".join(r["prompt"] for r in splits["train"])
    assert not any(question in train_text for question in facts)  # no held-out fact appears in any train subset
