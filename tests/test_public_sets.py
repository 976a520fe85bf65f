"""The public preference data sets go in as published: small rows written in each set's published schema (from its
card), read through the `format:` preset and through the same mapping spelled out in `columns:`, with the exact
chosen / rejected text of every row asserted (a reversed label fails), and the ties and filtered rows counted."""

import json
import math

import pytest

from rm_scale.data.presets import PRESETS
from rm_scale.data.stream import StreamConfig, canonical_pairs


def _read(tmp_path, rows, *, name="rows.jsonl", **source):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = StreamConfig(sources=[{"path": str(path), **source}], pairs_per_batch=4, max_length=None)
    return canonical_pairs(config)


def _both(tmp_path, rows, preset):
    """The preset, and its mapping written out by hand: the same pairs, the same counts."""
    by_name = _read(tmp_path, rows, name="a.jsonl", format=preset)
    spec = PRESETS[preset]
    by_hand = _read(tmp_path, rows, name="b.jsonl", columns=spec["columns"], where=spec.get("where", {}))
    assert by_name[0] == by_hand[0] and by_name[1].dropped == by_hand[1].dropped
    return by_name


def _text(side):
    return side if isinstance(side, str) else side[-1]["content"]


def _decided(pairs):
    return [(_text(p["chosen"]), _text(p["rejected"])) for p in pairs]


