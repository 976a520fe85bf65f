import pytest
import torch
from datasets import Dataset

from rm_scale.data import RewardDataCollatorWithPadding, detect_format, prepare_dataset, tokenize_pair
from rm_scale.data.formats import PRETOKENIZED
from tiny import demo_corpus, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(demo_corpus())


def _feat(c, r, **extra):
    return {"input_ids_chosen": c, "attention_mask_chosen": [1] * len(c),
            "input_ids_rejected": r, "attention_mask_rejected": [1] * len(r), **extra}


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_both_sides_to_one_length(tok, side):
    tok.padding_side = side
    batch = RewardDataCollatorWithPadding(tok)([_feat([5, 6, 7], [8]), _feat([9], [10, 11])])
    pad = tok.pad_token_id
    assert batch["input_ids_chosen"].shape == batch["input_ids_rejected"].shape == (2, 3)
    if side == "right":
        assert batch["input_ids_chosen"].tolist() == [[5, 6, 7], [9, pad, pad]]
        assert batch["attention_mask_rejected"].tolist() == [[1, 0, 0], [1, 1, 0]]
    else:
        assert batch["input_ids_chosen"].tolist() == [[5, 6, 7], [pad, pad, 9]]
        assert batch["attention_mask_rejected"].tolist() == [[0, 0, 1], [0, 1, 1]]
    assert "margin" not in batch
    tok.padding_side = "right"


def test_collator_passes_margin_and_pads_to_multiple(tok):
    batch = RewardDataCollatorWithPadding(tok, pad_to_multiple_of=8)(
        [_feat([5], [6], margin=0.5), _feat([7, 8], [9], margin=2)]
    )
    assert batch["input_ids_chosen"].shape[1] == 8
    assert torch.equal(batch["margin"], torch.tensor([0.5, 2.0]))


def test_collator_errors_name_the_fix(tok):
    with pytest.raises(ValueError, match="missing"):
        RewardDataCollatorWithPadding(tok)([{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="max_length=2"):
        RewardDataCollatorWithPadding(tok, max_length=2)([_feat([1, 2, 3], [1])])


def test_formats_are_detected_and_tokenised(tok):
    eos = tok.eos_token_id
    explicit = {"prompt": "User: How do I cook rice?\nAssistant: ", "chosen": "Rinse the rice", "rejected": "Not my problem."}
    assert detect_format(list(explicit), explicit) == "prompt"
    out = tokenize_pair(explicit, tok, fmt="prompt")
    assert out["input_ids_chosen"][-1] == eos and out["input_ids_rejected"][-1] == eos
    assert out["attention_mask_chosen"] == [1] * len(out["input_ids_chosen"])
    implicit = {"chosen": explicit["prompt"] + explicit["chosen"], "rejected": explicit["prompt"] + explicit["rejected"]}
    assert detect_format(list(implicit), implicit) == "implicit_prompt"
    assert tokenize_pair(implicit, tok, fmt="implicit_prompt")["input_ids_chosen"] == out["input_ids_chosen"]
    ids = {"chosen_ids": [5, 6], "rejected_ids": [7], "margin": 1.0}
    assert detect_format(list(ids), ids) == "ids"
    assert tokenize_pair(ids, tok, fmt="ids") == {**_feat([5, 6], [7]), "margin": 1.0}
    assert detect_format(list(PRETOKENIZED), None) == "pretokenized"
    with pytest.raises(ValueError, match="Rename your columns"):
        detect_format(["question", "answer"], None)


def test_prepare_dataset_drops_overlong_pairs(tok):
    rows = [{"prompt": "User: hi", "chosen": " Sure", "rejected": " no"},
            {"prompt": "User: " + "cook rice " * 40, "chosen": " Sure", "rejected": " no"}]
    out = prepare_dataset(Dataset.from_list(rows), tok, max_length=16)
    assert len(out) == 1 and set(PRETOKENIZED) <= set(out.column_names)
