import math
import subprocess
import sys

import torch

from rm_scale.loss import bradley_terry_sums, total_loss


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bt_loss_matches_hand_computed_values():
    rc, rr = torch.tensor([1.0, 0.0, -0.5]), torch.tensor([0.0, 2.0, -0.5])
    s = bradley_terry_sums(rc, rr)
    expected = -(_logsig(1.0) + _logsig(-2.0) + _logsig(0.0))
    assert abs(s.bt.item() - expected) < 1e-6
    assert s.correct.item() == 1.5  # one win, one loss, one tie counted half
    assert abs(s.margin.item() - (1.0 - 2.0 + 0.0)) < 1e-6
    assert s.num_pairs == 3
    assert abs(total_loss(s, num_pairs=3, center_coef=None).item() - expected / 3) < 1e-6


def test_margin_is_subtracted_inside_the_sigmoid():
    rc, rr, m = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.5]), torch.tensor([0.5, 1.0])
    s = bradley_terry_sums(rc, rr, margin=m)
    expected = -(_logsig(2.0 - 1.0 - 0.5) + _logsig(1.0 - 1.5 - 1.0))
    assert abs(s.bt.item() - expected) < 1e-6
    # accuracy and margin statistics ignore the target margin
    assert s.correct.item() == 1.0


def test_centering_term_matches_trl_formula():
    rc, rr = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    s = bradley_terry_sums(rc, rr)
    bt = -(_logsig(0.5) + _logsig(-3.0))
    center = (1.5**2 + (-1.0) ** 2)
    loss = total_loss(s, num_pairs=2, center_coef=0.01)
    # TRL: mean(-logsigmoid) + coef * mean((rc + rr)^2)
    assert abs(loss.item() - (bt / 2 + 0.01 * center / 2)) < 1e-6
    assert total_loss(s, num_pairs=2, center_coef=0.0).item() == total_loss(s, num_pairs=2, center_coef=None).item()


def test_sums_over_uneven_slices_give_the_full_batch_gradient():
    """Cutting one global batch into uneven 'ranks' and dividing each by the global count changes nothing."""
    torch.manual_seed(0)
    w = torch.randn(8, requires_grad=True)
    xc, xr = torch.randn(10, 8), torch.randn(10, 8)
    margin = torch.rand(10)

    def grad_of(slices):
        w.grad = None
        for sl in slices:
            s = bradley_terry_sums(xc[sl] @ w, xr[sl] @ w, margin=margin[sl])
            total_loss(s, num_pairs=10, center_coef=0.1).backward()
        return w.grad.clone()

    full = grad_of([slice(0, 10)])
    uneven = grad_of([slice(0, 1), slice(1, 4), slice(4, 10)])
    assert torch.allclose(full, uneven, atol=1e-6)


def test_loss_module_imports_no_distributed_stack():
    code = "import sys, rm_scale.loss; bad = [m for m in ('deepspeed', 'accelerate', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_whole_step_terms_have_the_exact_gradient_over_uneven_slices():
    """Surrogates per slice, with the step's moments held fixed, sum to the gradient of
    a*M^2 + b*V + c*(std - t)^2 computed on all rewards at once."""
    from rm_scale.loss import BatchMoments, GlobalTerms, global_terms, global_terms_value

    torch.manual_seed(1)
    w = torch.randn(6, requires_grad=True)
    x = torch.randn(11, 6)
    terms = GlobalTerms(batch_mean=0.3, variance=0.2, target_std=0.5, target_std_coef=0.7)

    r = x @ w
    m, v = r.mean(), r.var(unbiased=False)
    direct = 0.3 * m**2 + 0.2 * v + 0.7 * (v.sqrt() - 0.5) ** 2
    (grad_direct,) = torch.autograd.grad(direct, w)

    with torch.no_grad():
        rr = x @ w
        moments = BatchMoments(count=11.0, total=rr.sum().item(), total_sq=(rr * rr).sum().item())
    assert abs(global_terms_value(moments, terms) - direct.item()) < 1e-5
    w.grad = None
    for sl in (slice(0, 2), slice(2, 3), slice(3, 11)):
        surrogate, values = global_terms(x[sl] @ w, moments, terms)
        surrogate.backward()
    assert torch.allclose(w.grad, grad_direct, atol=1e-5), (w.grad, grad_direct)
    assert abs(values["loss_batch_mean"] - m.item() ** 2) < 1e-6 and abs(values["loss_variance"] - v.item()) < 1e-6
