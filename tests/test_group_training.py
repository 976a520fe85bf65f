"""Training on K-response groups (`response_groups`, `loss_type`, `ties`): the stream's group batches decoded back to
the rows' preferences (a reversed label fails), pairs as groups of two training exactly as pairs, bad groups counted,
prompt-merged pairs, the evaluation's best-of-K and tie metrics, and world size x accumulation invariance of each
group loss under ZeRO-3 (real processes)."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from launch import launch_config, metrics, run_train, tiny_ds_config, tiny_recipe
from rm_scale.data.stream import PairStream, StreamConfig
from rm_scale.train.metrics import group_set_metrics
from rm_scale.train.stream_eval import _span_ids

DEMO = [json.loads(line) for line in open("rm_scale/data/demo_data/train.jsonl")]
N = 11  # groups in the invariance test: uneven shards (6 and 5) and micro-batches (3, 3 and 3, 2)
COLUMNS = {"prompt": "prompt", "responses": "responses", "scores": "scores"}


def group_rows(n=12):
    """Scored groups of 2, 3 and 4 responses from the demo pairs (higher is better; equal scores tie): a row's own
    chosen, its rejected, and other rows' rejected answers."""
    rows = []
    for i in range(n):
        row = DEMO[i]
        others = [DEMO[(i + k) % len(DEMO)]["rejected"] for k in (1, 2)]
        k = 2 + i % 3
        responses = [row["chosen"], row["rejected"], *others][:k]
        scores = [3.0, 1.0, 1.0 if i % 2 else 0.0, 2.0][:k]  # odd rows: a tie between two wrong answers
        rows.append({"prompt": row["prompt"], "responses": responses, "scores": scores, "subset": row["subset"]})
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stream(path, tok, **kw):
    cfg = dict(sources=[{"path": str(path), "columns": COLUMNS}], pairs_per_batch=4, batching="packed",
               token_budget=4096, block_size=64, shared_prefix=True, response_groups=True, max_length=512)
    return PairStream(StreamConfig(**{**cfg, **kw}), tok, rank=0, world_size=1)


def decoded_edges(batch, tok):
    """(better text, worse text, tie) of every edge of a group batch, read back from the packed rows."""
    def text(k):
        ids = _span_ids(batch["packed_input_ids"], batch["response_index"][k], batch["response_span"][k])
        return tok.decode(ids, skip_special_tokens=True)

    return [(text(i), text(j), bool(t)) for i, j, t in
            zip(batch["edge_better"].tolist(), batch["edge_worse"].tolist(), batch["edge_tie"].tolist())]


