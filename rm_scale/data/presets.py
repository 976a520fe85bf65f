"""Named mappings for the public preference data sets, as published: ``{path: ..., format: shp}``.

Each preset is a `columns:` mapping and a `where:` filter (rm_scale.data.mapping); a source's own ``columns`` /
``where`` keys override the preset's. The README's "Public data sets" table lists them with each set's schema and
license; tests/test_public_sets.py feeds rows in each published schema through them.
"""

from __future__ import annotations

from typing import Any

from rm_scale.data.mapping import parse_mapping

PRESETS: dict[str, dict[str, Any]] = {
    # Anthropic/hh-rlhf: chosen/rejected are whole "\n\nHuman: ...\n\nAssistant: ..." transcripts (implicit prompt).
    "hh_rlhf": {"columns": {}},
    # Skywork/Skywork-Reward-Preference-80K: chosen/rejected are message lists that include the user turn.
    "skywork": {"columns": {}},
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt; chosen/rejected are whole conversations (user turn
    # first), so the prompt is not prepended again. Pairs whose two overall scores are equal are ties (dropped).
    "ultrafeedback_binarized": {"columns": {"scores": ["score_chosen", "score_rejected"]}},
    # openbmb/UltraFeedback: instruction + 4 completions, each with an overall_score (higher is better).
    "ultrafeedback": {"columns": {"prompt": "instruction", "responses": "completions[*].response",
                                  "scores": "completions[*].overall_score", "subset": "source"}},
    # stanfordnlp/SHP: history + two comments; labels 1 = human_ref_A preferred, 0 = human_ref_B.
    "shp": {"columns": {"prompt": "history", "responses": ["human_ref_A", "human_ref_B"], "label": "labels",
                        "label_coding": "a_is_1", "subset": "domain"}},
    # PKU-Alignment/PKU-SafeRLHF: better_response_id is the index (0/1) of the more helpful response;
    # pku_saferlhf_safer uses safer_response_id instead.
    "pku_saferlhf": {"columns": {"prompt": "prompt", "responses": ["response_0", "response_1"],
                                 "label": "better_response_id", "label_coding": "index"}},
    "pku_saferlhf_safer": {"columns": {"prompt": "prompt", "responses": ["response_0", "response_1"],
                                       "label": "safer_response_id", "label_coding": "index"}},
    # berkeley-nest/Nectar: an hh-style transcript prompt and 7 answers ranked 1 (best) .. 7.
    "nectar": {"columns": {"prompt": "prompt", "transcript": True, "responses": "answers[*].answer",
                           "scores": "answers[*].rank", "higher_is_better": False}},
    # nvidia/HelpSteer2 (ratings): one response per row, the rows of a prompt adjacent; helpfulness 0-4.
    "helpsteer2": {"columns": {"prompt": "prompt", "response": "response", "scores": "helpfulness",
                               "group_by": "prompt"}},
    # nvidia/HelpSteer2 preference: preference_strength -3..3, negative = response_1 better, 0 = tie.
    "helpsteer2_preference": {"columns": {"prompt": "prompt", "responses": ["response_1", "response_2"],
                                          "label": "preference_strength", "label_coding": "sign"}},
    # PandaLM's human-annotated test set: instruction + optional input (sometimes NaN), two responses, three
    # annotators (1 = response1, 2 = response2, 0 = tie); the majority decides, no majority is a tie.
    "pandalm": {"columns": {"prompt": "{instruction}\n\n{input}", "responses": ["response1", "response2"],
                            "votes": ["annotator1", "annotator2", "annotator3"], "label_coding": "1_2_0"}},
    # PandaLM's training data: nested inputs / outputs, evaluation_result "1", "2" or "Tie".
    "pandalm_train": {"columns": {"prompt": "{inputs.instruction}\n\n{inputs.input}",
                                  "responses": ["inputs.response1", "inputs.response2"],
                                  "label": "outputs.evaluation_result", "label_coding": "1_2_0"}},
    # argilla/distilabel-intel-orca-dpo-pairs: system + input, chosen/rejected; the card's filter: no ties, a chosen
    # score of at least 8, nothing from GSM8K's train split.
    "distilabel_orca": {"columns": {"system": "system", "prompt": "input", "chosen": "chosen",
                                    "rejected": "rejected"},
                        "where": {"status": {"not": "tie"}, "chosen_score": {"at_least": 8},
                                  "in_gsm8k_train": False}},
}


def preset_mapping(name: str, *, source: str = "") -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"{source}: unknown format {name!r}; presets: {', '.join(sorted(PRESETS))} "
                         "(README, 'Public data sets'), or describe the columns with `columns:`.")
    return PRESETS[name]


def presets_reading(columns: set[str]) -> list[str]:
    """The presets whose mapping reads only columns the row has (suggestions for a warning)."""
    out = []
    for name, spec in PRESETS.items():
        mapping = parse_mapping(spec["columns"], spec.get("where"))
        used = mapping.used_columns()
        if spec["columns"] and used and used <= columns:
            out.append(name)
    return out
