"""The benchmark models: small Llamas built from a config, saved as ordinary HF sequence-classification folders with
SmolLM2's tokenizer (real subword lengths).

SmolLM2's vocabulary has 49,152 ids: at hidden 256 the embedding alone would be 12.6M of a 15.7M-parameter model (80 %),
so the AdamW step and the ZeRO-3 gathers would be dominated by a table that does almost no compute (measured on this
machine: +0.1-0.2 s per step of 2-5 s). The benchmark therefore *folds* ids into a smaller table —
``embedding(ids % vocab)``, a forward pre-hook on the embedding — so sequence lengths and every matmul stay real while
the table has a realistic share of the parameters. Every contender (TRL, rm_scale, the bare loop) loads the same folder
and applies the same fold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int  # embedding rows; token ids are folded into them (id % vocab)


BENCH = ModelSize(hidden=256, layers=4, intermediate=688, heads=4, vocab=8192)  # 5.26M parameters
MEMORY = ModelSize(hidden=768, layers=8, intermediate=2048, heads=12, vocab=8192)  # 63M: ZeRO-3 memory per rank
SMOKE = ModelSize(hidden=32, layers=2, intermediate=64, heads=4, vocab=1024)  # CI smoke test
# `--gpu`: 0.53B parameters (0.45B in the decoder's matrices), SmolLM2's whole vocabulary (no fold)
GPU = ModelSize(hidden=1536, layers=16, intermediate=4096, heads=12, vocab=49152)


def build_model_dir(path: Path, size: ModelSize, *, tokenizer_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Write a LlamaForSequenceClassification (num_labels 1, score head initialised as rm_scale does) and the
    tokenizer to ``path``; returns its description (sizes and parameter counts)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rm_scale.model import init_score_head

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=1024,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id % size.vocab,
        eos_token_id=tokenizer.eos_token_id % size.vocab,
        bos_token_id=(tokenizer.bos_token_id or 0) % size.vocab,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    init_score_head(model, seed=seed)
    # The SeqCls head pools at the last id != pad_token_id of the *unfolded* ids: keep the real pad id in the config.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    return {**asdict(size), "params": params, "embedding_params": embedding,
            # the parameters every token multiplies through (2 FLOPs each forward, 4 backward); norms are negligible
            "matmul_params": sum(p.numel() for p in model.parameters() if p.dim() == 2) - embedding,
            "tokenizer_vocab": len(tokenizer)}


def model_flops(model: dict[str, Any], *, real_tokens: float, attention_square_tokens: float) -> float:
    """Training FLOPs (forward + backward) the model needs for the real tokens, the same count for every contender:
    6 per token per matrix parameter, plus causal attention, 6 · layers · hidden per (sequence length)² summed over the
    sequences (QKᵀ and AV take 2 · s² · hidden FLOPs each over the whole square, half of that causal: 2 · s² · hidden
    forward, times 3 with the backward). Padding and masked-out attention are not counted: they are waste, and MFU
    must not reward them. rm_scale's sparse last layer skips work this count includes (its MFU is the useful-work rate,
    as for the others)."""
    return (6.0 * model["matmul_params"] * real_tokens
            + 6.0 * model["layers"] * model["hidden"] * attention_square_tokens)


def pretrained_info(path: Path) -> dict[str, Any]:
    """The description build_model_dir returns, for a pretrained folder (counted on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(path, num_labels=1)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"name": path.name, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "intermediate": config.intermediate_size, "heads": config.num_attention_heads, "vocab": config.vocab_size,
            "params": params, "embedding_params": embedding,
            "matmul_params": sum(p.numel() for p in model.parameters() if p.dim() == 2) - embedding,
            "tokenizer_vocab": len(AutoTokenizer.from_pretrained(path))}


def fold_vocab(model: Any, vocab: int | None) -> None:
    """Make the embedding look up ``ids % vocab`` (see the module docstring); None: the whole vocabulary, no fold."""
    if vocab is None:
        return
    from rm_scale.model import base_model

    inner = base_model(model)
    embed = inner.get_input_embeddings()

    def fold(_module: Any, args: tuple) -> tuple:
        return (args[0] % vocab, *args[1:])

    embed.register_forward_pre_hook(fold)
