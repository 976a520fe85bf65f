"""The mapping language: how a row of a published preference data set becomes canonical pairs, without user code.

A source's ``columns:`` (or a named preset, `rm_scale.data.presets`) says where each part of a pair is:

- ``prompt`` / ``system``: a column, or a template over columns (``"{instruction}\\n\\n{input}"``; an empty part
  is left out with the separator before it);
- ``chosen`` / ``rejected``: columns (text or message lists), for rows that are one pair;
- ``responses``: several columns (``[response_0, response_1]``), one column holding a list, or a path into a list
  of dicts (``completions[*].response``); which one is better comes from
  ``label`` + ``label_coding`` (one scalar naming the better response), ``votes`` (several such columns; the
  majority wins), ``pair_labels`` (one label per pair i<j), or ``scores`` (a list, columns or a path; with
  ``higher_is_better: false`` for ranks);
- ``response`` + ``scores`` + ``group_by``: one response per row, adjacent rows with the same ``group_by`` value
  form one prompt's responses (HelpSteer2's ratings);
- ``margin``, ``subset``: columns passed on; ``score_margin: c`` (with ``scores``): each pair's margin is c x its
  score gap (Llama 2's margin from rating differences), in place of a margin column; ``where`` (on the source): keep
  only rows that match;
- ``transcript: true``: the prompt is an Anthropic-style transcript (``"\n\nHuman: ...\n\nAssistant:"``), split
  into turns.

Rows read through a mapping become conversations: the prompt is the user turn (after an optional system turn), each
response an assistant turn, rendered by the tokenizer's chat template (or joined with a blank line when it has none;
`rm_scale.data.formats`). Anything this cannot say, `datasets.map` in Python can.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# label_coding: label value -> index of the better response (0 = first); None = a tie. Unknown values are bad rows.
LABEL_CODINGS = {
    "index": "0/1/...: the index of the better response (PKU-SafeRLHF better_response_id)",
    "a_is_1": "1: the first response is better, 0: the second (SHP labels)",
    "1_2_0": "1: the first is better, 2: the second, 0 or 'Tie': a tie (PandaLM, FineGrained preference)",
    "sign": "< 0: the first is better, > 0: the second, 0: a tie (HelpSteer2 preference_strength)",
    "sign_first_positive": "> 0: the first is better, < 0: the second, 0: a tie",
}
MAPPING_KEYS = ("prompt", "system", "transcript", "chosen", "rejected", "responses", "response", "label",
                "label_coding", "votes", "pair_labels", "scores", "higher_is_better", "group_by", "margin", "subset",
                "score_margin")
WHERE_OPS = ("not", "in", "not_in", "at_least", "at_most")


@dataclass(frozen=True)
class RowMapping:
    """A parsed ``columns:`` mapping (see the module docstring). Empty: the row already uses rm_scale's names."""

    prompt: str | None = None
    system: str | None = None
    transcript: bool = False  # the prompt is an Anthropic-style transcript ("\n\nHuman: ...\n\nAssistant:")
    chosen: str | None = None
    rejected: str | None = None
    responses: tuple[str, ...] | str | None = None
    response: str | None = None
    label: str | None = None
    label_coding: str | None = None
    votes: tuple[str, ...] | None = None
    pair_labels: str | None = None
    scores: tuple[str, ...] | str | None = None
    higher_is_better: bool = True
    group_by: str | None = None
    margin: str | None = None
    subset: str | None = None
    score_margin: float | None = None  # margin = score_margin x |score gap| (needs scores)
    where: dict[str, Any] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """No column mapping (a `where` filter or renamed margin / subset columns do not count): the row uses
        rm_scale's (TRL's) names and meaning."""
        return not (self.prompt or self.system or self.transcript or self.chosen or self.rejected
                    or self.multi_response or self.label or self.votes or self.pair_labels or self.scores)

    @property
    def multi_response(self) -> bool:
        return self.responses is not None or self.response is not None

    def used_columns(self) -> set[str]:
        """The row's columns this mapping reads (top-level names)."""
        out: set[str] = set(self.where)
        for name in MAPPING_KEYS:
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if isinstance(v, str) and name != "label_coding":
                    out.update(template_fields(v) if "{" in v else {v.split("[")[0].split(".")[0]})
        return out


