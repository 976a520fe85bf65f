"""K-response groups from rows in the public sets' published schemas (rm_scale.data.groups): every response once,
every edge with its direction and ties asserted (a reversed label fails), ranking tiers, bad responses counted, and
the token ids of the training path."""

import json
from pathlib import Path

import pytest

from rm_scale.data.formats import tokenize_canonical
from rm_scale.data.groups import ranking_tiers, to_group, tokenize_group
from rm_scale.data.mapping import parse_mapping
from rm_scale.data.pairs import GROUP, to_pairs
from rm_scale.data.presets import PRESETS
from rm_scale.data.sources import BadRow

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _preset(name):
    spec = PRESETS[name]
    return parse_mapping(spec["columns"], spec.get("where"))


def _texts(group):
    return [r if isinstance(r, str) else r[-1]["content"] for r in group["responses"]]


def _decoded(group):
    """(better, worse, tie) as texts: what a reversed label would flip."""
    texts = _texts(group)
    return [(texts[i], texts[j], tie) for i, j, tie in group["edges"]]


def test_ultrafeedback_four_scored_completions_are_one_group_with_a_tie():
    def completion(text, score):
        return {"annotations": {}, "critique": "c", "custom_system_prompt": "s", "fine-grained_score": 4.0,
                "model": "m", "overall_score": score, "principle": "helpfulness", "response": text}

    row = {"source": "evol_instruct", "instruction": "Name a prime number.", "models": ["a", "b", "c", "d"],
           "completions": [completion("2", 8.0), completion("4", 3.0), completion("Two.", 8.0),
                           completion("Nine.", 6.0)], "correct_answers": [], "incorrect_answers": []}
    group = to_group(row, _preset("ultrafeedback"))
    assert _texts(group) == ["2", "4", "Two.", "Nine."] and group["subset"] == "evol_instruct"
    assert group["prompt"] == [{"role": "user", "content": "Name a prime number."}]
    assert _decoded(group) == [("2", "4", 0), ("2", "Two.", 1), ("2", "Nine.", 0), ("Two.", "4", 0),
                               ("Nine.", "4", 0), ("Two.", "Nine.", 0)]
    assert ranking_tiers(4, group["edges"]) == [0, 2, 0, 1]


