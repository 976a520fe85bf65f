"""One row → zero or more canonical pairs ``{"prompt", "chosen", "rejected", ["margin"], ["subset"]}``.

Text, messages, or pre-tokenised ids; a pair that cannot be used is a marker ``{"drop": reason}`` (counted while
the row's other pairs are kept); a row that cannot be used at all raises `BadRow` with the field and the fix. How
the row's columns are read is its source's `RowMapping` (rm_scale.data.mapping).

Rows in rm_scale's (TRL's) own column names keep TRL's meaning: a text ``prompt`` is joined to each response as is.
Rows read through a mapping become conversations (prompt = user turn, response = assistant turn).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rm_scale.data.formats import PRETOKENIZED
from rm_scale.data.mapping import (
    FieldError,
    RowMapping,
    better_index,
    get_list,
    get_value,
    is_finite_number,
    majority,
)
from rm_scale.data.sources import BadRow

GROUP = "_group"  # a record of adjacent rows that share a prompt (columns.group_by), read together


def to_pairs(row: Mapping[str, Any], mapping: RowMapping, *, where: str = "") -> list[dict[str, Any]]:
    """Canonical pairs from one row (several for a multi-response row); BadRow names the field and the fix."""
    with row_errors(where):
        return _pairs(row, mapping, where)


@contextlib.contextmanager
def row_errors(where: str) -> Iterator[None]:
    """A missing field or a field of an unexpected shape while reading a row becomes a BadRow naming it."""
    try:
        yield
    except FieldError as e:
        raise BadRow("missing field", str(e), where=where, field_name=e.name) from None
    except (TypeError, AttributeError, IndexError, KeyError, OverflowError) as e:  # a field of an unexpected shape
        raise BadRow("bad row shape", f"a field has an unexpected type or shape ({type(e).__name__}: {e}); check the "
                     "row against the source's columns: mapping (rm-scale inspect-data --config ...)",
                     where=where) from None


def response_mapping(row: Mapping[str, Any], mapping: RowMapping) -> RowMapping | None:
    """The mapping that reads ``row`` as several responses with labels, or None for a row that is one pair."""
    if mapping.multi_response:
        return mapping
    numbered = _numbered_responses(row) if mapping.is_empty else []
    if not numbered:
        return None
    # FineGrainedRLHF-style rows: "prediction 1".."prediction N" + pairwise "preference" (or "scores")
    scores = "scores" if "scores" in row and "preference" not in row else None
    return RowMapping(prompt="question", responses=tuple(numbered), scores=scores,
                      pair_labels=None if scores else "preference", label_coding="1_2_0")


def _pairs(row: Mapping[str, Any], mapping: RowMapping, where: str) -> list[dict[str, Any]]:
    responses = response_mapping(row, mapping)
    if responses is not None:
        return _response_pairs(row, responses, where)
    if mapping.is_empty and (all(k in row for k in PRETOKENIZED) or {"chosen_ids", "rejected_ids"} <= set(row)):
        return [_passthrough(row, mapping)]
    return [_one_pair(row, mapping, where)]


# ---- one pair per row ---------------------------------------------------------------------------------------------


def _one_pair(row: Mapping[str, Any], m: RowMapping, where: str) -> dict[str, Any]:
    names = {"chosen": m.chosen or "chosen", "rejected": m.rejected or "rejected"}
    if m.is_empty and not {"chosen", "rejected"} <= set(row):
        missing = next(n for n in ("chosen", "rejected") if n not in row)
        raise BadRow("missing field", f"no field {missing!r} (columns: {_listing(row)}); map your column names with "
                     "the data source's `columns: {chosen: ..., rejected: ...}` or a `format:` preset", where=where,
                     field_name=missing)
    sides = {side: get_value(row, name) for side, name in names.items()}
    for side, value in sides.items():
        _check_text(value, names[side], where)
    if isinstance(sides["chosen"], list) != isinstance(sides["rejected"], list):
        raise BadRow("not text", f"fields {names['chosen']!r} and {names['rejected']!r} must both be text or both be "
                     "message lists; fix or drop the row", where=where, field_name=names["rejected"])
    prompt_name = m.prompt or "prompt"
    prompt = get_value(row, m.prompt) if m.prompt else row.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise BadRow("not text", f"field {prompt_name!r} must be a string or a list of messages; fix or drop "
                     "the row", where=where, field_name=prompt_name)
    if m.prompt and (prompt is None or (isinstance(prompt, str) and not prompt.strip())):
        raise BadRow("empty field", f"the prompt ({m.prompt!r}) is empty for this row; fill it or drop the row",
                     where=where, field_name=m.prompt)
    if isinstance(prompt, list) and not isinstance(sides["chosen"], list):
        raise BadRow("not text", f"field {prompt_name!r} is a message list but the responses are text: give messages "
                     "for both, or text for both", where=where, field_name=prompt_name)
    if sides["chosen"] == sides["rejected"]:
        raise BadRow("identical chosen and rejected", f"fields {names['chosen']!r} and {names['rejected']!r} are "
                     "identical: the pair carries no preference; drop the row", where=where,
                     field_name=names["chosen"])
    system = get_value(row, m.system) if m.system else None
    if isinstance(sides["chosen"], list):  # messages: a text prompt becomes the user turn
        pair = {"prompt": _message_prompt(prompt, system, sides["chosen"]), **sides}
    elif not renames_text(m) or (prompt is None and not system):
        # TRL's text format: prompt + response as given, or whole transcripts (implicit prompt); a mapping that only
        # adds labels (scores: [score_chosen, score_rejected]) keeps it, so its rows render as the same text rows
        pair = {"prompt": prompt, **sides}
    else:
        pair = {"prompt": _prompt_messages(prompt, system, m), "chosen": assistant_turn(sides["chosen"]),
                "rejected": assistant_turn(sides["rejected"])}
    copy_extras(row, m, pair, where)
    if isinstance(m.scores, tuple) and len(m.scores) == 2:  # the two sides' scores: equal is a tie
        good, bad = (get_value(row, c) for c in m.scores)
        if not (is_finite_number(good) and is_finite_number(bad)):
            raise BadRow("bad labels", f"scores {list(m.scores)} must be numbers, got {good!r} and {bad!r}",
                         where=where, field_name=m.scores[0])
        if good == bad:  # the sides stay in the marker: a group (ties: tie_model) trains on the tie
            return {**pair, "drop": "tie"}
        if good < bad:
            return {"prompt": pair["prompt"], "drop": "chosen scored below rejected"}
        if m.score_margin:
            pair["margin"] = m.score_margin * float(good - bad)
    return pair


def renames_text(m: RowMapping) -> bool:
    """Whether a mapping names the prompt or response columns (its rows then become conversations)."""
    return bool(m.prompt or m.system or m.transcript or m.chosen or m.rejected)


def _message_prompt(prompt: Any, system: str | None, chosen: list[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """The prompt of message-list sides. Sides that start with a user or system turn are whole conversations (as in
    ultrafeedback_binarized, whose string prompt repeats their first turn): nothing is prepended."""
    if chosen and chosen[0].get("role") != "assistant":
        return None
    if isinstance(prompt, str):
        return _turns(system, prompt)
    return list(prompt) if prompt else None


def _system_turn(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system and system.strip() else []


def _turns(system: str | None, user: str) -> list[dict[str, str]]:
    return _system_turn(system) + [{"role": "user", "content": user}]


def _prompt_messages(prompt: Any, system: str | None, m: RowMapping) -> list[dict[str, Any]]:
    if isinstance(prompt, list):
        return _system_turn(system) + list(prompt)
    if m.transcript:
        if not isinstance(prompt, str):
            raise BadRow("not text", f"transcript prompt must be text, got {type(prompt).__name__}")
        return transcript_messages(prompt)
    return _turns(system, prompt)


def assistant_turn(text: Any) -> list[dict[str, Any]]:
    return list(text) if isinstance(text, list) else [{"role": "assistant", "content": text}]


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def transcript_messages(text: str) -> list[dict[str, str]]:
    """An Anthropic-style transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, ending with an empty
    ``Assistant:``) as messages."""
    parts = _TURN.split(text)
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        if content.strip():
            messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if not messages:
        messages = [{"role": "user", "content": text.strip()}]
    return messages


# ---- several responses per row (or per group of rows) -------------------------------------------------------------


def _response_pairs(row: Mapping[str, Any], m: RowMapping, where: str) -> list[dict[str, Any]]:
    """N responses with a label naming the better one, votes, pairwise labels (pairs i<j in order) or scores."""
    base, texts, winners, first = read_responses(row, m, where)
    scores = response_scores(row, m)
    pairs = []
    for good, bad in winners:
        if good is None:  # a tie between the two responses of ``bad``
            pairs.append({**base, "drop": "tie"})
        elif not (usable_text(texts[good]) and usable_text(texts[bad])):
            empty = good if not usable_text(texts[good]) else bad
            pairs.append({**base, "drop": "empty field", "detail": f"response {empty + 1} of {len(texts)} "
                          f"({_response_name(m, empty)}) is empty or not text; fill it or drop the row"})
        elif texts[good] == texts[bad]:
            pairs.append({**base, "drop": "identical chosen and rejected"})
        else:
            pair = {**base, "chosen": assistant_turn(texts[good]), "rejected": assistant_turn(texts[bad])}
            copy_extras(first, m, pair, where)
            if scores is not None:
                pair["margin"] = m.score_margin * abs(scores[good] - scores[bad])
            pairs.append(pair)
    return pairs


def response_scores(row: Mapping[str, Any], m: RowMapping) -> list[float] | None:
    """Each response's score, when the mapping turns score gaps into margins (``score_margin``); read after `_edges`
    checked that the scores are finite numbers, one per response."""
    if not m.score_margin or not m.scores:
        return None
    rows = row[GROUP] if GROUP in row else [row]
    scores = [get_value(r, m.scores) for r in rows] if m.response else get_list(rows[0], m.scores)
    return [float(x) for x in scores]


def usable_text(text: Any) -> bool:
    """A response of a multi-response row that can be trained on: non-empty text."""
    return isinstance(text, str) and bool(text.strip())


def read_responses(row: Mapping[str, Any], m: RowMapping, where: str
                   ) -> tuple[dict[str, Any], list[Any], list[tuple[int | None, Any]], Mapping[str, Any]]:
    """A multi-response row's ``{"prompt": ...}``, its response texts, its edges (`_edges`) and its first row."""
    rows = row[GROUP] if GROUP in row else [row]
    first = rows[0]
    if m.group_by and m.group_by not in first:
        raise BadRow("missing field", f"no field {m.group_by!r} (columns.group_by) in this row; fix the mapping or "
                     "drop the row", where=where, field_name=m.group_by)
    if m.response is not None:
        texts = [get_value(r, m.response) for r in rows]
    else:
        texts = get_list(first, m.responses)
    prompt_spec = m.prompt or ("prompt" if "prompt" in first else "question")
    prompt = get_value(first, prompt_spec)
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise BadRow("not text", f"field {prompt_spec!r} (the prompt) must be text or messages, got "
                     f"{type(prompt).__name__}; fix or drop the row", where=where, field_name=prompt_spec)
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise BadRow("missing field", f"a multi-response row needs a prompt: field {prompt_spec!r} is empty; set "
                     "columns.prompt", where=where, field_name=prompt_spec)
    if len(texts) < 2:
        raise BadRow("fewer than 2 responses", f"{len(texts)} response(s) for this prompt: a preference needs two "
                     "or more; drop the row", where=where)
    winners = _edges(first, rows, texts, m, where)
    base = {"prompt": _prompt_messages(prompt, get_value(first, m.system) if m.system else None, m)}
    return base, texts, winners, first