def parse_mapping(columns: Mapping[str, Any] | None, where: Mapping[str, Any] | None = None, *,
                  source: str = "") -> RowMapping:
    """Validate a ``columns:`` mapping and a ``where:`` filter; the error names the source, the key and the fix."""
    columns = dict(columns or {})
    unknown = set(columns) - set(MAPPING_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)} in columns; allowed: {list(MAPPING_KEYS)} "
                         "(README, 'Data').")
    for key in ("responses", "votes", "scores"):
        if isinstance(columns.get(key), list):
            columns[key] = tuple(columns[key])
    m = RowMapping(**columns, where=dict(where or {}))
    _check(m, source)
    return m


def _check(m: RowMapping, source: str) -> None:
    if m.score_margin is not None and (not m.scores or isinstance(m.score_margin, bool)
                                       or not isinstance(m.score_margin, (int, float)) or not m.score_margin > 0):
        raise ValueError(f"{source}: columns.score_margin must be a number > 0 (the margin per unit of score gap) "
                         f"and needs columns.scores; got score_margin={m.score_margin!r}, scores={m.scores!r}.")
    if m.label_coding is not None and m.label_coding not in LABEL_CODINGS:
        raise ValueError(f"{source}: label_coding {m.label_coding!r} is not one of {sorted(LABEL_CODINGS)}: "
                         + "; ".join(f"{k}: {v}" for k, v in LABEL_CODINGS.items()))
    if (m.label or m.votes) and not m.label_coding:
        raise ValueError(f"{source}: columns.label / votes need label_coding (one of {sorted(LABEL_CODINGS)}).")
    if (m.label or m.votes or m.pair_labels) and not m.responses:
        raise ValueError(f"{source}: a label names one of several responses: set columns.responses too "
                         "(e.g. [response_0, response_1]).")
    if m.scores is not None and not m.multi_response and not (isinstance(m.scores, tuple) and len(m.scores) == 2):
        raise ValueError(f"{source}: with chosen/rejected rows, columns.scores names the two sides' score columns "
                         "([chosen score, rejected score]; equal scores make a tie); for several responses set "
                         "columns.responses.")
    if m.responses is not None and (m.chosen or m.rejected):
        raise ValueError(f"{source}: columns.responses and chosen/rejected exclude each other: a row is either "
                         "several responses with labels or scores, or one chosen/rejected pair.")
    if m.response is not None and not (m.group_by and m.scores):
        raise ValueError(f"{source}: columns.response (one response per row) needs group_by (the column that "
                         "identifies a prompt's rows) and scores.")
    if m.group_by and m.response is None:
        raise ValueError(f"{source}: group_by needs columns.response (the one response of each row) and scores.")
    for column, cond in m.where.items():
        if not isinstance(cond, Mapping):
            continue
        op, arg = next(iter(cond.items())) if len(cond) == 1 else (None, None)
        ok = op in WHERE_OPS and (
            (op in ("in", "not_in") and isinstance(arg, list))
            or (op in ("at_least", "at_most") and isinstance(arg, (int, float)) and not isinstance(arg, bool))
            or op == "not")
        if not ok:
            raise ValueError(f"{source}: where.{column}: use a value (equal), or one of {{not: v}}, {{in: [list]}}, "
                             f"{{not_in: [list]}}, {{at_least: number}}, {{at_most: number}}; got {dict(cond)}.")


# ---- reading fields -------------------------------------------------------------------------------------------------


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def render(template: str, row: Mapping[str, Any]) -> str:
    """``template`` with each ``{column}`` filled; an empty or missing part is left out with the text before it."""
    out, emitted = [], False
    pending = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        pending += literal
        if name is None:
            continue
        value = _lookup(row, name)
        value = "" if value is None or (isinstance(value, float) and value != value) else str(value)  # NaN: empty
        if value.strip():
            out.append((pending if emitted or not _is_separator(pending) else pending.lstrip("\n ")) + value)
            emitted = True
        pending = ""
    if emitted and pending.strip():
        out.append(pending)
    return "".join(out)


def _is_separator(text: str) -> bool:
    return not text.strip()


