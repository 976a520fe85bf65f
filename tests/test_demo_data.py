"""The demo pairs (rm_scale/data/demo_data): the shipped files are the generator's output, and the preferences are
properties to learn: subsets present, sides of balanced length, no side picked by length, eval topics disjoint. The
ties are equally right answers, read as tie edges by the recipe's sources, with held-out topics."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from rm_scale.data.demo_data import make
from rm_scale.data.stream import PairStream, StreamConfig, materialize_pairs
from rm_scale.data.sources import parse_sources

HERE = Path(make.__file__).parent


def _shipped(split: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (HERE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def splits():
    return {split: _shipped(split) for split in ("train", "eval")}


def test_shipped_files_are_the_generators_output():
    for name, rows in make.outputs().items():
        shipped = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines()]
        assert shipped == rows, f"{name}: rerun python -m {make.__name__}"


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


def _ties(split: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / f"ties_{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_ties_are_equally_right_answers_worded_differently():
    for split in ("train", "eval"):
        rows = _ties(split)
        assert Counter(r["subset"] for r in rows) == {s: make.TIES_PER_SUBSET[split] for s in make.TIE_SUBSETS}
        for r in rows:
            assert r["score_chosen"] == r["score_rejected"] and r["chosen"] != r["rejected"], r
            if r["subset"] == "units":  # the right amount on both sides: n x the unit's own factor
                n, factor = next((int(re.search(rf"(\d+) {a}\b", r["prompt"]).group(1)), f) for a, b, f in make.UNITS
                                 if re.search(rf"\d+ {a}\b", r["prompt"]) and re.search(rf"\b{b}\b", r["prompt"]))
                right = n * factor
                assert all(re.findall(r"\d+", side)[-1] == str(right) for side in (r["chosen"], r["rejected"])), r
            else:  # consistent: every slot value either side names is the one the user stated
                said = {w for w in re.findall(r"[A-Za-z]+", r["prompt"]) if any(w in v for v in make.SLOTS.values())}
                for side in (r["chosen"], r["rejected"]):
                    named = {w for w in re.findall(r"[A-Za-z]+", side) if any(w in v for v in make.SLOTS.values())}
                    assert named and named <= said, (side, said)
        longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows if r["subset"] == "consistency")
        assert 0.25 <= longer / make.TIES_PER_SUBSET[split] <= 0.75  # the full answer on either side


def test_tie_topics_are_held_out_from_training():
    for subset in make.TIE_SUBSETS:
        topics = {split: {_topic(r) for r in _ties(split) if r["subset"] == subset} for split in ("train", "eval")}
        assert topics["eval"] and not topics["eval"] & topics["train"], (subset, topics)


@pytest.fixture(scope="module")
def recipe():
    return yaml.safe_load((HERE.parents[2] / "recipes" / "demo.yaml").read_text())


def test_recipe_reads_ties_as_tie_edges_rendered_as_the_pairs_are(recipe, tiny_dir):
    """Through the recipe's own sources (ultrafeedback_binarized's columns), each tie row is a group with one tie
    edge, its text joined to the prompt as the TRL-format pairs are; the pairs stay preference edges."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert recipe["train"]["ties"] == "tie_model" and recipe["train"]["tie_strength"] > 1
    config = StreamConfig(sources=parse_sources(recipe["data"]["eval"]), pairs_per_batch=64, batching="packed",
                          token_budget=8192, shared_prefix=True, response_groups=True, keep_ties=True,
                          max_length=None, read_once=True)
    edges, stream = Counter(), PairStream(config, tok, rank=0, world_size=1)
    def read(text):  # the text as the tokeniser gives it back (the tiny one spaces its word pieces)
        return tok.decode(tok(text).input_ids, skip_special_tokens=True)

    expected = {(read(r["prompt"] + r["chosen"]), read(r["prompt"] + r["rejected"])): 1 for r in _ties("eval")}
    expected.update({(read(r["prompt"] + r["chosen"]), read(r["prompt"] + r["rejected"])): 0
                     for r in _shipped("eval")})
    for batch in stream:
        for i, j, tie in zip(batch["edge_better"].tolist(), batch["edge_worse"].tolist(), batch["edge_tie"].tolist()):
            texts = [tok.decode(_sequence_ids(batch, k), skip_special_tokens=True) for k in (i, j)]
            key = tuple(texts) if tuple(texts) in expected else tuple(reversed(texts))
            assert expected.pop(key) == tie, (texts, tie)  # each row once, a tie only where the scores are equal
            edges[tie] += 1
    assert not expected and edges == {0: len(_shipped("eval")), 1: len(_ties("eval"))}


def _sequence_ids(batch, k):
    """Response ``k``'s whole sequence (its group's prompt, then itself) read back from the packed row."""
    from rm_scale.train.stream_eval import _span_ids  # the helper the evaluation decodes sample tables with

    return _span_ids(batch["packed_input_ids"], batch["response_index"][k], batch["response_span"][k])


def test_ties_are_counted_not_trained_without_the_tie_model(recipe, tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    sources = parse_sources(recipe["data"]["eval"])
    data, stats = materialize_pairs(StreamConfig(sources=sources, pairs_per_batch=1, max_length=None,
                                                 read_once=True), tok)
    assert len(data) == len(_shipped("eval")) and stats.dropped == {"tie": len(_ties("eval"))}


def test_demo_fails_loudly_when_preferences_or_ties_are_not_learned(tmp_path):
    from rm_scale.commands.demo import MIN_ACCURACY, _not_learned, summary

    learned = {"pairs": 128, "accuracy": 0.83, "margin": 2.55, "ties": 24.0, "tie_gap": 0.25, "tie_accuracy": 1.0,
               "subsets": {"units": {"accuracy": 0.81, "pairs": 32}}, "plot": str(tmp_path / "p.png")}
    assert _not_learned(0.83, learned) is None
    assert "did not learn the preferences" in _not_learned(MIN_ACCURACY - 0.01, learned)
    # an untrained model: every reward alike, so every tie "scored as a tie" and no margin
    assert "tie model" in _not_learned(0.83, {**learned, "margin": 0.0, "tie_gap": 0.007})
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"pairs_per_s": 2.2, "padding_efficiency": 1.0,
                                                        "prefix_sharing": 1.5}) + "\n")
    text = summary(tmp_path, {"eval_accuracy": 0.83}, learned, [("units", "User: Q\nAssistant:", [("A.", 1.5)])])
    assert "held-out ties       1.000 of 24" in text and "against 2.55" in text and "2.20 pairs/s" in text