def _user(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def test_ultrafeedback_binarized_string_prompt_and_whole_conversations(tmp_path):
    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    rows = [
        {"prompt": "How many legs does a spider have?", "prompt_id": "a1",
         "chosen": conv("How many legs does a spider have?", "Eight."),
         "rejected": conv("How many legs does a spider have?", "Six."),
         "messages": conv("How many legs does a spider have?", "Eight."), "score_chosen": 9.0, "score_rejected": 4.0},
        {"prompt": "Name a colour.", "prompt_id": "a2", "chosen": conv("Name a colour.", "Blue."),
         "rejected": conv("Name a colour.", "Red."), "messages": [], "score_chosen": 7.0, "score_rejected": 7.0},
    ]
    pairs, stats = _both(tmp_path, rows, "ultrafeedback_binarized")
    assert _decided(pairs) == [("Eight.", "Six.")]
    assert pairs[0]["prompt"] is None and pairs[0]["chosen"][0]["role"] == "user"  # the prompt is not repeated
    assert stats.dropped == {"tie": 1}
    plain, _ = _read(tmp_path, rows[:1])  # no preset: the string prompt no longer crashes (it was iterated as chars)
    assert _decided(plain) == [("Eight.", "Six.")]


SHP = [
    {"post_id": "p1", "domain": "askculinary_train", "upvote_ratio": 0.98, "history": "How do I keep rice from sticking?",
     "c_root_id_A": "ca", "c_root_id_B": "cb", "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": 3,
     "score_B": 40, "human_ref_A": "Use more oil.", "human_ref_B": "Rinse it first.", "labels": 0,
     "seconds_difference": 10.0, "score_ratio": 13.3},
    {"post_id": "p2", "domain": "askscience_train", "upvote_ratio": 0.9, "history": "Why is the sky blue?",
     "c_root_id_A": "cc", "c_root_id_B": "cd", "created_at_utc_A": 5, "created_at_utc_B": 1, "score_A": 90,
     "score_B": 4, "human_ref_A": "Rayleigh scattering.", "human_ref_B": "It reflects the sea.", "labels": 1,
     "seconds_difference": 4.0, "score_ratio": 22.5},
]


def test_shp_labels_decide_which_comment_is_chosen(tmp_path):
    pairs, stats = _both(tmp_path, SHP, "shp")
    assert _decided(pairs) == [("Rinse it first.", "Use more oil."), ("Rayleigh scattering.", "It reflects the sea.")]
    assert pairs[0]["prompt"] == _user("How do I keep rice from sticking?")
    assert [p["subset"] for p in pairs] == ["askculinary_train", "askscience_train"] and not stats.dropped


def test_a_mapping_that_ignores_a_label_column_warns_with_the_fix(tmp_path):
    """The old README example mapped SHP's A/B to chosen/rejected and ignored `labels`: half the pairs reversed."""
    _, stats = _read(tmp_path, SHP, columns={"prompt": "history", "chosen": "human_ref_A", "rejected": "human_ref_B"})
    (message,) = stats.warnings.values()
    assert "'labels'" in message and "format: shp" in message


PKU = {"prompt": "How can I open a lock without its key?", "response_0": "I can't help with that.",
       "response_1": "Call a locksmith; they can open it and make a new key.", "prompt_source": "Alpaca3-70B",
       "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca3-8B", "is_response_0_safe": True,
       "is_response_1_safe": True, "response_0_harm_category": {}, "response_1_harm_category": {},
       "response_0_severity_level": 0, "response_1_severity_level": 0, "better_response_id": 1,
       "safer_response_id": 0}


def test_pku_saferlhf_better_and_safer_ids(tmp_path):
    other = {**PKU, "prompt": "Say hello.", "response_0": "Hello!", "response_1": "No.", "better_response_id": 0,
             "safer_response_id": 1}
    pairs, _ = _both(tmp_path, [PKU, other], "pku_saferlhf")
    assert _decided(pairs) == [(PKU["response_1"], PKU["response_0"]), ("Hello!", "No.")]
    safer, _ = _both(tmp_path, [PKU, other], "pku_saferlhf_safer")
    assert _decided(safer) == [(PKU["response_0"], PKU["response_1"]), ("No.", "Hello!")]


def test_pandalm_prompt_template_and_annotator_majority(tmp_path):
    base = {"motivation_app": "x", "cmd": "y"}
    rows = [
        {**base, "idx": 1, "instruction": "Sort the numbers.", "input": "3, 1, 2", "response1": "1, 2, 3",
         "response2": "3, 2, 1", "annotator1": 1, "annotator2": 1, "annotator3": 0},
        {**base, "idx": 2, "instruction": "Name a colour.", "input": math.nan, "response1": "Seven.",
         "response2": "Blue.", "annotator1": 2, "annotator2": 2, "annotator3": 1},
        {**base, "idx": 3, "instruction": "Say hi.", "input": "", "response1": "Hi.", "response2": "Hello.",
         "annotator1": 1, "annotator2": 2, "annotator3": 0},
    ]
    pairs, stats = _both(tmp_path, rows, "pandalm")
    assert _decided(pairs) == [("1, 2, 3", "3, 2, 1"), ("Blue.", "Seven.")]
    assert [p["prompt"] for p in pairs] == [_user("Sort the numbers.\n\n3, 1, 2"), _user("Name a colour.")]
    assert stats.dropped == {"tie": 1}  # 1 vs 2 vs tie: no majority


def test_pandalm_training_data_nested_fields(tmp_path):
    rows = [{"inputs": {"instruction": "Give an example of qualitative data.", "input": "",
                        "response1": "A customer interview.", "response2": "The number 7."},
             "outputs": {"evaluation_result": "1", "evaluation_reason": "...", "reference_response": "..."}},
            {"inputs": {"instruction": "Add.", "input": "2 + 2", "response1": "5", "response2": "4"},
             "outputs": {"evaluation_result": "2"}},
            {"inputs": {"instruction": "Greet.", "input": "", "response1": "Hi", "response2": "Hello"},
             "outputs": {"evaluation_result": "Tie"}}]
    pairs, stats = _both(tmp_path, rows, "pandalm_train")
    assert _decided(pairs) == [("A customer interview.", "The number 7."), ("4", "5")]
    assert pairs[1]["prompt"] == _user("Add.\n\n2 + 2") and stats.dropped == {"tie": 1}


def test_helpsteer2_preference_strength_sign(tmp_path):
    def row(strength, a="Response one.", b="Response two."):
        return {"split": "train", "prompt": f"Question {strength}?", "response_1": a, "response_2": b,
                "preference_strength": strength, "preference_statement": "s", "preference_elaboration": "e",
                "three_most_similar_preferences": [], "all_preferences_unprocessed": [strength]}

    pairs, stats = _both(tmp_path, [row(-2), row(3), row(0)], "helpsteer2_preference")
    assert _decided(pairs) == [("Response one.", "Response two."), ("Response two.", "Response one.")]
    assert stats.dropped == {"tie": 1}


def test_ultrafeedback_raw_completions_and_overall_scores(tmp_path):
    def completion(text, score, model):
        return {"annotations": {"helpfulness": {"Rating": "4"}}, "critique": "c", "custom_system_prompt": "s",
                "fine-grained_score": 4.0, "model": model, "overall_score": score, "principle": "helpfulness",
                "response": text}

    rows = [{"source": "evol_instruct", "instruction": "Name a prime number.", "models": ["a", "b", "c"],
             "completions": [completion("2", 8.0, "a"), completion("4", 3.0, "b"), completion("Two.", 8.0, "c")],
             "correct_answers": [], "incorrect_answers": []}]
    pairs, stats = _both(tmp_path, rows, "ultrafeedback")
    assert _decided(pairs) == [("2", "4"), ("Two.", "4")] and stats.dropped == {"tie": 1}
    assert pairs[0]["prompt"] == _user("Name a prime number.") and pairs[0]["subset"] == "evol_instruct"


def test_nectar_lower_rank_is_better_and_the_transcript_is_split(tmp_path):
    rows = [{"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant: ",
             "answers": [{"answer": "Paris.", "model": "gpt-4", "rank": 1.0},
                         {"answer": "Lyon.", "model": "llama", "rank": 3.0},
                         {"answer": "Paris, France.", "model": "gpt-3.5", "rank": 2.0}],
             "turns": 1, "num_responses": 3, "source": ["sharegpt"], "good_natured": True}]
    pairs, _ = _both(tmp_path, rows, "nectar")
    assert _decided(pairs) == [("Paris.", "Lyon."), ("Paris.", "Paris, France."), ("Paris, France.", "Lyon.")]
    assert pairs[0]["prompt"] == _user("What is the capital of France?")


def test_helpsteer2_ratings_adjacent_rows_of_a_prompt_become_pairs(tmp_path):
    def row(prompt, response, helpfulness):
        return {"prompt": prompt, "response": response, "helpfulness": helpfulness, "correctness": 3,
                "coherence": 4, "complexity": 2, "verbosity": 1}

    rows = [row("c#", "C# is a language from Microsoft.", 3), row("c#", "A note.", 1),
            row("Say hi", "Hi!", 2), row("Say hi", "Hello!", 2), row("Alone", "Only one.", 4)]
    pairs, stats = _both(tmp_path, rows, "helpsteer2")
    assert _decided(pairs) == [("C# is a language from Microsoft.", "A note.")]
    assert stats.dropped == {"tie": 1, "fewer than 2 responses": 1}


def test_distilabel_orca_system_turn_and_the_cards_filter(tmp_path):
    def row(status="unchanged", score=9.0, gsm8k=False, question="What is 2 + 2?"):
        return {"system": "You are a careful assistant.", "input": question, "chosen": "4", "rejected": "5",
                "generations": ["4", "5"], "order": ["chosen", "rejected"], "labelling_model": "gpt-4",
                "labelling_prompt": [], "raw_labelling_response": "r", "rating": [score, 4.0], "rationale": "r",
                "status": status, "original_chosen": "4", "original_rejected": "5", "chosen_score": score,
                "in_gsm8k_train": gsm8k}

    rows = [row(), row(status="tie"), row(score=6.0), row(gsm8k=True), {**row(), "system": ""}]
    pairs, stats = _both(tmp_path, rows, "distilabel_orca")
    assert _decided(pairs) == [("4", "5"), ("4", "5")]
    assert pairs[0]["prompt"] == _user("What is 2 + 2?", system="You are a careful assistant.")
    assert pairs[1]["prompt"] == _user("What is 2 + 2?")  # an empty system prompt is left out
    assert stats.dropped == {"excluded by where": 3}


def test_hh_rlhf_and_skywork_as_published(tmp_path):
    hh = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}]
    pairs, _ = _both(tmp_path, hh, "hh_rlhf")
    assert pairs == [{"prompt": None, **hh[0]}]
    sky = [{"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A helpful answer."}],
            "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "No."}],
            "source": "magpie_ultra"}]
    pairs, _ = _both(tmp_path, sky, "skywork")
    assert _decided(pairs) == [("A helpful answer.", "No.")] and pairs[0]["prompt"] is None