def _edges(first: Mapping[str, Any], rows: list[Mapping[str, Any]], texts: list[Any], m: RowMapping,
           where: str) -> list[tuple[int | None, Any]]:
    """(better, worse) index pairs of the responses; a tie is (None, (i, j))."""
    n = len(texts)
    index_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    try:
        if m.pair_labels:
            labels = get_value(first, m.pair_labels)
            if not isinstance(labels, list) or len(labels) != len(index_pairs):
                got = f"{len(labels)} labels" if isinstance(labels, list) else f"{type(labels).__name__} {labels!r}"
                raise ValueError(f"field {m.pair_labels!r} needs {len(index_pairs)} labels (one per pair i<j of "
                                 f"{n} responses), got {got}")
            best = [better_index(v, m.label_coding or "1_2_0", 2) for v in labels]
            return [((i, j)[b], (i, j)[1 - b]) if b is not None else (None, (i, j))
                    for (i, j), b in zip(index_pairs, best)]
        if m.label or m.votes:
            columns = [m.label] if m.label else list(m.votes)
            best = majority([better_index(get_value(first, c), m.label_coding, n) for c in columns])
            if best is None:
                return [(None, (i, j)) for i, j in index_pairs]
            return [(best, j) for j in range(n) if j != best]
        if m.scores:
            scores = [get_value(r, m.scores) for r in rows] if m.response else get_list(first, m.scores)
            if len(scores) != n:
                raise ValueError(f"{len(scores)} scores for {n} responses")
            return _score_edges(scores, index_pairs, higher_is_better=m.higher_is_better)
        if "preference" in first or "scores" in first:  # as before the mapping language: the row's own labels
            fallback = RowMapping(responses=m.responses, pair_labels="preference" if "preference" in first else None,
                                  scores=None if "preference" in first else "scores", label_coding="1_2_0")
            return _edges(first, rows, texts, fallback, where)
    except FieldError:
        raise
    except (TypeError, ValueError) as e:
        raise BadRow("bad labels", f"{e}; fix the row or the source's label_coding", where=where,
                     field_name=m.pair_labels or m.label or (m.votes or [""])[0] or str(m.scores)) from None
    raise BadRow("bad labels", "a multi-response row needs columns.label (+ label_coding), votes, pair_labels or "
                 "scores to say which response is better", where=where)


