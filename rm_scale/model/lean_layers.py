"""RMSNorm and the SwiGLU MLP of the Llama family, keeping less for the backward (same math).

Without activation checkpointing, what a training step holds at its peak is mostly the tensors autograd saved for the
backward: ~48 KB per token per layer of SmolLM2-135M in fp32 (hidden 576, MLP 1,536). The stock modules save more
than their backward needs:

- RMSNorm ``weight * (x * rsqrt(mean(x²) + eps))`` saves its input, the rsqrt *and* the normalised ``x * rsqrt``
  (for the weight's gradient). The normalised tensor is recomputed in the backward from the two others: one
  hidden-size tensor per token fewer, twice a layer (three times in Qwen3, whose q/k norms run per head).
- The MLP's ``silu(gate) * up`` saves ``gate`` (for SiLU) *and* ``silu(gate)`` and ``up`` (for the product). The
  backward recomputes ``silu(gate)`` from ``gate``: one MLP-width tensor per token fewer.

Together ~22 % less saved per token (SmolLM2-135M: 1.43 → 1.12 MB), for an elementwise recompute (no step-time
change measurable on SmolLM2-135M, docs/benchmarks.md). The forward runs the stock operations in the stock order, so
outputs are bit-identical; gradients are equal up to rounding (tested against the stock modules for Llama, Mistral,
Qwen2 and Qwen3, with LoRA, under bf16 autocast and in 2-rank ZeRO-3 training). The matmuls are untouched: the
projections stay the model's own modules (LoRA, ZeRO-3's parameter gathering and their hooks see them as before).
With activation checkpointing on, the saving applies to the one layer being recomputed at a time.

`use_lean_layers(model)` swaps the forward of every supported module in place (an instance attribute: the class, the
state dict and a saved model are unchanged). Supported: the RMSNorm and MLP classes of Llama, Mistral, Qwen2 and
Qwen3 with ``hidden_act: silu``; other modules keep their forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
SUPPORTED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
_FLAG = "_rm_scale_lean_layers"


def use_lean_layers(model: nn.Module) -> int:
    """Swap in the lean forward of every supported RMSNorm and MLP of ``model``; the number of modules that use it."""
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if getattr(module, _FLAG, False):
            count += 1
        elif name in SUPPORTED_NORMS and isinstance(getattr(module, "weight", None), torch.Tensor):
            _swap(module, _norm_forward)
            count += 1
        elif name in SUPPORTED_MLPS and _is_silu(getattr(module, "act_fn", None)):
            _swap(module, _mlp_forward)
            count += 1
    return count


def uses_lean_layers(model: nn.Module) -> bool:
    return any(getattr(m, _FLAG, False) for m in model.modules())


def _swap(module: nn.Module, forward: Any) -> None:
    # A bound method of a module-level function (not a closure): copy.deepcopy rebinds it to the copied module.
    module.forward = types.MethodType(forward, module)
    setattr(module, _FLAG, True)


def _is_silu(act: Any) -> bool:
    # transformers' ACT2FN["silu"] is torch.nn.SiLU (or its own SiLUActivation in older releases): F.silu either way
    return type(act).__name__ in {"SiLU", "SiLUActivation"}


def _norm_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)


def _mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # the stock order: gate_proj, then up_proj (ZeRO-3 fetches parameters in the order modules first ran)
    gate = module.gate_proj(x)
    return module.down_proj(_SiluMul.apply(gate, module.up_proj(x)))


class _RMSNorm(torch.autograd.Function):
    """transformers' RMSNorm forward, op for op; saves the input and the rsqrt, not the normalised input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = (x.to(torch.float32) * rstd).to(x.dtype).to(torch.float32)  # what the forward multiplied by weight
        grad32 = grad.to(torch.float32)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad32 * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = grad32 * weight.to(torch.float32)
            # d/dx of x * rsqrt(mean(x²) + eps): rstd * (g - n * mean(g * n)) with n = x * rstd
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``; saves gate and up, recomputes silu(gate) in the backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = (grad * F.silu(gate)).to(up.dtype)
        if ctx.needs_input_grad[0]:  # SiLU's own backward kernel (one fused pass), as autograd runs it
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate).to(gate.dtype)
        return grad_gate, grad_up