def test_group_batches_carry_every_response_once_and_each_edge_the_right_way(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rows = group_rows()
    batches = list(stream(write(tmp_path / "g.jsonl", rows), tok))
    got = [e for b in batches for e in decoded_edges(b, tok)]

    def dec(text):
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"])

    def is_edge(edge, prompt, hi, lo, tie):
        a, b, t = edge
        sides = [(a, b)] + ([(b, a)] if tie else [])  # a tie names its two responses in either order
        return t == tie and any(dec(prompt) in x and x.endswith(dec(hi)) and dec(prompt) in y and y.endswith(dec(lo))
                                for x, y in sides)

    want = []
    for row in rows:
        k, s = len(row["responses"]), row["scores"]
        for i in range(k):
            for j in range(i + 1, k):
                hi, lo = (i, j) if s[i] >= s[j] else (j, i)
                want.append((row["prompt"], row["responses"][hi], row["responses"][lo], s[i] == s[j]))
    assert len(got) == len(want)
    for w in want:  # each labelled pair is one edge, the right way round (a reversed label fails)
        assert sum(is_edge(e, *w) for e in got) == 1, w
    responses = sum(int(b["response_index"].shape[0]) for b in batches)
    assert responses == sum(len(r["responses"]) for r in rows)  # each response computed once
    assert all(int(b["group_edges"]) == int((~b["edge_tie"]).sum()) for b in batches)
    # tiers: the row's own chosen answer is the one best response of its group
    b = batches[0]
    assert set(b["response_tier"].tolist()) >= {0, 1}


@pytest.mark.parametrize("cut", [1, 3])
def test_a_resumed_group_stream_continues_with_exactly_the_same_batches(tiny_dir, tmp_path, cut):
    """The resume state of a group stream (rank 1 of 2, several blocks) survives JSON and gives the uninterrupted
    run's batches, and its counts are not counted twice."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    path = write(tmp_path / "g.jsonl", group_rows(30))

    def fresh():
        return PairStream(StreamConfig(sources=[{"path": str(path), "columns": COLUMNS}], pairs_per_batch=2,
                                       batching="packed", token_budget=4096, block_size=4, shared_prefix=True,
                                       response_groups=True, max_length=512), tok, rank=1, world_size=2)

    full = list(fresh())
    resumed = fresh()
    resumed.load_state_dict(json.loads(json.dumps(full[cut - 1]["_state"])))
    rest = list(resumed)
    assert len(rest) == len(full) - cut
    for x, y in zip(rest, full[cut:]):
        for key in ("packed_input_ids", "edge_better", "edge_worse", "edge_tie", "response_tier"):
            assert torch.equal(x[key], y[key]), key
    assert rest[-1]["_state"]["stats"] == full[-1]["_state"]["stats"]


HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-base" / "pairs.jsonl.gz"


@pytest.mark.skipif(not HH.is_file(), reason=f"{HH} not found (the shared real data)")
def test_whole_transcript_pairs_split_and_merge_by_their_implicit_prompt(tiny_dir, tmp_path):
    """hh-rlhf rows have no prompt column: as groups they are held out, and merged, by the prompt their two
    transcripts share -- the same train/eval split as the pair path, and never one group of different prompts."""
    from rm_scale.data.pairs import prompt_key, to_pairs
    from rm_scale.data.mapping import parse_mapping

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rows = [json.loads(line) for line in gzip.open(HH, "rt")][:80]
    rows += rows[:10]  # the same prompts again: merged with their first copies
    path = write(tmp_path / "hh.jsonl", rows)
    kw = dict(sources=[str(path)], max_length=None, eval_fraction=0.3)
    for split in ("train", "eval"):
        pair_stream = PairStream(StreamConfig(sources=[str(path)], pairs_per_batch=4, max_length=None,
                                              eval_fraction=0.3, split=split), tok, rank=0, world_size=1)
        pairs = sum(int(b["input_ids_chosen"].shape[0]) for b in pair_stream)
        assert sum(int(b["group_edges"]) for b in stream(path, tok, split=split, **kw)) == pairs > 0
    merged = list(stream(path, tok, merge_prompt_pairs=True, max_length=None, sources=[str(path)], block_size=128))
    prompts = {prompt_key(to_pairs(r, parse_mapping(None))[0]) for r in rows}
    assert sum(len(set(b["response_group"].tolist())) for b in merged) == len(prompts)


def test_pairs_as_groups_of_two_train_exactly_as_pairs(tiny_dir, tmp_path):
    """Bradley-Terry over groups of two = today's pair path: the same losses, pair counts, computed tokens and
    parameters on the shipped demo pairs."""
    from rm_scale import RewardConfig, RewardTrainer
    from rm_scale.data import PairFiles
    from rm_scale.model import load_reward_model

    runs = {}
    for groups in (False, True):
        args = RewardConfig(output_dir=str(tmp_path / str(groups)), per_device_train_batch_size=4, max_steps=4,
                            learning_rate=1e-3, logging_steps=1, report_to=[], seed=0, bf16=False, save_strategy="no",
                            batching="packed", token_budget=100_000, stream_block_size=4,
                            activation_checkpointing=False, response_groups=groups)
        trainer = RewardTrainer(model=load_reward_model(str(tiny_dir)), args=args,
                                tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
                                train_dataset=PairFiles(["rm_scale:demo/train"]))
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss_exact" in h]
        runs[groups] = (logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    (pairs, pair_params), (groups, group_params) = runs[False], runs[True]
    for key in ("loss_exact", "pairs", "computed_tokens_per_pair", "prefix_sharing", "accuracy"):
        assert [h[key] for h in groups] == pytest.approx([h[key] for h in pairs], abs=1e-6), key
    for name, p in pair_params.items():  # Adam's eps-scale sensitivity, as in test_shared_prefix (measured 3.3e-6)
        assert torch.allclose(group_params[name], p, atol=5e-5), name


def test_bad_groups_are_counted_and_over_long_responses_left_out(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    good = group_rows(3)
    rows = [
        *good,
        {"prompt": "User: What sound does a cow make?\nAssistant: ", "responses": ["A cow moos.", ""],
         "scores": [2, 1]},  # one usable response: dropped
        {"prompt": "User: What sound does a cow make?\nAssistant: ", "responses": ["A cow moos.", "A cow howls."],
         "scores": [1, 1]},  # only a tie
        {"prompt": DEMO[5]["prompt"], "responses": [DEMO[5]["chosen"], DEMO[5]["rejected"] + " moos" * 40,
                                                     DEMO[6]["rejected"]], "scores": [3, 2, 1]},
    ]
    s = stream(write(tmp_path / "bad.jsonl", rows), tok, max_length=40)
    batches = list(s)
    assert s.stats.dropped["fewer than 2 responses"] == 1 and s.stats.dropped["tie"] == 1
    sizes = sorted(len(set(b["response_group"].tolist())) for b in batches)
    assert sum(sizes) == 4  # the 3 good groups and the long one, which kept its 2 short responses
    chosen, other = (tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in (DEMO[5]["chosen"],
                                                                                        DEMO[6]["rejected"]))
    long = [(a, b) for bt in batches for a, b, _ in decoded_edges(bt, tok) if a.endswith(chosen)]
    assert [b.endswith(other) for _, b in long] == [True]  # the over-long response is out with its two edges
    with pytest.raises(ValueError, match="strict_data"):
        list(stream(write(tmp_path / "bad.jsonl", rows), tok, max_length=40, strict=True))


def test_listwise_drops_groups_whose_labels_are_not_a_ranking(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    # FineGrained-style pairwise labels 1v2, 1v3, 2v3 (1 = the first better): 1 > 2, 3 > 1, 2 > 3 is a cycle
    cyclic = {"question": "What sound does a cow make?", "prediction 1": "A cow moos.",
              "prediction 2": "A cow howls.", "prediction 3": "A cow barks.", "preference": [1, 2, 1]}
    ranked = {**cyclic, "preference": [1, 1, 1]}
    path = write(tmp_path / "fg.jsonl", [cyclic, ranked])
    sources = [{"path": str(path)}]
    bt = stream(path, tok, sources=sources)
    assert sum(int(b["group_edges"]) for b in bt) == 6  # Bradley-Terry keeps every edge
    pl = stream(path, tok, sources=sources, listwise=True)
    assert sum(int(b["group_ranked"]) for b in pl) == 1 and pl.stats.dropped == {"inconsistent ranking": 1}


def test_margins_under_plackett_luce_are_refused_with_the_fix(tiny_dir, tmp_path):
    """Plackett-Luce has no margin term: a margin column or score_margin would be silently ignored, so it is an
    error naming the row and the two ways out."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    path = write(tmp_path / "m.jsonl", [{"prompt": "What sound does a cow make?", "chosen": "A cow moos.",
                                                  "rejected": "A cow barks.", "margin": 1.0}])
    assert sum(int(b["group_edges"]) for b in stream(path, tok, sources=[{"path": str(path)}])) == 1  # bradley_terry
    with pytest.raises(ValueError, match=r"m\.jsonl:1.*plackett_luce.*bradley_terry"):
        list(stream(path, tok, sources=[{"path": str(path)}], listwise=True))
    scored = write(tmp_path / "s.jsonl", [{"q": "What sound does a cow make?", "scores": [3, 2, 1],
                                                  "answers": ["A cow moos.", "A cow howls.", "A cow barks."]}])
    columns = {"prompt": "q", "responses": "answers", "scores": "scores", "score_margin": 0.5}
    with pytest.raises(ValueError, match="no margin term"):
        list(stream(scored, tok, sources=[{"path": str(scored), "columns": columns}], listwise=True))


