import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rm_scale.data import RewardDataCollatorWithPadding
from rm_scale.model import forward_rewards, init_score_head, last_real_index, load_reward_model, score_head


@pytest.fixture(scope="module")
def model_and_tok(tiny_dir):
    from transformers import AutoTokenizer

    model = load_reward_model(str(tiny_dir), score_head_seed=3).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def test_last_real_index_right_left_and_holes():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 1, 0, 0]])
    assert last_real_index(mask).tolist() == [2, 4, 4, 2]


def _single_rewards(model, seqs):
    return torch.stack([forward_rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_rewards_are_read_at_the_last_real_token(model_and_tok, side, pad_is_eos):
    """Padded batch rewards equal unpadded one-at-a-time rewards: left/right padding and pad == eos."""
    model, tok = model_and_tok
    eos = tok.eos_token_id
    seqs = [[10, 11, 12, eos], [13, eos], [14, 15, 16, 17, 18, eos]]  # every sequence ends with EOS
    old_pad, old_side = tok.pad_token, tok.padding_side
    tok.padding_side = side
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    try:
        feats = [{"input_ids_chosen": s, "attention_mask_chosen": [1] * len(s),
                  "input_ids_rejected": s, "attention_mask_rejected": [1] * len(s)} for s in seqs]
        batch = RewardDataCollatorWithPadding(tok)(feats)
        with torch.no_grad():
            batched = forward_rewards(model, batch["input_ids_chosen"], batch["attention_mask_chosen"])
            single = _single_rewards(model, seqs)
        assert torch.allclose(batched, single, atol=1e-5), (batched, single)
    finally:
        tok.pad_token, tok.padding_side = old_pad, old_side
        model.config.pad_token_id = tok.pad_token_id


def test_fresh_head_is_deterministic_and_small(tiny_dir):
    a = load_reward_model(str(tiny_dir), score_head_seed=3)
    b = load_reward_model(str(tiny_dir), score_head_seed=3)
    c = load_reward_model(str(tiny_dir), score_head_seed=4)
    wa, wb, wc = (score_head(m).weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert wa.shape == (1, 32) and wa.std().item() < 2.0 / 33


def test_saved_head_is_kept_on_reload(tiny_dir, tmp_path):
    model = load_reward_model(str(tiny_dir), score_head_seed=3)
    with torch.no_grad():
        score_head(model).weight.fill_(0.25)
    model.save_pretrained(tmp_path)
    again = load_reward_model(str(tmp_path), score_head_seed=99)
    assert torch.all(score_head(again).weight == 0.25)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert torch.all(score_head(plain).weight == 0.25)


def test_init_score_head_uses_a_private_generator(tiny_dir):
    model = load_reward_model(str(tiny_dir))
    torch.manual_seed(123)
    init_score_head(model, seed=7)
    first = score_head(model).weight.clone()
    torch.manual_seed(456)
    init_score_head(model, seed=7)
    assert torch.equal(first, score_head(model).weight)


def test_packed_rewards_equal_padded_rewards(model_and_tok):
    """Padding-free packing (restarting position_ids, no mask) reads the same rewards as a padded batch."""
    from rm_scale.model import forward_packed_rewards
    from rm_scale.data.collate import pack_pairs

    model, tok = model_and_tok
    eos = tok.eos_token_id
    torch.manual_seed(0)
    pairs = []
    for n_c, n_r in ((5, 3), (9, 9), (2, 7), (4, 1)):
        c = torch.randint(5, 40, (n_c,)).tolist() + [eos]
        r = torch.randint(5, 40, (n_r,)).tolist() + [eos]
        pairs.append({"input_ids_chosen": c, "attention_mask_chosen": [1] * len(c),
                      "input_ids_rejected": r, "attention_mask_rejected": [1] * len(r)})
    packed = pack_pairs(pairs, row_length=12, pad_id=tok.pad_token_id)
    assert packed["packed_input_ids"].shape[1] <= 12
    assert packed["packed_real_tokens"].item() == sum(len(p["input_ids_chosen"]) + len(p["input_ids_rejected"])
                                                       for p in pairs)
    padded = RewardDataCollatorWithPadding(tok)(pairs)
    with torch.no_grad():
        got_c = forward_packed_rewards(model, packed["packed_input_ids"], packed["packed_position_ids"],
                                       packed["chosen_index"])
        got_r = forward_packed_rewards(model, packed["packed_input_ids"], packed["packed_position_ids"],
                                       packed["rejected_index"])
        want_c = forward_rewards(model, padded["input_ids_chosen"], padded["attention_mask_chosen"])
        want_r = forward_rewards(model, padded["input_ids_rejected"], padded["attention_mask_rejected"])
    assert torch.allclose(got_c, want_c, atol=1e-5) and torch.allclose(got_r, want_r, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_packed_attention_computes_each_sequence_block_with_the_same_result(kv_heads, tmp_path):
    """rm_scale.model.packed_attention (SDPA per packed sequence) == stock sdpa with the block-diagonal mask: rewards and
    gradients, several rows with padding tails; padded forwards are untouched; the saved config does not name it."""
    import copy
    import json

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rm_scale.model import forward_packed_rewards
    from rm_scale.model.packed_attention import NAME, segments_from_position_ids, use_packed_attention
    from rm_scale.data.collate import pack_pairs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, num_labels=1, pad_token_id=0,
                         attn_implementation="sdpa")
    stock = LlamaForSequenceClassification(config)
    packed_model = copy.deepcopy(stock)
    assert use_packed_attention(packed_model) and packed_model.config._attn_implementation == NAME
    lengths = ((5, 3), (9, 9), (2, 7), (4, 1), (11, 6))
    pairs = [{"input_ids_chosen": torch.randint(1, 64, (c,)).tolist(), "input_ids_rejected": torch.randint(1, 64, (r,)).tolist()}
             for c, r in lengths]
    batch = pack_pairs(pairs, row_length=16, pad_id=0)
    assert batch["packed_input_ids"].shape[0] >= 3
    segments = segments_from_position_ids(batch["packed_position_ids"])
    assert all(s[0][0] == 0 and s[-1][0] + s[-1][2] == batch["packed_input_ids"].shape[1] for s in segments)  # covered
    index = torch.cat([batch["chosen_index"], batch["rejected_index"]])
    out = {}
    for name, model in (("stock", stock), ("packed", packed_model)):
        rewards = forward_packed_rewards(model, batch["packed_input_ids"], batch["packed_position_ids"], index)
        (rewards * torch.arange(1.0, len(rewards) + 1)).sum().backward()
        out[name] = rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.allclose(out["stock"][0], out["packed"][0], atol=1e-6)
    for n, g in out["stock"][1].items():
        assert torch.allclose(g, out["packed"][1][n], atol=1e-5), n
    ids = torch.randint(1, 64, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():  # a padded forward goes to plain sdpa
        assert torch.allclose(forward_rewards(stock, ids, mask), forward_rewards(packed_model, ids, mask), atol=1e-6)
    packed_model.save_pretrained(tmp_path / "saved")
    assert NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"]


def _arch(name, attn="sdpa"):
    import transformers

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_labels=1, pad_token_id=0, attn_implementation=attn)
    extra = {"Mistral": {"sliding_window": 4096}, "Qwen3": {"head_dim": 8}}.get(name, {})
    config = getattr(transformers, f"{name}Config")(**common, **extra)
    return getattr(transformers, f"{name}ForSequenceClassification")(config)


@pytest.mark.parametrize("arch", ["Llama", "Mistral", "Qwen2", "Qwen3"])
@pytest.mark.parametrize("layout", ["right", "left", "packed", "packed_attention", "eager_left", "eager_packed"])
def test_sparse_last_layer_gives_the_full_layers_rewards_and_gradients(arch, layout):
    """rm_scale.model.last_layer: the last layer computed at the read tokens only == the full last layer (rewards and every
    parameter's gradient), for padded (right/left) and packed batches (block-diagonal mask or per-sequence SDPA), and
    with eager attention (its 4-D mask is additive floats, not booleans)."""
    import copy

    from rm_scale.model.last_layer import use_sparse_last_layer
    from rm_scale.model import forward_packed_rewards
    from rm_scale.model.packed_attention import use_packed_attention
    from rm_scale.data.collate import pack_pairs

    torch.manual_seed(0)
    full = _arch(arch, "eager" if layout.startswith("eager") else "sdpa")
    layout = layout.removeprefix("eager_")
    sparse = copy.deepcopy(full)
    assert use_sparse_last_layer(sparse) and not use_sparse_last_layer(torch.nn.Linear(2, 2))
    if layout == "packed_attention":
        use_packed_attention(full), use_packed_attention(sparse)
    seqs = [torch.randint(1, 64, (n,)).tolist() for n in (5, 3, 9, 9, 2, 7, 4, 1, 11, 6)]
    results = []
    for model in (full, sparse):
        if layout.startswith("packed"):
            batch = pack_pairs([{"input_ids_chosen": seqs[i], "input_ids_rejected": seqs[i + 1]} for i in range(0, 10, 2)],
                               row_length=16, pad_id=0)
            index = torch.cat([batch["chosen_index"], batch["rejected_index"]])
            rewards = forward_packed_rewards(model, batch["packed_input_ids"], batch["packed_position_ids"], index)
        else:
            width = max(map(len, seqs))
            ids, mask = torch.zeros(len(seqs), width, dtype=torch.long), torch.zeros(len(seqs), width, dtype=torch.long)
            for i, s in enumerate(seqs):
                cols = slice(0, len(s)) if layout == "right" else slice(width - len(s), width)
                ids[i, cols], mask[i, cols] = torch.tensor(s), 1
            rewards = forward_rewards(model, ids, mask)
        (rewards * torch.arange(1.0, len(rewards) + 1)).sum().backward()
        results.append((rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (r_full, g_full), (r_sparse, g_sparse) = results
    assert torch.allclose(r_full, r_sparse, atol=1e-6)
    for n, g in g_full.items():
        assert torch.allclose(g, g_sparse[n], atol=1e-6, rtol=1e-4), n
    # Without reward positions (a user's own forward) the wrapped layer is the original one.
    ids = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        assert torch.allclose(full(input_ids=ids).logits, sparse(input_ids=ids).logits, atol=1e-6)


def test_sparse_last_layer_key_masks_without_a_4d_mask():
    """What each read token attends to when the layer gets no 4-D mask (flash-attention: a 2-D padding mask or none):
    its packed sequence from its start (reward_positions carry the starts), or its row's real tokens up to itself."""
    from rm_scale.model.last_layer import _key_mask

    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([2, 5, 3])
    starts = torch.tensor([0, 3, 1])
    packed = _key_mask(None, [starts, starts, starts], rows, cols, 6)[:, 0, 0].int().tolist()
    assert packed == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]]
    # a shared-prefix group in row 0: prefix 0-1, chosen's own token 2, rejected's own tokens 3-5 (read at 5)
    group = [torch.tensor([0, 0]), torch.tensor([2, 2]), torch.tensor([2, 3])]
    grouped = _key_mask(None, group, torch.tensor([0, 0]), torch.tensor([2, 5]), 6)[:, 0, 0].int().tolist()
    assert grouped == [[1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 1, 1]]
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])  # row 1 left-padded (and right-padded)
    padded = _key_mask(padding, None, rows, cols, 6)[:, 0, 0].int().tolist()
    assert padded == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert _key_mask(None, None, rows, cols, 6)[:, 0, 0].int().tolist()[2] == [1, 1, 1, 1, 0, 0]


def test_a_deep_copy_of_a_sparse_model_uses_its_own_last_layer():
    import copy

    from rm_scale.model.last_layer import use_sparse_last_layer

    torch.manual_seed(0)
    model = _arch("Llama")
    assert use_sparse_last_layer(model)
    twin = copy.deepcopy(model)
    ids, mask = torch.randint(1, 64, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        same = forward_rewards(twin, ids, mask)
        twin.model.layers[-1].mlp.down_proj.weight.add_(1.0)  # only the copy's last layer changes
        assert torch.allclose(same, forward_rewards(model, ids, mask))
        assert not torch.allclose(forward_rewards(twin, ids, mask), forward_rewards(model, ids, mask))


def test_custom_code_is_never_run_unless_asked_for(tiny_dir, tmp_path):
    """A model folder whose config points at custom code (auto_map) is refused by default (trust_remote_code=False)
    with transformers' own message; the code file is never executed."""
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_dir, folder)
    marker = tmp_path / "executed"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "rm_scale_evil"  # not a transformers architecture: only the custom code could load it
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_reward_model(str(folder))
    assert not marker.exists()