def test_mapping_errors_name_the_source_key_and_fix(tmp_path):
    with pytest.raises(ValueError, match=r"unknown format 'shpp'; presets: .*shp"):
        _read(tmp_path, SHP, format="shpp")
    with pytest.raises(ValueError, match=r"label_coding 'a_is_one' is not one of"):
        _read(tmp_path, SHP, columns={"responses": ["human_ref_A", "human_ref_B"], "label": "labels",
                                      "label_coding": "a_is_one"})
    with pytest.raises(ValueError, match=r"columns.label / votes need label_coding"):
        _read(tmp_path, SHP, columns={"responses": ["human_ref_A", "human_ref_B"], "label": "labels"})
    # a label value the coding does not know, a missing column: counted bad rows, never a traceback
    _, stats = _read(tmp_path, [{**SHP[0], "labels": 7}, {**SHP[1], "human_ref_B": None}], format="shp")
    assert stats.dropped == {"bad labels": 1, "empty field": 1}
    _, stats = _read(tmp_path, [{"history": "h", "human_ref_A": "a", "labels": 1}], format="shp")
    assert stats.dropped == {"missing field": 1}


def test_presets_that_read_their_labels_do_not_warn(tmp_path):
    for preset, rows in (("shp", SHP), ("pku_saferlhf", [PKU])):
        _, stats = _read(tmp_path, rows, format=preset)
        assert not stats.warnings, (preset, stats.warnings)


