"""One row → one canonical *group*: a prompt, its K >= 2 responses, and the preferences among them.

``{"prompt", "responses": [...], "edges": [[better, worse, tie], ...], ["margin"], ["subset"], ["left_out"]}``:
responses are assistant turns (rows read through a mapping, as in rm_scale.data.pairs) or texts (rows in TRL's own
columns: one pair, a group of two with one edge); each edge indexes two responses, ``tie`` 1 when the labels tie
them (better and worse then just name the two). A group is what one forward computes: the prompt once, each
response once (rm_scale.data.collate.pack_response_groups); rm_scale.loss scores its edges (`edge_sums`:
Bradley-Terry, ties by Davidson's model) or its ranking (`plackett_luce_sums` over `ranking_tiers`).

A response that cannot be used (empty, not text) is left out with its edges, and identical responses share no edge:
``left_out`` counts them by reason. A group with fewer than two responses or no edge left is ``{"drop": reason}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rm_scale.data.formats import responses_ids, template_kwargs
from rm_scale.data.mapping import RowMapping
from rm_scale.data.pairs import (
    assistant_turn,
    copy_extras,
    read_responses,
    response_mapping,
    response_scores,
    row_errors,
    to_pairs,
    usable_text,
)
from rm_scale.data.sources import BadRow


def to_group(row: Mapping[str, Any], mapping: RowMapping, *, where: str = "") -> dict[str, Any]:
    """The group of one row (see the module docstring); BadRow names the field and the fix."""
    m = response_mapping(row, mapping)
    if m is None:
        (pair,) = to_pairs(row, mapping, where=where)
        tie = pair.get("drop") == "tie" and "chosen" in pair  # a two-score row with equal scores: one tie edge
        if "drop" in pair and not tie:
            return pair
        if "chosen" not in pair:
            raise BadRow("not text", "pre-tokenised rows (token id columns) cannot be read as groups yet; give the "
                         "text, or train them as pairs", where=where)
        extras = {k: pair[k] for k in ("margin", "subset") if k in pair}
        return {"prompt": pair.get("prompt"), "responses": [pair["chosen"], pair["rejected"]],
                "edges": [[0, 1, int(tie)]], **extras}
    with row_errors(where):
        base, texts, winners, first = read_responses(row, m, where)
        scores = response_scores(row, m)
    group = _group(base, texts, winners, first, m, where)
    if scores is not None and "drop" not in group:  # margins from score gaps (score_margin), edge by edge
        group["margins"] = [m.score_margin * abs(scores[i] - scores[j]) for i, j in group.pop("_original")]
    group.pop("_original", None)
    return group


def _group(base: dict[str, Any], texts: list[Any], winners: list[tuple[int | None, Any]], first: Mapping[str, Any],
           m: RowMapping, where: str) -> dict[str, Any]:
    usable = [usable_text(t) for t in texts]
    left_out = Counter({"empty field": usable.count(False)} if not all(usable) else {})
    kept = [k for k, ok in enumerate(usable) if ok]
    new = {k: n for n, k in enumerate(kept)}
    edges, original = [], []
    for good, bad in winners:
        i, j = bad if good is None else (good, bad)
        if i not in new or j not in new:
            continue
        if texts[i] == texts[j]:
            left_out["identical responses"] += 1
            continue
        edges.append([new[i], new[j], int(good is None)])
        original.append((i, j))
    if len(kept) < 2:
        return {**base, "drop": "fewer than 2 responses", "detail": f"{len(kept)} usable response(s) of {len(texts)}"}
    if not edges:
        return {**base, "drop": "no preference", "detail": "no two usable responses are compared"}
    group = {**base, "responses": [assistant_turn(texts[k]) for k in kept], "edges": edges, "_original": original}
    copy_extras(first, m, group, where)
    if left_out:
        group["left_out"] = dict(left_out)
    return group


def keyed_like_pair(group: Mapping[str, Any]) -> Mapping[str, Any]:
    """What identifies a group's prompt (for `pairs.prompt_key` and `pairs.in_eval_split`): the group itself, or, for
    a pair row without a prompt (whole transcripts or conversations), the pair its two responses are, whose prompt
    is their shared beginning -- so a group lands on the same train/eval side as the pair path puts its pair."""
    if group.get("prompt") is not None:
        return group
    first, second = group["responses"][:2]
    return {"chosen": first, "rejected": second}


def ranking_tiers(k: int, edges: Sequence[Sequence[int]]) -> list[int] | None:
    """Each of ``k`` responses' tier (0 = best) from a group's edges: tied responses share a tier, and a response's
    tier is one below the lowest tier of the responses preferred to it (the longest chain above it). Responses no
    edge orders share the top tiers. None when the edges contradict each other (a cycle, or a tie and a preference
    between the same two)."""
    parent = list(range(k))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, tie in edges:
        if tie:
            parent[root(i)] = root(j)
    above: dict[int, set[int]] = {root(x): set() for x in range(k)}
    for i, j, tie in edges:
        if not tie:
            if root(i) == root(j):
                return None
            above[root(j)].add(root(i))
    tier: dict[int, int] = {}
    while len(tier) < len(above):
        ready = [n for n in above if n not in tier and above[n] <= tier.keys()]
        if not ready:
            return None  # a cycle
        for n in ready:
            tier[n] = max((tier[p] + 1 for p in above[n]), default=0)
    return [tier[root(x)] for x in range(k)]


def tokenize_group(group: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Token ids of each response with its prompt, exactly as `tokenize_canonical` tokenises a pair's sides: a text
    prompt joined to each text response as given (TRL), or the conversation (prompt turns + the response turn)
    through the chat template."""
    ids = responses_ids(group.get("prompt"), group["responses"], tokenizer, **template_kwargs(group))
    out = {"input_ids": ids, "edges": [list(e) for e in group["edges"]]}
    out.update({k: group[k] for k in ("margin", "margins", "subset") if k in group})
    return out