def test_pair_rows_of_one_prompt_merge_into_one_group(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    p = "User: What sound does a cow make?\nAssistant: "
    rows = [{"prompt": p, "chosen": "A cow moos.", "rejected": "A cow howls."},
            {"prompt": p, "chosen": "A cow moos.", "rejected": "A cow barks."},
            {"prompt": p, "chosen": "A cow howls.", "rejected": "A cow barks."},
            {"prompt": DEMO[0]["prompt"], "chosen": DEMO[0]["chosen"], "rejected": DEMO[0]["rejected"]}]
    path = write(tmp_path / "pairs.jsonl", rows)
    (batch,) = list(stream(path, tok, sources=[str(path)], merge_prompt_pairs=True))
    assert sorted(torch.bincount(batch["response_group"]).tolist()) == [2, 3]  # 3 cow answers once each
    answers = {tok.decode(tok(t, add_special_tokens=False)["input_ids"]): t
               for t in ("A cow moos.", "A cow howls.", "A cow barks.")}

    def answer(text):
        return next((t for d, t in answers.items() if text.endswith(d)), None)

    edges = sorted((answer(a), answer(b)) for a, b, _ in decoded_edges(batch, tok) if answer(a))
    assert edges == [("A cow howls.", "A cow barks."), ("A cow moos.", "A cow barks."), ("A cow moos.", "A cow howls.")]
    cow = torch.bincount(batch["response_group"]).argmax()  # responses in first-seen order: moos, howls, barks
    assert batch["response_tier"][batch["response_group"] == cow].tolist() == [0, 1, 2]


def test_best_of_k_and_tie_metrics_per_subset():
    groups = [([2.0, 1.0, 0.0], [0, 1, 2], "a"),  # best on top
              ([0.0, 1.0, 0.5], [0, 1, 1], "a"),  # best beaten
              ([1.0, 1.0], [0, 1], "b"),  # top reward shared by 2: half
              ([0.3, 0.3], [0, 0], "b")]  # no single best: not scored
    ties = [(0.1, "a"), (2.0, "b")]
    out = group_set_metrics(groups, ties, prefix="eval", tie_strength=2.0)  # a tie is likeliest when |gap| < 1.386
    assert out["eval_best_of_k_accuracy"] == pytest.approx(1.5 / 3) and out["eval_groups_ranked"] == 3
    assert out["eval_best_of_k_accuracy_a"] == 0.5 and out["eval_best_of_k_accuracy_b"] == 0.5
    assert out["eval_ties"] == 2 and out["eval_tie_accuracy"] == 0.5 and out["eval_tie_gap"] == pytest.approx(1.05)
    assert "eval_tie_accuracy" not in group_set_metrics(groups, ties, prefix="eval", tie_strength=None)


def test_group_fields_are_checked_with_the_fix():
    from rm_scale import RewardConfig

    base = dict(output_dir="/tmp/x", report_to=[])
    with pytest.raises(ValueError, match="batching='packed'"):
        RewardConfig(**base, loss_type="plackett_luce")
    with pytest.raises(ValueError, match="needs response_groups"):
        RewardConfig(**base, batching="packed", token_budget=10, ties="tie_model", response_groups=False)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        RewardConfig(**base, loss_type="listnet")
    with pytest.raises(ValueError, match="tie_strength"):
        RewardConfig(**base, batching="packed", token_budget=10, ties="tie_model", tie_strength=0.0)
    args = RewardConfig(**base, batching="packed", token_budget=10, ties="tie_model")
    assert args.response_groups is True
    assert RewardConfig(**base).response_groups is False


@pytest.mark.slow
@pytest.mark.parametrize("loss", [{"ties": "tie_model", "tie_strength": 1.5, "center_rewards_coefficient": 0.1},
                                  {"loss_type": "plackett_luce", "batch_mean_coefficient": 0.5}],
                         ids=["bradley_terry_ties", "plackett_luce"])
def test_group_losses_do_not_change_with_world_size_or_accumulation(tmp_path, loss):
    """One step over all 11 groups (2-4 responses, ties): 1 process x GAS 4 = 2 ranks x GAS 2 under ZeRO-3 (each rank
    its shard, uneven micro-batches, a rank may run a padding batch), the loss divided by the global edge / group
    count."""
    path = write(tmp_path / "groups.jsonl", group_rows(N))
    recipe, _ = tiny_recipe(
        tmp_path, data={"train": [{"path": str(path), "columns": COLUMNS}], "streaming": True}, max_steps=1,
        per_device_train_batch_size=3, batching="packed", token_budget=4096, stream_block_size=64, **loss)
    launch = launch_config("zero3.yaml", tmp_path, ds_config=tiny_ds_config("zero3.json", tmp_path))
    runs = {}
    for world, gas in ((1, 4), (2, 2)):
        out = tmp_path / f"w{world}_gas{gas}"
        run_train(recipe, ["--output_dir", str(out), "--gradient_accumulation_steps", str(gas)],
                  launch=launch if world > 1 else None, nproc=world)
        runs[world] = next(m for m in metrics(out) if "loss_exact" in m)
    one, two = runs[1], runs[2]
    edges = sum(len(r["responses"]) * (len(r["responses"]) - 1) // 2 for r in group_rows(N))
    ties = sum(1 for i in range(N) if i % 2 and 2 + i % 3 >= 3)
    assert one["pairs"] == two["pairs"] == edges - ties  # every group of the file in the one step
    assert abs(one["loss_exact"] - two["loss_exact"]) <= 1e-5
    assert abs(one["grad_norm"] - two["grad_norm"]) <= 1e-4 * max(1.0, one["grad_norm"])


def test_rm_scale_eval_groups_scores_the_edges_as_the_pair_path_and_adds_best_of_k(trained_export, tmp_path):
    """`rm-scale eval --groups` on scored groups: the same pairwise accuracy and rewards as scoring the rows' pairs
    one pair at a time (each prompt computed once instead), plus best-of-K and the tie edges."""
    from rm_scale.commands.evaluate import evaluate_model

    rows = group_rows(12)
    # FineGrained's own layout (question, prediction 1..K) with scores: read without a mapping
    numbered = [{"question": r["prompt"], **{f"prediction {k + 1}": t for k, t in enumerate(r["responses"])},
                 "scores": r["scores"], "subset": r["subset"]} for r in rows]
    path = write(tmp_path / "groups.jsonl", numbered)
    got = {groups: evaluate_model(str(trained_export), [str(path)], groups=groups, tie_strength=2.0,
                                  plot_path=str(tmp_path / f"{groups}.png")) for groups in (False, True)}
    pairs, grouped = got[False], got[True]
    assert grouped["pairs"] == pairs["pairs"] and grouped["accuracy"] == pytest.approx(pairs["accuracy"], abs=1e-9)
    assert grouped["rewards_chosen_mean"] == pytest.approx(pairs["rewards_chosen_mean"], abs=1e-5)
    assert grouped["ties"] == sum(1 for i in range(12) if i % 2 and 2 + i % 3 >= 3)
    assert 0.0 <= grouped["best_of_k_accuracy"] <= 1.0 and grouped["groups_ranked"] == 12
    assert set(grouped["subsets"]) == {r["subset"] for r in rows}


def test_score_margins_follow_the_score_gap_on_pairs_groups_and_group_batches(tiny_dir, tmp_path):
    """`score_margin: c` with scores: each pair's margin is c x its score gap, the same on the pair path, in a
    group's edges and in the packed group batch (raw UltraFeedback: 4 completions, two of them tied)."""
    from rm_scale.data.groups import to_group
    from rm_scale.data.mapping import parse_mapping
    from rm_scale.data.pairs import to_pairs
    from rm_scale.data.presets import PRESETS

    columns = {**PRESETS["ultrafeedback"]["columns"], "score_margin": 0.5}

    def completion(text, score):
        return {"response": text, "overall_score": score, "model": "m", "principle": "helpfulness"}

    row = {"source": "evol_instruct", "instruction": DEMO[1]["prompt"],
           "completions": [completion(DEMO[1]["chosen"], 8.0), completion(DEMO[1]["rejected"], 3.0),
                           completion(DEMO[2]["chosen"], 8.0), completion(DEMO[2]["rejected"], 6.0)]}
    mapping = parse_mapping(columns)
    pairs = {(p["chosen"][-1]["content"], p["rejected"][-1]["content"]): p["margin"]
             for p in to_pairs(row, mapping) if "drop" not in p}
    assert pairs[(DEMO[1]["chosen"], DEMO[1]["rejected"])] == 2.5 and pairs[(DEMO[2]["rejected"],
                                                                            DEMO[1]["rejected"])] == 1.5
    group = to_group(row, mapping)
    texts = [r[-1]["content"] for r in group["responses"]]
    for (i, j, tie), margin in zip(group["edges"], group["margins"]):
        assert margin == (0.0 if tie else pairs[(texts[i], texts[j])])
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    path = write(tmp_path / "uf.jsonl", [row])
    (batch,) = list(stream(path, tok, sources=[{"path": str(path), "columns": columns}]))
    pref = ~batch["edge_tie"]
    assert sorted(batch["edge_margin"][pref].tolist()) == sorted(pairs.values())
    with pytest.raises(ValueError, match="score_margin must be a number > 0"):
        parse_mapping({**columns, "score_margin": -1})