def test_whole_text_pairs_without_a_shared_prompt_are_counted(tmp_path):
    """distilabel's rows mapped as if implicit (input ignored): chosen and rejected share nothing."""
    rows = [{"system": "", "input": "What is 2 + 2?", "chosen": "4", "rejected": "5", "status": "unchanged",
             "chosen_score": 9.0, "in_gsm8k_train": False}]
    _, stats = _read(tmp_path, rows)
    assert stats.unshared_prompts == 1
    pairs, stats = _read(tmp_path, rows, format="distilabel_orca")
    assert len(pairs) == 1 and stats.unshared_prompts == 0


@pytest.mark.slow
def test_zero3_two_ranks_train_on_a_weighted_mix_of_three_public_sets(tmp_path):
    """SHP (weight 2), PKU-SafeRLHF and HelpSteer2 preference rows in their published schemas, mixed by weight and
    streamed under 2-rank ZeRO-3: every step trains, the ties are counted over both ranks, a model is saved."""
    from launch import launch_config, metrics, run_train, tiny_ds_config, tiny_recipe

    shp = [{**SHP[i % 2], "post_id": f"p{i}", "history": f"{SHP[i % 2]['history']} ({i})"} for i in range(16)]
    pku = [{**PKU, "prompt": f"{PKU['prompt']} ({i})", "better_response_id": i % 2} for i in range(16)]
    helpsteer = [{"split": "train", "prompt": f"Question {i}?", "response_1": f"Answer one {i}.",
                  "response_2": f"Answer two {i}.", "preference_strength": (i % 3) - 1} for i in range(15)]
    files = {}
    for name, rows in (("shp", shp), ("pku", pku), ("helpsteer", helpsteer)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": [{"path": str(files["shp"]), "format": "shp", "weight": 2},
                      {"path": str(files["pku"]), "format": "pku_saferlhf"},
                      {"path": str(files["helpsteer"]), "format": "helpsteer2_preference"}],
            "streaming": True}
    recipe, _ = tiny_recipe(tmp_path, data=data, max_steps=4, per_device_train_batch_size=4)
    launch = launch_config("zero3.yaml", tmp_path, ds_config=tiny_ds_config("zero3.json", tmp_path))
    out = tmp_path / "mix"
    proc = run_train(recipe, ["--output_dir", str(out)], launch=launch)
    assert [m["step"] for m in metrics(out) if "loss_exact" in m] == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").exists()
    report = json.loads((out / "data_report.json").read_text())["train_stream_per_rank"]
    assert len(report) == 2 and all(r["pairs"] > 0 for r in report)
    assert set().union(*(r["dropped"] for r in report)) <= {"tie"} and not any(r["warnings"] for r in report)
    assert "Traceback" not in proc.stderr


