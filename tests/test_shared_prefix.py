"""Each prompt computed once (rm_scale.data.collate.pack_groups + rm_scale.model.packed_attention): the rewards and
gradients of a shared-prefix forward equal the stock model's on the same pairs as separate padded sequences (fp32),
for Llama, Mistral, Qwen2 and Qwen3 layers, with and without the sparse last layer, with LoRA; pairs with a long, a
short and no shared prefix and one side a prefix of the other; a trainer run gives the losses and parameters of the
unshared run; the saved model is a plain HF model."""

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rm_scale.data.collate import pack_groups
from rm_scale.data.formats import group_length, shared_prefix_length
from rm_scale.model import forward_packed_rewards, forward_rewards
from rm_scale.model.last_layer import use_sparse_last_layer
from rm_scale.model.packed_attention import use_packed_attention
from test_model import _arch


def _pairs(vocab=64, seed=1):
    """Pairs with a long, a short and no common prefix, one side a prefix of the other, and identical but the last."""
    g = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        return torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    prompt, a, b = tokens(12, 30), tokens(1, 9), tokens(1, 9)
    return [
        {"input_ids_chosen": prompt + a, "input_ids_rejected": prompt + b},
        {"input_ids_chosen": prompt[:1] + a, "input_ids_rejected": prompt[:1] + [1] + b},
        {"input_ids_chosen": [1] + a, "input_ids_rejected": [2] + b},
        {"input_ids_chosen": prompt + a, "input_ids_rejected": prompt + a + b},
        {"input_ids_chosen": prompt + [5], "input_ids_rejected": prompt + [6]},
        {"input_ids_chosen": tokens(20, 40) + a, "input_ids_rejected": tokens(3, 8)},
    ]


def test_the_shared_prefix_is_the_common_start_leaving_each_side_a_token():
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 3, 5]) == 3
    assert shared_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 2  # the shorter side keeps its last token
    assert shared_prefix_length([1, 2], [1, 2]) == 1
    assert shared_prefix_length([7], [7, 8]) == 0 and shared_prefix_length([1, 2], [3, 2]) == 0
    assert group_length({"input_ids_chosen": [1, 2, 3, 4], "input_ids_rejected": [1, 2, 9]}) == 5


def test_groups_lay_out_the_prefix_once_with_positions_continuing_on_both_sides():
    pairs = [{"input_ids_chosen": [5, 6, 7, 8], "input_ids_rejected": [5, 6, 9]}]
    b = pack_groups(pairs, row_length=None, pad_id=0)
    assert b["packed_input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["packed_position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert b["chosen_index"].tolist() == [[0, 3]] and b["rejected_index"].tolist() == [[0, 4]]
    assert b["chosen_span"].tolist() == [[0, 2, 2]] and b["rejected_span"].tolist() == [[0, 2, 4]]
    assert b["packed_groups"].tolist() == [[0, 0, 2, 2, 1]]
    assert int(b["packed_real_tokens"]) == 5 and int(b["packed_pair_tokens"]) == 7


def _stock_rewards(model, pairs):
    """The stock forward: every side its own right-padded sequence."""
    seqs = [p[f"input_ids_{side}"] for side in ("chosen", "rejected") for p in pairs]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return forward_rewards(model, ids, mask)


def _grouped_rewards(model, pairs, row_length):
    b = pack_groups(pairs, row_length=row_length, pad_id=0)
    index = torch.cat([b["chosen_index"], b["rejected_index"]])
    spans = torch.cat([b["chosen_span"], b["rejected_span"]])
    return forward_packed_rewards(model, b["packed_input_ids"], b["packed_position_ids"], index,
                                  groups=b["packed_groups"], spans=spans), b


def _rewards_and_grads(model, fn):
    model.zero_grad()
    rewards = fn(model)
    (rewards * torch.linspace(-1, 1, rewards.numel())).sum().backward()
    return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2", "Qwen3"])
@pytest.mark.parametrize("sparse", [False, True], ids=["full", "sparse_last_layer"])
def test_shared_prefix_rewards_and_gradients_equal_the_stock_forward(arch, sparse):
    torch.manual_seed(0)
    stock = _arch(arch).float()
    grouped = copy.deepcopy(stock)
    assert use_packed_attention(grouped)
    if sparse:
        assert use_sparse_last_layer(grouped)
    pairs = _pairs()
    want, want_grads = _rewards_and_grads(stock, lambda m: _stock_rewards(m, pairs))
    got, got_grads = _rewards_and_grads(grouped, lambda m: _grouped_rewards(m, pairs, row_length=48)[0])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-5), name
    batch = _grouped_rewards(grouped, pairs, row_length=48)[1]
    assert batch["packed_input_ids"].shape[0] >= 2  # several groups per row, several rows
    assert int(batch["packed_real_tokens"]) < int(batch["packed_pair_tokens"])


