"""Loss terms over K-response groups (rm_scale.loss): edges with ties (Davidson), Plackett-Luce, best-of-K.

Each is checked as a likelihood (the outcomes' probabilities sum to 1), against Bradley-Terry where they must equal
it (K = 2, no ties), and against hand-written formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rm_scale.loss import best_of_k_correct, bradley_terry_sums, edge_sums, plackett_luce_sums


def _rewards(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)


def test_edges_without_ties_are_bradley_terry_with_its_gradient():
    r = _rewards(6)
    better, worse = torch.tensor([0, 2, 4, 0]), torch.tensor([1, 3, 5, 5])
    margin = torch.tensor([0.5, 0.0, 1.0, 0.2], dtype=torch.float64)
    for tie_strength in (None, 1e-12):  # Davidson's nu -> 0 is Bradley-Terry
        ours = edge_sums(r, better, worse, margin=margin, tie_strength=tie_strength)
        (g_ours,) = torch.autograd.grad(ours.loss, r)
        bt = bradley_terry_sums(r[better], r[worse], margin=margin)
        (g_bt,) = torch.autograd.grad(bt.bt, r)
        assert torch.allclose(ours.loss, bt.bt, atol=1e-9) and torch.allclose(g_ours, g_bt, atol=1e-9)
        assert ours.correct == bt.correct and ours.num_edges == 4 and ours.num_ties == 0


@pytest.mark.parametrize("nu", [0.3, 1.0, 4.0])
def test_davidson_outcomes_sum_to_one_and_match_the_formula(nu):
    r = _rewards(2, seed=3)
    i, j = torch.tensor([0]), torch.tensor([1])
    tie = torch.tensor([True])
    p_ij = math.exp(-edge_sums(r, i, j, tie_strength=nu).loss.item())
    p_ji = math.exp(-edge_sums(r, j, i, tie_strength=nu).loss.item())
    p_tie = math.exp(-edge_sums(r, i, j, tie=tie, tie_strength=nu).loss.item())
    assert abs(p_ij + p_ji + p_tie - 1) < 1e-12
    a, b = math.exp(r[0].item()), math.exp(r[1].item())
    d = a + b + nu * math.sqrt(a * b)
    assert abs(p_ij - a / d) < 1e-12 and abs(p_tie - nu * math.sqrt(a * b) / d) < 1e-12


def test_ties_are_left_out_or_modelled():
    r = _rewards(4, seed=1)
    better, worse = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])
    tie = torch.tensor([False, True, False])
    dropped = edge_sums(r, better, worse, tie=tie)
    only_prefs = edge_sums(r, better[~tie], worse[~tie])
    assert torch.allclose(dropped.loss, only_prefs.loss) and dropped.num_edges == 2 and dropped.num_ties == 0
    modelled = edge_sums(r, better, worse, tie=tie, tie_strength=1.0)
    assert modelled.num_edges == 2 and modelled.num_ties == 1 and modelled.correct == dropped.correct
    # a tie pulls its two rewards together: the gradient step shrinks |r1 - r2|
    (grad,) = torch.autograd.grad(edge_sums(r, better[1:2], worse[1:2], tie=tie[1:2], tie_strength=1.0).loss, r)
    stepped = r.detach() - 0.1 * grad
    assert abs(stepped[1] - stepped[2]) < abs(r[1] - r[2]).detach()
    with pytest.raises(ValueError, match="tie_strength"):
        edge_sums(r, better, worse, tie=tie, tie_strength=0.0)


def test_plackett_luce_of_two_is_bradley_terry():
    r = _rewards(6, seed=2)
    group, tier = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 0, 1])
    loss, groups = plackett_luce_sums(r, group, tier)
    (g_pl,) = torch.autograd.grad(loss, r)
    better, worse = torch.tensor([0, 3, 4]), torch.tensor([1, 2, 5])
    bt = bradley_terry_sums(r[better], r[worse])
    (g_bt,) = torch.autograd.grad(bt.bt, r)
    assert groups == 3 and torch.allclose(loss, bt.bt, atol=1e-12) and torch.allclose(g_pl, g_bt, atol=1e-12)


def test_plackett_luce_is_a_distribution_over_rankings():
    r = _rewards(4, seed=4)
    group = torch.zeros(4, dtype=torch.long)
    total = 0.0
    for order in itertools.permutations(range(4)):
        tier = torch.empty(4, dtype=torch.long)
        tier[list(order)] = torch.arange(4)
        loss, groups = plackett_luce_sums(r, group, tier)
        total += math.exp(-loss.item())
        assert groups == 1
    assert abs(total - 1) < 1e-12


def test_plackett_luce_with_tied_tiers_and_mixed_groups_matches_the_formula():
    r = _rewards(7, seed=5)
    # group 7: tiers 0, 1, 1, 2 (two tied in the middle); group 3: tiers 0, 0, 1 (a tied top); ids need not be 0..n
    group = torch.tensor([7, 7, 7, 7, 3, 3, 3])
    tier = torch.tensor([0, 1, 1, 2, 0, 0, 1])
    loss, groups = plackett_luce_sums(r, group, tier)
    x = r.detach().tolist()
    lse = lambda *v: math.log(sum(math.exp(t) for t in v))  # noqa: E731
    expected = (lse(*x[0:4]) - x[0]) + (lse(x[1], x[2], x[3]) - x[1]) + (lse(x[1], x[2], x[3]) - x[2])
    expected += (lse(*x[4:7]) - x[4]) + (lse(*x[4:7]) - x[5])
    assert groups == 2 and abs(loss.item() - expected) < 1e-12
    # a group whose responses all tie carries no ranking
    loss, groups = plackett_luce_sums(r[:3], torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert groups == 0 and loss.item() == 0


def test_best_of_k_counts_groups_whose_best_response_scores_highest():
    r = torch.tensor([3.0, 1.0, 2.0, 0.0, 0.5, 2.0, 2.0, 1.0, 1.0, 5.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    tier = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 0, 0])
    # group 0: best (3.0) on top -> 1; group 1: best 0.0 below 2.0 -> 0; group 2: best 2.0 tops alone -> 1;
    # group 3: two responses tie for best -> not a best-of-K group
    correct, groups = best_of_k_correct(r, group, tier)
    assert groups == 3 and correct.item() == 2.0
    # a reward tie at the top with the best response counts 1 / (responses sharing it)
    correct, groups = best_of_k_correct(torch.tensor([2.0, 2.0, 1.0]), torch.zeros(3, dtype=torch.long),
                                        torch.tensor([0, 1, 2]))
    assert groups == 1 and correct.item() == 0.5
