"""A tiny Llama checkpoint + tokenizer built from a config, saved as a normal HF folder (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]


def make_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS, vocab_size=2000))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <eos> {% endfor %}"
    return tok


def demo_corpus() -> list[str]:
    here = Path(__file__).resolve().parents[1] / "rm_scale" / "data" / "demo_data"
    rows = [json.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in open(here / name)]
    # words the tests write themselves (test_stream's chat rows, the trainer's easy pairs) are in the vocabulary too
    return [r["prompt"] + r["chosen"] + " " + r["rejected"] for r in rows] + [
        "How do I cook rice? Rinse the rice Sure no Not my problem."]


def make_tiny_model_dir(path: str | Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A base causal LM (no score head: loading it for rewards initialises a fresh head) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = make_tokenizer(demo_corpus())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(make_tiny_model_dir(sys.argv[1]))