def test_nectar_ranks_lower_is_better():
    row = {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant: ",
           "answers": [{"answer": "Paris.", "model": "gpt-4", "rank": 1.0},
                       {"answer": "Lyon.", "model": "llama", "rank": 3.0},
                       {"answer": "Paris, France.", "model": "gpt-3.5", "rank": 2.0}],
           "turns": 1, "num_responses": 3, "source": ["sharegpt"], "good_natured": True}
    group = to_group(row, _preset("nectar"))
    assert group["prompt"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert _decoded(group) == [("Paris.", "Lyon.", 0), ("Paris.", "Paris, France.", 0),
                               ("Paris, France.", "Lyon.", 0)]
    assert ranking_tiers(3, group["edges"]) == [0, 2, 1]


def test_helpsteer2_rating_rows_of_a_prompt_are_one_group():
    def row(response, helpfulness):
        return {"prompt": "c#", "response": response, "helpfulness": helpfulness, "correctness": 3,
                "coherence": 4, "complexity": 2, "verbosity": 1}

    record = {GROUP: [row("C# is a language from Microsoft.", 3), row("A note.", 1), row("C sharp.", 3)]}
    group = to_group(record, _preset("helpsteer2"))
    assert _decoded(group) == [("C# is a language from Microsoft.", "A note.", 0),
                               ("C# is a language from Microsoft.", "C sharp.", 1), ("C sharp.", "A note.", 0)]
    assert ranking_tiers(3, group["edges"]) == [0, 1, 0]


def test_pku_saferlhf_and_trl_pairs_are_groups_of_two():
    row = {"prompt": "How do I pick a lock?", "response_0": "I can't help.", "response_1": "Call a locksmith.",
           "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 1, "safer_response_id": 0}
    assert _decoded(to_group(row, _preset("pku_saferlhf"))) == [("Call a locksmith.", "I can't help.", 0)]
    assert _decoded(to_group(row, _preset("pku_saferlhf_safer"))) == [("I can't help.", "Call a locksmith.", 0)]
    trl = {"prompt": "Q: ", "chosen": "good", "rejected": "bad", "margin": 0.5, "subset": "s"}
    group = to_group(trl, parse_mapping(None))
    assert group == {"prompt": "Q: ", "responses": ["good", "bad"], "edges": [[0, 1, 0]], "margin": 0.5,
                     "subset": "s"}


def test_ultrafeedback_binarized_equal_scores_are_a_tie_edge_and_a_dropped_pair():
    def row(good, bad):
        chat = [{"role": "user", "content": "Say hi."}]
        return {"prompt": "Say hi.", "prompt_id": "p0", "messages": chat + [{"role": "assistant", "content": "Hi!"}],
                "chosen": chat + [{"role": "assistant", "content": "Hi!"}],
                "rejected": chat + [{"role": "assistant", "content": "Hello."}], "score_chosen": good,
                "score_rejected": bad}

    mapping = _preset("ultrafeedback_binarized")
    assert _decoded(to_group(row(8.0, 8.0), mapping)) == [("Hi!", "Hello.", 1)]
    assert _decoded(to_group(row(8.0, 6.5), mapping)) == [("Hi!", "Hello.", 0)]
    assert [p.get("drop") for p in to_pairs(row(8.0, 8.0), mapping)] == ["tie"]  # the pair path: counted, not read
    assert "drop" in to_group(row(6.0, 8.0), mapping)  # chosen scored below rejected stays a bad row


@pytest.mark.skipif(not (SHARED / "finegrained-qa-feedback").exists(), reason="../shared/data is absent")
def test_finegrained_rows_as_published_keep_all_four_answers_and_their_ties():
    rows = json.loads((SHARED / "finegrained-qa-feedback" / "dev_feedback.json").read_text())[:50]
    mapping = parse_mapping(None)
    for row in rows:
        group = to_group(row, mapping)
        pairs = [p for p in to_pairs(row, mapping) if "drop" not in p]
        if "drop" in group:
            assert not pairs
            continue
        # the group's preference edges are exactly the pairs the pair path makes, its tie edges its dropped ties
        assert [(b, w) for b, w, tie in _decoded(group) if not tie] == [
            (p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs]
        assert sum(tie for *_, tie in group["edges"]) == sum(
            1 for p in to_pairs(row, mapping) if p.get("drop") == "tie")
        left_out = group.get("left_out", {})
        assert len(group["responses"]) == 4 - left_out.get("empty field", 0)
        if not left_out:
            assert len(group["edges"]) == 6  # one per label of the pairs 1v2 .. 3v4


def test_bad_responses_are_left_out_and_counted_and_bad_groups_dropped():
    mapping = parse_mapping({"prompt": "q", "responses": "answers", "scores": "scores"})
    group = to_group({"q": "Q?", "answers": ["a", "", "c", "a"], "scores": [3, 2, 1, 0]}, mapping)
    assert _decoded(group) == [("a", "c", 0), ("c", "a", 0)]  # the empty one is out; the two "a"s share no edge
    assert group["left_out"] == {"empty field": 1, "identical responses": 1}
    assert to_group({"q": "Q?", "answers": ["a", " "], "scores": [1, 0]}, mapping)["drop"] == "fewer than 2 responses"
    assert to_group({"q": "Q?", "answers": ["a", "b"], "scores": [1, 1]}, mapping)["edges"] == [[0, 1, 1]]
    with pytest.raises(BadRow, match="scores") as e:
        to_group({"q": "Q?", "answers": ["a", "b"], "scores": [1, "x"]}, mapping)
    assert e.value.reason == "bad labels"


def test_ranking_tiers_layer_a_partial_order_and_reject_contradictions():
    assert ranking_tiers(4, [[0, 1, 0], [0, 2, 0], [0, 3, 0]]) == [0, 1, 1, 1]  # only the best is known
    assert ranking_tiers(3, [[0, 1, 0], [1, 2, 0], [0, 2, 0]]) == [0, 1, 2]
    assert ranking_tiers(3, [[0, 1, 0], [1, 2, 0], [2, 0, 0]]) is None  # a cycle
    assert ranking_tiers(2, [[0, 1, 1], [0, 1, 0]]) is None  # tied and preferred at once
    assert ranking_tiers(3, [[0, 1, 1], [1, 2, 0]]) == [0, 0, 1]


def test_group_tokens_are_the_pair_paths_tokens(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for pair in ({"prompt": "User: How do I boil an egg?\nAssistant: ", "chosen": "Sure!", "rejected": "No."},
                 {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
                  "rejected": [{"role": "assistant", "content": "Go away"}]}):
        ids = tokenize_canonical(pair, tok)
        group = tokenize_group({"prompt": pair["prompt"], "responses": [pair["chosen"], pair["rejected"]],
                                "edges": [[0, 1, 0]]}, tok)
        assert group["input_ids"] == [ids["input_ids_chosen"], ids["input_ids_rejected"]]