def _score_edges(scores: Sequence[Any], index_pairs: list[tuple[int, int]], *,
                 higher_is_better: bool) -> list[tuple[int | None, Any]]:
    if not all(is_finite_number(s) for s in scores):
        raise ValueError(f"scores must be finite numbers, got {list(scores)!r}")
    out: list[tuple[int | None, Any]] = []
    for i, j in index_pairs:
        if scores[i] == scores[j]:
            out.append((None, (i, j)))
        elif (scores[i] > scores[j]) == higher_is_better:
            out.append((i, j))
        else:
            out.append((j, i))
    return out


def _response_name(m: RowMapping, index: int) -> str:
    if isinstance(m.responses, tuple):
        return repr(m.responses[index])
    return f"{m.responses or m.response}[{index}]"


# ---- shared helpers -----------------------------------------------------------------------------------------------


def _listing(row: Mapping[str, Any]) -> str:
    names = sorted(row)
    return ", ".join(map(repr, names[:20])) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def _check_text(value: Any, name: str, where: str) -> None:
    if isinstance(value, list):
        if not value or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
            raise BadRow("not text", f"field {name!r} is a list but not of {{role, content}} messages; fix or drop "
                         "the row", where=where, field_name=name)
        return
    if not isinstance(value, str):
        raise BadRow("not text", f"field {name!r} must be a string (or messages), got {type(value).__name__}; fix or "
                     "drop the row", where=where, field_name=name)
    if not value.strip():
        raise BadRow("empty field", f"field {name!r} is empty; fill it or drop the row", where=where, field_name=name)