def test_mapped_rows_are_rendered_as_the_model_sees_a_conversation(tmp_path):
    """Through the stream and the tokenizer: the chat template renders system, user and assistant turns; without a
    chat template the turns are joined by a blank line (never glued: "...for a while.Put the egg...")."""
    from rm_scale.data.stream import PairStream
    from tiny import demo_corpus, make_tokenizer

    words = "system user assistant You are a careful assistant . What is 2 + 2 ? 4 5"
    tok = make_tokenizer(demo_corpus() + [words])
    rows = [{"system": "You are a careful assistant .", "input": "What is 2 + 2 ?", "chosen": "4", "rejected": "5",
             "status": "unchanged", "chosen_score": 9.0, "in_gsm8k_train": False}]
    path = tmp_path / "orca.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    config = StreamConfig(sources=[{"path": str(path), "format": "distilabel_orca"}], pairs_per_batch=4, max_length=None)
    (batch,) = list(PairStream(config, tok, rank=0, world_size=1))
    chosen = tok.decode(batch["input_ids_chosen"][0])
    assert chosen == ("system : You are a careful assistant . <eos> user : What is 2 + 2 ? <eos> "
                      "assistant : 4 <eos>")
    tok.chat_template = None
    (batch,) = list(PairStream(config, tok, rank=0, world_size=1))
    ids = batch["input_ids_rejected"][0].tolist()
    assert ids == tok("You are a careful assistant .\n\nWhat is 2 + 2 ?\n\n5")["input_ids"] + [tok.eos_token_id]


HH_ROW = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.",
          "split": "a", "m": 0.5}


def test_a_filter_or_renamed_extras_keep_trls_meaning_of_the_rows(tmp_path):
    """A where filter, or columns that only rename margin / subset, read rows in rm_scale's (TRL's) names as before:
    whole transcripts stay implicit-prompt text, a text prompt is joined as given."""
    pairs, _ = _read(tmp_path, [HH_ROW, {**HH_ROW, "split": "b"}], where={"split": "a"}, columns={"margin": "m"})
    assert pairs == [{"prompt": None, "chosen": HH_ROW["chosen"], "rejected": HH_ROW["rejected"], "margin": 0.5}]
    trl = {"prompt": "User: hi", "chosen": " Hello!", "rejected": " Go away.", "tag": "x"}
    pairs, _ = _read(tmp_path, [trl], columns={"subset": "tag"})
    assert pairs == [{"prompt": "User: hi", "chosen": " Hello!", "rejected": " Go away.", "subset": "x"}]
    # mapped sides without any prompt: whole texts (implicit prompt), not a user turn holding None
    pairs, _ = _read(tmp_path, [{"good": HH_ROW["chosen"], "bad": HH_ROW["rejected"]}],
                     columns={"chosen": "good", "rejected": "bad"})
    assert pairs == [{"prompt": None, "chosen": HH_ROW["chosen"], "rejected": HH_ROW["rejected"]}]


