"""The per-rank pair stream: disjoint covering shards, determinism, exact resume, batching."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from rm_scale.stream import PairStream, StreamConfig
from tiny import demo_corpus, make_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = SHARED / "hh-rlhf-harmless-base" / "pairs.jsonl.gz"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(demo_corpus() + [" ".join(str(i) for i in range(100))])


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
    cfg = dict(files=files, pairs_per_batch=4, block_size=8, seed=1)
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


def test_bad_rows_are_skipped_and_counted(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "User: a", "chosen": " Sure", "rejected": " no"},
            {"prompt": "User: b", "chosen": " same", "rejected": " same"},
            {"prompt": "User: c", "chosen": None, "rejected": " no"},
            {"prompt": "User: " + "rice " * 50, "chosen": " Sure", "rejected": " no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = _stream([str(path)], tok, max_length=20)
    assert sum(b["input_ids_chosen"].shape[0] for b in stream) == 1
    assert stream.stats.dropped == {"identical chosen and rejected": 1, "malformed": 1, "longer than max_length=20": 1}


@pytest.mark.skipif(not HH.exists(), reason=f"real data not found at {HH} (shared/data beside the checkout)")
def test_length_grouping_cuts_padding_on_hh_rlhf(tok):
    """Padding efficiency (real / computed tokens) on real hh-rlhf transcripts: grouped batching beats plain."""
    eff = {}
    for batching in ("fixed", "length_grouped"):
        stream = PairStream(StreamConfig(files=[str(HH)], pairs_per_batch=8, block_size=1024, max_length=512,
                                         batching=batching), tok, rank=0, world_size=1)
        n = sum(b["input_ids_chosen"].shape[0] for b in stream)
        eff[batching] = stream.stats.real_tokens / stream.stats.padded_tokens
    assert n > 1500
    assert eff["length_grouped"] > eff["fixed"] + 0.2, eff
