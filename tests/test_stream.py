"""The per-rank pair stream: disjoint covering shards, determinism, exact resume, batching."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from rm_scale.data.stream import PairStream, StreamConfig
from tiny import demo_corpus, make_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = SHARED / "hh-rlhf-harmless-base" / "pairs.jsonl.gz"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(demo_corpus() + [" ".join(str(i) for i in range(100)) + " user assistant"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """5 files of uneven size (37 pairs), one row per pair id; words vary the length."""
    root = tmp_path_factory.mktemp("pairs")
    paths, pid = [], 0
    for f, n in enumerate([9, 4, 11, 6, 7]):
        path = root / f"part{f}.jsonl"
        with open(path, "w") as out:
            for _ in range(n):
                words = " ".join(["rice"] * (1 + pid % 13))
                out.write(json.dumps({"prompt": f"User: {pid} {words}", "chosen": " Sure", "rejected": " no"}) + "\n")
                pid += 1
        paths.append(str(path))
    return paths


def _ids(batches, tok):
    """The pair ids in the batches (decoded from the prompt's first number)."""
    out = []
    for b in batches:
        for row, mask in zip(b["input_ids_chosen"], b["attention_mask_chosen"]):
            text = tok.decode(row[mask.bool()])
            out.append(int(text.split()[2]))
    return out


def _stream(files, tok, rank=0, world=1, **kw):
    cfg = dict(sources=files, pairs_per_batch=4, block_size=8, seed=1)
    cfg.update(kw)
    return PairStream(StreamConfig(**cfg), tok, rank=rank, world_size=world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batching", ["fixed", "length_grouped"])
def test_shards_are_disjoint_and_cover_every_pair(files, tok, world, batching):
    seen = []
    for rank in range(world):
        seen.extend(_ids(list(_stream(files, tok, rank, world, batching=batching)), tok))
    assert sorted(seen) == list(range(37))


def test_same_seed_same_order_and_epochs_reshuffle(files, tok):
    a, b = _stream(files, tok), _stream(files, tok)
    first, again = _ids(list(a), tok), _ids(list(b), tok)
    assert first == again
    second_epoch = _ids(list(a), tok)  # the next pass over the same stream
    assert sorted(second_epoch) == sorted(first) and second_epoch != first
    assert _ids(list(_stream(files, tok, seed=2)), tok) != first


@pytest.mark.parametrize("cut", [1, 2, 4])
def test_resume_continues_with_exactly_the_same_batches(files, tok, cut):
    full = list(_stream(files, tok, rank=1, world=2, batching="length_grouped"))
    state = full[cut - 1]["_state"]
    resumed = _stream(files, tok, rank=1, world=2, batching="length_grouped")
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    rest = list(resumed)
    assert len(rest) == len(full) - cut
    for x, y in zip(rest, full[cut:]):
        assert torch.equal(x["input_ids_chosen"], y["input_ids_chosen"])
        assert torch.equal(x["input_ids_rejected"], y["input_ids_rejected"])
    # and the epoch after the resumed one is the uninterrupted run's next epoch
    uninterrupted = _stream(files, tok, rank=1, world=2, batching="length_grouped")
    list(uninterrupted)
    assert _ids(list(resumed), tok) == _ids(list(uninterrupted), tok)


def test_resume_with_another_world_size_is_refused_with_the_fix(files, tok):
    state = next(iter(_stream(files, tok, rank=0, world=2)))["_state"]
    with pytest.raises(ValueError, match="same world size"):
        _stream(files, tok, rank=0, world=4).load_state_dict(state)


def test_token_budget_caps_padded_tokens(files, tok):
    stream = _stream(files, tok, batching="token_budget", token_budget=64, pairs_per_batch=8)
    for b in stream:
        assert b["input_ids_chosen"].shape[0] == 1 or 2 * b["input_ids_chosen"].numel() <= 64
    assert stream.stats.pairs == 37


def _bad_file(tmp_path):
    good = {"prompt": "User: a", "chosen": " Sure", "rejected": " no"}
    lines = [
        json.dumps(good).encode(),                                                          # 1 ok
        json.dumps({"prompt": "User: b", "chosen": " same", "rejected": " same"}).encode(),  # 2 identical
        json.dumps({"prompt": "User: c", "chosen": None, "rejected": " no"}).encode(),       # 3 not text
        json.dumps({"prompt": "User: " + "rice " * 50, "chosen": " Sure", "rejected": " no"}).encode(),  # 4 long
        b'{"prompt": "User: d", "chosen": " Sure", ',                                         # 5 malformed
        json.dumps({"prompt": "User: e", "rejected": " no"}).encode(),                       # 6 missing field
        json.dumps({"prompt": "User: f", "chosen": "  ", "rejected": " no"}).encode(),       # 7 empty field
        b'{"prompt": "User: g", "chosen": "\xff\xfe", "rejected": " no"}'.replace(b"\\xff\\xfe", b"\xff\xfe"),  # 8 bad UTF-8
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return path, empty


def test_bad_rows_are_skipped_and_counted(tmp_path, tok):
    path, empty = _bad_file(tmp_path)
    stream = _stream([str(path), str(empty)], tok, max_length=20)
    assert sum(b["input_ids_chosen"].shape[0] for b in stream) == 1
    assert stream.stats.dropped == {
        "identical chosen and rejected": 1, "not text": 1, "longer than max_length=20": 1, "malformed JSON": 1,
        "missing field": 1, "empty field": 1, "bad UTF-8": 1, "empty file": 1,
    }


@pytest.mark.parametrize("line,field", [(2, "chosen"), (3, "chosen"), (5, None), (6, "chosen"), (8, None)])
def test_strict_mode_names_file_line_field_and_fix(tmp_path, tok, line, field):
    path, _ = _bad_file(tmp_path)
    lines = path.read_bytes().split(b"\n")
    only = tmp_path / "one.jsonl"
    only.write_bytes(lines[0] + b"\n" + lines[line - 1] + b"\n")
    with pytest.raises(ValueError) as err:
        list(_stream([str(only)], tok, strict=True))
    message = str(err.value)
    assert f"{only}:2" in message
    if field:
        assert repr(field) in message
    assert any(word in message for word in ("fix", "drop", "map your column", "delete"))


def test_column_mapping_and_multi_response_rows(tmp_path, tok):
    mapped = tmp_path / "mapped.jsonl"
    mapped.write_text(json.dumps({"q": "User: 1", "good": " Sure", "bad": " no", "grp": "a"}) + "\n")
    multi = tmp_path / "multi.json"
    multi.write_text(json.dumps([{"question": "User: 2", "prediction 1": "Sure", "prediction 2": "no",
                                  "prediction 3": "Sure thing", "preference": [1, 0, 2]}]))
    stream = _stream([{"path": str(mapped), "columns": {"prompt": "q", "chosen": "good", "rejected": "bad",
                                                        "subset": "grp"}}], tok)
    assert sum(b["input_ids_chosen"].shape[0] for b in stream) == 1 and not stream.stats.dropped
    stream = _stream([str(multi)], tok)
    # 3 responses: 1>2 kept, 1=3 tie dropped and counted, 3>2 kept
    assert sum(b["input_ids_chosen"].shape[0] for b in stream) == 2 and stream.stats.dropped == {"tie": 1}


def test_sources_mix_by_weight_and_every_source_is_seen(files, tok):
    """Weights are sampling rates: an epoch ends once every source was seen whole; a heavy small source repeats."""
    heavy_small = {"path": files[1], "weight": 4.0}  # 4 pairs (ids 9..12)
    light_big = {"path": files[2], "weight": 1.0}  # 11 pairs (ids 13..23)
    ids = _ids(list(_stream([heavy_small, light_big], tok)), tok)
    assert set(ids) == set(range(9, 24))
    small = sum(1 for i in ids if i < 13)
    assert small > 4  # the small source was sampled more than once through


@pytest.mark.parametrize("world", [1, 2])
def test_read_once_reads_every_source_whole_exactly_once(files, tok, world):
    """Evaluation sets: sources one after the other, each row once whatever the weights (sampling would count a
    small source's rows several times), split across ranks without overlap."""
    sources = [{"path": files[1], "weight": 4.0}, {"path": files[2], "weight": 1.0}]
    ids = [i for rank in range(world) for i in _ids(list(_stream(sources, tok, rank, world, read_once=True)), tok)]
    assert sorted(ids) == list(range(9, 24))


@pytest.mark.skipif(not HH.exists(), reason=f"real data not found at {HH} (shared/data beside the checkout)")
def test_length_grouping_cuts_padding_on_hh_rlhf(tok):
    """Padding efficiency (real / computed tokens) on real hh-rlhf transcripts: grouped batching beats plain."""
    eff = {}
    for batching in ("fixed", "length_grouped", "packed"):
        stream = PairStream(StreamConfig(sources=[str(HH)], pairs_per_batch=8, block_size=1024, max_length=512,
                                         batching=batching, token_budget=8 * 2 * 512), tok, rank=0, world_size=1)
        for _ in stream:
            pass
        eff[batching] = stream.stats.real_tokens / stream.stats.padded_tokens
        assert stream.stats.pairs > 1500
    assert eff["length_grouped"] > eff["fixed"] + 0.2, eff
    assert eff["packed"] >= 0.95, eff  # padding-free packing: the padding-efficiency goal


FG = SHARED / "finegrained-qa-feedback" / "dev_feedback.json"


@pytest.mark.skipif(not FG.exists(), reason=f"real data not found at {FG} (shared/data beside the checkout)")
def test_multi_response_real_data_expands_to_pairs_and_splits_by_prompt(tok):
    """FineGrainedRLHF: 4 answers and 6 pairwise labels per question; ties dropped and counted; the eval split is
    by question, never by pair."""
    from rm_scale.data.stream import materialize_pairs

    common = dict(sources=[str(FG)], pairs_per_batch=8, max_length=None, seed=0, eval_fraction=0.2)
    train, train_stats = materialize_pairs(StreamConfig(split="train", **common), tok)
    held, held_stats = materialize_pairs(StreamConfig(split="eval", **common), tok)
    labels = json.loads(FG.read_text())
    ties = sum(label == 0 for row in labels for label in row["preference"])
    assert train_stats.dropped["tie"] + held_stats.dropped["tie"] == ties
    other = sum(n for stats in (train_stats, held_stats) for reason, n in stats.dropped.items() if reason != "tie")
    assert other < 20, (train_stats.dropped, held_stats.dropped)  # near-duplicate answers: a few identical pairs
    assert len(train) + len(held) + other == 6 * len(labels) - ties
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3

    from rm_scale.data.stream import canonical_pairs

    def prompts(split):  # the canonical pairs' prompts (the tiny test vocabulary decodes most words to <unk>)
        pairs, _ = canonical_pairs(StreamConfig(split=split, **common))
        return {json.dumps(p["prompt"]) for p in pairs}

    assert len(prompts("train")) > 100 and not prompts("train") & prompts("eval")


def test_conversational_rows_go_through_the_chat_template(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    prompt = [{"role": "user", "content": "How do I cook rice?"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Rinse the rice"}],
             "rejected": [{"role": "assistant", "content": "Not my problem."}]},
            {"chosen": prompt + [{"role": "assistant", "content": "Sure"}],
             "rejected": prompt + [{"role": "assistant", "content": "no"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = _stream([str(path)], tok)
    batch = next(iter(stream))
    texts = [tok.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids_chosen"], batch["attention_mask_chosen"])]
    assert sorted(t.split()[0] for t in texts) == ["user", "user"]
    assert any("assistant" in t and "Rinse" in t for t in texts)


def test_keep_end_truncation_keeps_the_response_end(tmp_path, tok):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "User: " + "rice " * 40, "chosen": " Sure", "rejected": " no"}) + "\n")
    stream = _stream([str(path)], tok, max_length=10, truncation="keep_end")
    batch = next(iter(stream))
    assert batch["input_ids_chosen"].shape[1] == 10
    assert batch["input_ids_chosen"][0, -1].item() == tok.eos_token_id
    assert stream.stats.truncated == 1 and not stream.stats.dropped


def test_hub_sources_stream_through_datasets(tmp_path, tok):
    """`hub:NAME[@split]` goes through datasets.load_dataset(NAME, streaming=True): a local data-set folder stands
    in for a hub name here (no network); an unreachable name is a clear error."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"prompt": f"User: {i}", "chosen": " Sure", "rejected": " no"} for i in range(5)]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = _stream([f"hub:{folder}@test"], tok)
    assert sorted(_ids(list(stream), tok)) == list(range(5))
    with pytest.raises(ValueError, match="cannot open the hub data set"):
        list(_stream(["hub:rm-scale-no-such/dataset"], tok))


def test_save_to_disk_folders_are_sources(tmp_path, tok):
    from datasets import Dataset

    rows = [{"prompt": f"User: {i}", "chosen": " Sure", "rejected": " no"} for i in range(6)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert sorted(_ids(list(_stream([str(tmp_path / "saved")], tok)), tok)) == list(range(6))


@pytest.mark.parametrize("batching", ["length_grouped", "packed"])
def test_ranks_run_micro_batches_of_the_same_size_at_each_step(tmp_path, tok, batching):
    """Under ZeRO-3/DDP each step waits for the busiest rank: the ranks' batches of one step must be alike in size
    (rm_scale.data.batching.balanced_order), although each rank's batches are random in order and its count differs."""
    import random

    rng = random.Random(0)
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as out:
        for i in range(1000):  # lengths 1..120 words, skewed like real data
            n = 1 + int(120 * rng.random() ** 2)
            out.write(json.dumps({"prompt": f"User: {i} " + " ".join(["rice"] * n), "chosen": " Sure",
                                  "rejected": " no " * rng.randint(1, 20)}) + "\n")
    kw = dict(batching=batching, pairs_per_batch=8, block_size=500, max_length=1024, seed=3,
              token_budget=100_000 if batching == "packed" else None)

    def size(b):
        return b["packed_input_ids"].numel() if "packed_input_ids" in b else 2 * b["input_ids_chosen"].numel()

    ranks = [[size(b) for b in _stream([str(path)], tok, rank, 2, **kw)] for rank in range(2)]
    steps = list(zip(*ranks))
    assert len(steps) >= 55 and abs(len(ranks[0]) - len(ranks[1])) <= 2
    balance = sum(sum(s) / 2 for s in steps) / sum(max(s) for s in steps)
    assert balance >= 0.95, balance
    # ... while the order is not a length curriculum: sizes early and late in each rank's pass look alike.
    half = len(ranks[0]) // 2
    assert 0.7 < sum(ranks[0][:half]) / sum(ranks[0][half : 2 * half]) < 1.4
    # For contrast: the same batches shuffled independently per rank (the old order) are far less balanced.
    shuffled = [random.Random(r).sample(sizes, len(sizes)) for r, sizes in enumerate(ranks)]
    old = list(zip(*shuffled))
    assert sum(sum(s) / 2 for s in old) / sum(max(s) for s in old) < balance - 0.05