class FieldError(ValueError):
    """A field the mapping names is missing or has the wrong shape; `name` is what the mapping called it."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


def get_value(row: Mapping[str, Any], spec: str) -> Any:
    """A column (``col``), a path into a list of dicts (``col[*].field``), or a template (``"{a} {b}"``)."""
    if "{" in spec:
        return render(spec, row)
    if "[*]" in spec:
        column, _, rest = spec.partition("[*]")
        items = _column(row, column)
        if not isinstance(items, list):
            raise FieldError(column, f"field {column!r} must be a list (for {spec!r}), got {type(items).__name__}")
        key = rest.lstrip(".")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or (key and key not in item):
                raise FieldError(spec, f"{column}[{i}] has no field {key!r} (for {spec!r})")
            out.append(item[key] if key else item)
        return out
    return _column(row, spec)


def _lookup(row: Mapping[str, Any], name: str) -> Any:
    """``row[name]``, or for a dotted name (``inputs.instruction``) the field inside a nested dict; None if absent."""
    value: Any = row
    for part in name.split(".") if name not in row else [name]:
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _column(row: Mapping[str, Any], name: str) -> Any:
    if "." in name and name not in row and _lookup(row, name) is not None:
        return _lookup(row, name)
    if name not in row:
        shown = sorted(row)
        listing = ", ".join(map(repr, shown[:20])) + (f" and {len(shown) - 20} more" if len(shown) > 20 else "")
        raise FieldError(name, f"no field {name!r} (the row has {listing}); fix the source's columns: mapping")
    return row[name]


def get_list(row: Mapping[str, Any], spec: str | tuple[str, ...]) -> list[Any]:
    """Several columns, one column holding a list, or a path."""
    if isinstance(spec, tuple):
        return [_column(row, c) for c in spec]
    value = get_value(row, spec)
    if not isinstance(value, list):
        raise FieldError(spec, f"field {spec!r} must be a list, got {type(value).__name__}")
    return value


def matches(row: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """Whether a row passes the source's ``where`` filter."""
    for column, cond in where.items():
        value = _lookup(row, column)
        if isinstance(cond, Mapping):
            op, arg = next(iter(cond.items()))
            if op in ("at_least", "at_most"):
                ok = is_finite_number(value) and (value >= arg if op == "at_least" else value <= arg)
            else:
                ok = {"not": value != arg, "in": value in (arg or []), "not_in": value not in (arg or [])}[op]
        else:
            ok = value == cond
        if not ok:
            return False
    return True


# ---- guards -------------------------------------------------------------------------------------------------------

_LABEL_LIKE = re.compile(r"^(labels?|.*_id|preference.*|annotator.*|score.*|.*_score|rank.*|rating.*|winner.*)$", re.I)


def ignored_label_columns(row: Mapping[str, Any], mapping: RowMapping) -> list[str]:
    """Columns that look like a preference label (name and small numeric value) which the mapping does not read:
    ignoring one (SHP's ``labels``) silently reverses about half the pairs. Only for mappings that read no
    preference signal of their own (a plain chosen/rejected mapping)."""
    if mapping.label or mapping.votes or mapping.pair_labels or mapping.scores:
        return []
    used = mapping.used_columns() | {"chosen", "rejected", "prompt", "margin", "subset"}

    def small_number(v: Any) -> bool:
        if isinstance(v, list):
            return bool(v) and all(small_number(x) for x in v)
        return isinstance(v, (bool, int, float)) and not (isinstance(v, float) and v != v) and abs(v) <= 10

    return sorted(c for c, v in row.items() if c not in used and _LABEL_LIKE.match(c) and small_number(v))


# ---- labels -------------------------------------------------------------------------------------------------------


def better_index(value: Any, coding: str, n: int) -> int | None:
    """The index of the better of ``n`` responses that a label value names under ``coding``; None for a tie.
    ValueError for a value the coding does not know."""
    if not (is_finite_number(value) or (isinstance(value, str) and coding == "1_2_0")):
        raise ValueError(f"label {value!r} is not a finite number")
    if coding == "index":
        if value != int(value) or not 0 <= value < n:
            raise ValueError(f"label {value!r} is not a response index 0..{n - 1}")
        return int(value)
    if coding == "a_is_1":
        if value not in (0, 1):
            raise ValueError(f"label {value!r}: a_is_1 expects 1 (first better) or 0 (second better)")
        return 0 if value == 1 else 1
    if coding == "1_2_0":
        if isinstance(value, str):  # PandaLM's training data: "1", "2", "Tie"
            value = 0 if value.strip().lower() == "tie" else int(value) if value.strip() in ("0", "1", "2") else value
        if value not in (0, 1, 2):
            raise ValueError(f"label {value!r}: 1_2_0 expects 1 (first), 2 (second) or 0 (tie)")
        return None if value == 0 else int(value) - 1
    first_better = value < 0 if coding == "sign" else value > 0
    return None if value == 0 else (0 if first_better else 1)


def majority(indices: Sequence[int | None]) -> int | None:
    """The response most votes name (a tie vote counts for neither); None when no response has the most votes."""
    counts: dict[int | None, int] = {}
    for i in indices:
        counts[i] = counts.get(i, 0) + 1
    best = max(counts.values())
    winners = [i for i, c in counts.items() if c == best]
    return winners[0] if len(winners) == 1 else None


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