def test_shared_prefix_under_bf16_autocast_runs_and_matches_the_stock_forward():
    """Mixed precision (bf16=True trains under autocast): the rotated query and key reach the attention in fp32, the
    value in bf16. The grouped forward runs, back-propagates, and gives the stock forward's rewards to bf16 precision."""
    torch.manual_seed(0)
    stock = _arch("Llama").float()
    grouped = copy.deepcopy(stock)
    assert use_packed_attention(grouped) and use_sparse_last_layer(grouped)
    pairs = _pairs(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = _rewards_and_grads(stock, lambda m: _stock_rewards(m, pairs))
        got, grads = _rewards_and_grads(grouped, lambda m: _grouped_rewards(m, pairs, row_length=48)[0])
    assert torch.allclose(got.float(), want.float(), atol=3e-2), (got.float() - want.float()).abs().max()
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


def test_shared_prefix_with_lora_equals_the_stock_forward():
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj"])
    stock = get_peft_model(_arch("Llama").float(), config)
    grouped = copy.deepcopy(stock)
    assert use_packed_attention(grouped.base_model.model) and use_sparse_last_layer(grouped.base_model.model)
    pairs = _pairs(seed=2)
    want, want_grads = _rewards_and_grads(stock, lambda m: _stock_rewards(m, pairs))
    got, got_grads = _rewards_and_grads(grouped, lambda m: _grouped_rewards(m, pairs, row_length=64)[0])
    assert torch.allclose(got, want, atol=1e-5)
    assert any("lora_" in n for n in want_grads)
    for name, g in want_grads.items():
        assert torch.allclose(got_grads[name], g, atol=1e-5), name


def test_a_streamed_packed_run_trains_the_same_with_and_without_sharing(tiny_dir, tmp_path):
    """The same pairs in the same micro-batches (pairs_per_batch binds, not the budget): equal per-step losses and
    final parameters; sharing computes fewer tokens; the saved model is a plain HF model."""
    from rm_scale import RewardConfig, RewardTrainer
    from rm_scale.data import PairFiles
    from rm_scale.model import load_reward_model

    runs = {}
    for shared in (False, True):
        args = RewardConfig(output_dir=str(tmp_path / str(shared)), per_device_train_batch_size=4, max_steps=4,
                            learning_rate=1e-3, logging_steps=1, report_to=[], seed=0, bf16=False,
                            save_strategy="no", batching="packed", token_budget=100_000, shared_prefix=shared,
                            stream_block_size=4,  # one micro-batch per block: the same order either way
                            activation_checkpointing=False)
        trainer = RewardTrainer(model=load_reward_model(str(tiny_dir)), args=args,
                                tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
                                train_dataset=PairFiles(["rm_scale:demo/train"]))
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss_exact" in h]
        runs[shared] = (logs, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, trainer)
    (plain, plain_params, _), (shared, shared_params, trainer) = runs[False], runs[True]
    assert [h["loss_exact"] for h in shared] == pytest.approx([h["loss_exact"] for h in plain], abs=1e-5)
    # Adam divides a rare token's tiny gradient by its tiny second moment: fp32 rounding differences of 1e-7 in the
    # two forwards show in that embedding row at ~1e-5 after 4 steps (measured 1.2e-5), so 5e-5 here.
    for name, p in plain_params.items():
        assert torch.allclose(shared_params[name], p, atol=5e-5), name
    assert all(h["prefix_sharing"] > 1.0 for h in shared) and all(h["prefix_sharing"] == 1.0 for h in plain)
    assert sum(h["computed_tokens_per_pair"] for h in shared) < sum(h["computed_tokens_per_pair"] for h in plain)
    trainer.save_model(str(tmp_path / "saved"))
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert saved.config._attn_implementation != "rm_scale_packed_sdpa"


def _response_groups(vocab=64, seed=3):
    """K = 3 and 4 responses of a prompt (one a prefix of another, two identical but the last), a group with no
    common prefix, and a pair."""
    g = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        return torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    prompt, a, b, c = tokens(10, 24), tokens(1, 9), tokens(1, 9), tokens(2, 6)
    return [
        [prompt + a, prompt + b, prompt + c],
        [prompt[:3] + a, prompt[:3] + a + b, prompt[:3] + c, prompt[:3] + c[:-1] + [1]],
        [[1] + a, [2] + b, [1] + c],
        [prompt + [5], prompt + [6]],
    ]


@pytest.mark.parametrize("arch", ["Llama", "Qwen3"])
@pytest.mark.parametrize("sparse", [False, True], ids=["full", "sparse_last_layer"])
def test_k_response_groups_equal_k_separate_sequences(arch, sparse):
    from rm_scale.data.collate import pack_response_groups
    from rm_scale.data.formats import common_prefix_length

    torch.manual_seed(0)
    stock = _arch(arch).float()
    grouped = copy.deepcopy(stock)
    assert use_packed_attention(grouped) and (not sparse or use_sparse_last_layer(grouped))
    groups = _response_groups()
    seqs = [s for group in groups for s in group]

    def stock_fn(m):
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        return forward_rewards(m, ids, torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]))

    def grouped_fn(m):
        b = pack_response_groups(groups, row_length=40, pad_id=0)
        return forward_packed_rewards(m, b["packed_input_ids"], b["packed_position_ids"], b["index"],
                                      groups=b["packed_groups"], spans=b["spans"])

    want, want_grads = _rewards_and_grads(stock, stock_fn)
    got, got_grads = _rewards_and_grads(grouped, grouped_fn)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5), name
    b = pack_response_groups(groups, row_length=40, pad_id=0)
    shared = [common_prefix_length(g) for g in groups]
    assert shared[0] >= 10 and shared[2] == 0  # the whole prompt (responses share no first token by chance) or none
    # each prompt once: the real tokens are every response's tokens less the prefix repeated K - 1 times
    assert int(b["packed_real_tokens"]) == len(sum(seqs, [])) - sum((len(g) - 1) * p for g, p in zip(groups, shared))
    assert b["packed_input_ids"].shape[0] >= 2 and b["packed_groups"].shape[1] == 3 + 4