def copy_extras(row: Mapping[str, Any], m: RowMapping, pair: dict[str, Any], where: str) -> None:
    margin, subset = m.margin or "margin", m.subset or "subset"
    if row.get(margin) is not None:
        try:
            pair["margin"] = float(row[margin])
        except (TypeError, ValueError):
            raise BadRow("bad margin", f"field {margin!r} must be a number", where=where, field_name=margin) from None
        if not math.isfinite(pair["margin"]):
            raise BadRow("bad margin", f"field {margin!r} is {row[margin]!r}: a margin must be finite", where=where,
                         field_name=margin)
    if row.get(subset) is not None:
        pair["subset"] = str(row[subset])


def _passthrough(row: Mapping[str, Any], m: RowMapping) -> dict[str, Any]:
    keys = PRETOKENIZED if all(k in row for k in PRETOKENIZED) else ("chosen_ids", "rejected_ids", "prompt_ids")
    pair = {k: list(row[k]) for k in keys if k in row and row[k] is not None}
    copy_extras(row, m, pair, "")
    return pair


def _numbered_responses(row: Mapping[str, Any]) -> list[str]:
    names = sorted((k for k in row if k.startswith("prediction ") and k.split()[-1].isdigit()),
                   key=lambda k: int(k.split()[-1]))
    return names if len(names) >= 2 and ("preference" in row or "scores" in row) else []


# ---- prompts ------------------------------------------------------------------------------------------------------


def prompt_key(pair: Mapping[str, Any]) -> str:
    """What identifies the prompt of a pair, for splitting train/eval by prompt (never by pair)."""
    prompt = pair.get("prompt")
    if prompt is None and isinstance(pair.get("chosen"), str):
        prompt = implicit_prompt(pair["chosen"], pair["rejected"])
    elif prompt is None and isinstance(pair.get("chosen"), list):  # whole conversations: all turns but the last
        prompt = pair["chosen"][:-1]
    return json.dumps(prompt, sort_keys=True)


def implicit_prompt(chosen: str, rejected: str) -> str:
    """The shared beginning of two transcripts, cut back to the last turn marker (hh-rlhf style)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    shared = chosen[:n]
    cut = shared.rfind("\n\nAssistant:")
    return shared[: cut + len("\n\nAssistant:")] if cut >= 0 else shared


def in_eval_split(pair: Mapping[str, Any], fraction: float, seed: int) -> bool:
    """Deterministic split by prompt hash: every pair of a prompt lands on the same side."""
    digest = hashlib.sha256(f"{seed}/{prompt_key(pair)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