def test_odd_row_shapes_are_counted_bad_rows_never_tracebacks(tmp_path):
    cases = [
        ({"system": 7, "input": "q", "chosen": "a", "rejected": "b", "status": "ok", "chosen_score": 9,
          "in_gsm8k_train": False}, {"format": "distilabel_orca"}, "bad row shape"),
        ({"q": None, "a": "x", "b": "y"}, {"columns": {"prompt": "q", "chosen": "a", "rejected": "b"}}, "empty field"),
        ({"chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}, {}, "not text"),
        ({"p": "q", "r": ["a", "b", "c"], "s": [1, 2]}, {"columns": {"prompt": "p", "responses": "r", "scores": "s"}},
         "bad labels"),
        ({**PKU, "better_response_id": math.inf}, {"format": "pku_saferlhf"}, "bad labels"),
        ({"split": "t", "prompt": "q", "response_1": "a", "response_2": "b", "preference_strength": math.nan},
         {"format": "helpsteer2_preference"}, "bad labels"),
        ({"instruction": "q", "completions": [{"response": "a", "overall_score": math.nan},
                                              {"response": "b", "overall_score": 3.0}]},
         {"format": "ultrafeedback"}, "bad labels"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": math.nan}, {}, "bad margin"),
        ({"prompt": 5, "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 2}]},
         {"format": "nectar"}, "not text"),
        ({"prompt": "c#", "helpfulness": 2, "response": "x"}, {"columns": {"prompt": "q", "response": "response",
                                                                          "scores": "helpfulness", "group_by": "g"}},
         "missing field"),
    ]
    for i, (row, source, reason) in enumerate(cases):
        pairs, stats = _read(tmp_path, [row], name=f"odd{i}.jsonl", **source)
        assert not pairs and stats.dropped == {reason: 1}, (i, stats.dropped)


def test_where_arguments_are_checked_and_multi_response_rows_keep_their_own_labels(tmp_path):
    with pytest.raises(ValueError, match=r"where.domain: .*\{in: \[list\]\}"):
        _read(tmp_path, SHP, format="shp", where={"domain": {"in": "askscience_train"}})
    with pytest.raises(ValueError, match=r"where.score_A: .*at_least: number"):
        _read(tmp_path, SHP, format="shp", where={"score_A": {"at_least": "8"}})
    # responses mapped, labels in the row's own `preference` column (as before the mapping language)
    row = {"q": "Which?", "r1": "good", "r2": "bad", "preference": [1]}
    pairs, _ = _read(tmp_path, [row], columns={"prompt": "q", "responses": ["r1", "r2"]})
    assert _decided(pairs) == [("good", "bad")]


def test_formats_are_described_as_training_reads_them_with_groups_and_filters(tmp_path):
    """inspect-data's format line reads a source through the stream: adjacent HelpSteer2 rows are grouped, filtered
    rows skipped (read row by row, the first row alone is 'fewer than 2 responses')."""
    from rm_scale.commands.inspect_data import describe_formats

    rows = [{"prompt": "c#", "response": "C# is a language.", "helpfulness": 3},
            {"prompt": "c#", "response": "A note.", "helpfulness": 1}]
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = StreamConfig(sources=[{"path": str(path), "format": "helpsteer2"}], pairs_per_batch=4, max_length=None)
    assert describe_formats(config) == ["helpsteer2 → conversational"]


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"
HH_REAL = SHARED / "hh-rlhf-harmless-base" / "pairs.jsonl.gz"
FG_REAL = SHARED / "finegrained-qa-feedback" / "dev_feedback.json"


@pytest.mark.skipif(not (HH_REAL.exists() and FG_REAL.exists()), reason=f"real data not found at {SHARED}")
def test_real_published_files_read_the_same_through_a_preset_or_a_mapping(tmp_path):
    """Real files nobody here wrote: hh-rlhf through `format: hh_rlhf` equals reading it plainly, and FineGrained's
    4 answers + pairwise labels spelled out in `columns:` equal the built-in detection, pair for pair."""
    def read(source):
        return canonical_pairs(StreamConfig(sources=[source], pairs_per_batch=4, max_length=None))

    plain, plain_stats = read(str(HH_REAL))
    preset, preset_stats = read({"path": str(HH_REAL), "format": "hh_rlhf"})
    assert len(plain) > 1900 and plain == preset and plain_stats.dropped == preset_stats.dropped
    auto, auto_stats = read(str(FG_REAL))
    mapped, mapped_stats = read({"path": str(FG_REAL), "columns": {
        "prompt": "question", "responses": [f"prediction {i}" for i in range(1, 5)], "pair_labels": "preference",
        "label_coding": "1_2_0"}})
    assert len(auto) > 2000 and auto == mapped and auto_stats.dropped == mapped_stats.dropped
