"""rm_scale.model.lean_layers: RMSNorm and the SwiGLU MLP keep less for the backward. Rewards are bit-identical to the
stock modules' and gradients equal (fp32, 1e-5) for Llama, Mistral, Qwen2 and Qwen3, composed with the shared-prefix
forward and the sparse last layer, with LoRA on every projection, under bf16 autocast and with activation
checkpointing; what autograd saves per token shrinks by a fifth; the saved model is a plain HF model."""

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rm_scale.model.last_layer import use_sparse_last_layer
from rm_scale.model.lean_layers import use_lean_layers, uses_lean_layers
from rm_scale.model.packed_attention import use_packed_attention
from test_model import _arch
from test_shared_prefix import _grouped_rewards, _pairs, _rewards_and_grads


def _modules(arch):
    """RMSNorms and MLPs a model of ``_arch`` has: per layer 2 norms + 1 MLP (+ Qwen3's q/k norms), + the final norm."""
    per_layer = 5 if arch == "Qwen3" else 3
    return 2 * per_layer + 1


def _grouped(model, pairs):
    return _grouped_rewards(model, pairs, row_length=48)[0]


def _assert_equal(stock, lean, pairs, *, atol=1e-5):
    want, want_grads = _rewards_and_grads(stock, lambda m: _grouped(m, pairs))
    got, got_grads = _rewards_and_grads(lean, lambda m: _grouped(m, pairs))
    assert torch.equal(got, want), (got - want).abs().max()  # the forward runs the stock ops: bit-identical
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, atol=atol, rtol=1e-5), (name, (got_grads[name] - g).abs().max())


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2", "Qwen3"])
@pytest.mark.parametrize("sparse", [False, True], ids=["full", "sparse_last_layer"])
def test_lean_layers_give_the_stock_rewards_and_gradients(arch, sparse):
    torch.manual_seed(0)
    stock = _arch(arch).float()
    for p in stock.parameters():  # norms start at weight 1: make their gradients' weight factor visible
        p.data.add_(0.1 * torch.randn_like(p))
    assert use_packed_attention(stock)
    if sparse:
        assert use_sparse_last_layer(stock)
    lean = copy.deepcopy(stock)
    assert use_lean_layers(lean) == _modules(arch) and uses_lean_layers(lean) and not uses_lean_layers(stock)
    assert use_lean_layers(lean) == _modules(arch)  # idempotent
    _assert_equal(stock, lean, _pairs())


def test_lean_layers_with_lora_on_every_projection():
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    stock = get_peft_model(_arch("Llama").float(), config)
    for name, p in stock.named_parameters():
        if "lora_B" in name:  # LoRA's B starts at zero: make the adapters change the forward
            p.data.normal_(0, 0.1)
    assert use_packed_attention(stock.base_model.model)
    lean = copy.deepcopy(stock)
    assert use_lean_layers(lean.base_model.model) == _modules("Llama")
    _assert_equal(stock, lean, _pairs(seed=2))


def test_lean_layers_under_bf16_autocast_and_bf16_weights():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        stock = _arch("Qwen3").to(dtype)
        assert use_packed_attention(stock)
        lean = copy.deepcopy(stock)
        use_lean_layers(lean)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, want_grads = _rewards_and_grads(stock, lambda m: _grouped(m, _pairs(seed=3)))
            got, got_grads = _rewards_and_grads(lean, lambda m: _grouped(m, _pairs(seed=3)))
        assert torch.equal(got, want)
        for name, g in want_grads.items():  # the lean backward computes in fp32: equal to bf16 rounding
            assert got_grads[name].dtype == g.dtype
            scale = g.float().abs().max().clamp_min(1e-3)
            assert (got_grads[name].float() - g.float()).abs().max() <= 0.02 * scale, name


def test_lean_layers_under_activation_checkpointing():
    torch.manual_seed(0)
    stock = _arch("Llama").float()
    assert use_packed_attention(stock)
    stock.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    stock.train()
    lean = copy.deepcopy(stock)
    use_lean_layers(lean)
    _assert_equal(stock, lean, _pairs(seed=4))


def _saved_bytes(model, pairs):
    """Bytes autograd holds for the backward after the forward (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rewards = _grouped(model, pairs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params), rewards


def test_lean_layers_save_a_fifth_less_for_the_backward(tmp_path):
    import transformers

    torch.manual_seed(0)
    # SmolLM2-135M's shapes (hidden 576, MLP 1,536, 9/3 heads), 2 layers
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, num_labels=1, pad_token_id=0,
                                      attn_implementation="sdpa")
    stock = transformers.LlamaForSequenceClassification(config)
    assert use_packed_attention(stock)
    lean = copy.deepcopy(stock)
    use_lean_layers(lean)
    pairs = _pairs(seed=5) * 8
    stock_bytes, _ = _saved_bytes(stock, pairs)
    lean_bytes, _ = _saved_bytes(lean, pairs)
    assert lean_bytes <= 0.8 * stock_bytes, (lean_bytes, stock_bytes)
    lean.save_pretrained(tmp_path)  # no trace of the swap: a plain HF model
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert not uses_lean_layers(again)
    assert type(again.model.norm).forward is type(again.model.norm).forward  # class untouched
    assert "forward" not in vars(again.model.norm)