# ---- tokenised groups in the stream (rm_scale.data.stream with response_groups) ------------------------------------


def limit_group(group: dict[str, Any], limit: int | None, truncation: str) -> tuple[dict[str, Any] | None, int, str]:
    """``group`` within ``max_length``: (group or None, responses truncated, why it is unusable). "keep_end" keeps each
    sequence's last ``limit`` tokens (the response end, where the reward is read); "drop" leaves an over-long response
    out with its edges, as a pair over max_length is dropped."""
    seqs = group["input_ids"]
    if limit is None or all(len(s) <= limit for s in seqs):
        return group, 0, ""
    if truncation == "keep_end":
        return {**group, "input_ids": [s[-limit:] for s in seqs]}, sum(len(s) > limit for s in seqs), ""
    keep = [k for k, s in enumerate(seqs) if len(s) <= limit]
    new = {k: n for n, k in enumerate(keep)}
    edges = [[new[i], new[j], t] for i, j, t in group["edges"] if i in new and j in new]
    if len(keep) < 2 or not edges:
        return None, 0, f"longer than max_length={limit}"
    margins = group.get("margins")
    out = {**group, "input_ids": [seqs[k] for k in keep], "edges": edges}
    if margins is not None:
        out["margins"] = [m for (i, j, _), m in zip(group["edges"], margins) if i in new and j in new]
    return out, 0, ""


def merge_groups(groups: list[dict[str, Any]], key: Any) -> list[dict[str, Any]]:
    """Groups with the same ``key(group)`` (their prompt) as one group: identical responses (token ids) once, every
    edge kept. What `merge_prompt_pairs` does to the pair rows of one prompt within a stream block; the first group
    gives the subset. Order: by each merged group's first appearance."""
    merged: dict[Any, dict[str, Any]] = {}
    for g in groups:
        k = key(g)
        if k not in merged:
            merged[k] = {**g, "input_ids": [], "edges": [], "margins": [], "_index": {}, "_margin": False}
        m = merged[k]
        where = []
        for seq in g["input_ids"]:
            t = tuple(seq)
            if t not in m["_index"]:
                m["_index"][t] = len(m["input_ids"])
                m["input_ids"].append(seq)
            where.append(m["_index"][t])
        m["edges"] += [[where[i], where[j], t] for i, j, t in g["edges"]]
        m["margins"] += edge_margins(g)
        m["_margin"] = m["_margin"] or "margins" in g or "margin" in g
    out = []
    for m in merged.values():
        if not m.pop("_margin"):
            del m["margins"]
        del m["_index"]
        m.pop("margin", None)
        out.append(m)
    return out


def edge_margins(group: Mapping[str, Any]) -> list[float]:
    """Each edge's margin: the group's own per-edge ``margins``, or its row's ``margin`` on every edge, else 0."""
    if "margins" in group:
        return list(group["margins"])
    return [float(group.get("margin", 0.0))] * len(group["edges"])
