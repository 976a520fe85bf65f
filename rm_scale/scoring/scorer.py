"""`RewardScorer`: the rewards of a saved reward model for whole texts, prompt/response pairs, conversations and
preference pairs — tokenised and read exactly as training did (the folder's scoring contract, rm_scale.model.contract),
batched for speed, and the same whatever the batch it lands in.

Batches: items sorted by length and cut into micro-batches of at most ``batch_tokens`` tokens. With a decoder on
`sdpa` attention the sequences are packed end to end (no padding; attention per sequence, rm_scale.model.packed_attention)
and a preference pair's two sides share their common prefix (computed once, collate.pack_groups); other models get
right-padded batches. Either way each reward is that of the sequence alone (tested against one-at-a-time scoring).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from rm_scale.data.collate import pack_groups, pack_sequences
from rm_scale.data.formats import conversation_ids, text_ids
from rm_scale.model.contract import assumed_contract, assumption_note, check_tokenizer, read_contract
from rm_scale.model.last_layer import use_sparse_last_layer
from rm_scale.model.packed_attention import use_packed_attention
from rm_scale.model.reward import base_model, ensure_pad_token, forward_packed_rewards, forward_rewards

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 1024  # RewardConfig's (TRL's) default, for a folder without a contract


def load_scoring_model(model_dir: str, *, dtype: str = "float32", device: str | None = None,
                       trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """The reward model in eval mode on ``device`` (default: the GPU when there is one) and its tokenizer, from a full
    model folder or a PEFT adapter folder (the base model is read from the path the adapter names)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    tokenizer_dir = model_dir
    if os.path.exists(os.path.join(model_dir, "adapter_config.json")):
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        if not _has_tokenizer(model_dir):
            tokenizer_dir = model.peft_config["default"].base_model_name_or_path
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype,
                                                                   trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)  # as RewardTrainer does
    model.eval()
    use_sparse_last_layer(base_model(model))  # only the read token of each sequence goes through the last layer
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")), tokenizer


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.exists(os.path.join(model_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json"))


class RewardScorer:
    """Rewards from a model folder exported by rm_scale (or any sequence-classification folder, with a warning).

        scorer = RewardScorer("outputs/run/final")
        scorer.score(["<whole text>", ...])                    # what OpenRLHF sends
        scorer.score(prompts, responses)                       # strings, or message lists
        scorer.score_pairs([(prompt, chosen, rejected), ...])  # both rewards of each pair
        GRPOTrainer(..., reward_funcs=[scorer])                # TRL's reward-function call signature

    ``normalize=True`` returns (reward - mean) / std with the final evaluation's statistics saved in the contract.
    """

    __name__ = "rm_scale_reward"  # TRL names a reward function's metrics by its __name__

    def __init__(self, model_dir: str, *, normalize: bool = False, batch_tokens: int = 4096,
                 dtype: str = "float32", device: str | None = None, max_length: int | None = None,
                 packed: bool = True, padding_side: str = "right", trust_remote_code: bool = False) -> None:
        if not os.path.isdir(model_dir):
            raise ValueError(f"{model_dir!r} is not a model folder (expected <output_dir>/final, a checkpoint or an "
                             "adapter folder).")
        self.model_dir = model_dir
        self.model, self.tokenizer = load_scoring_model(model_dir, dtype=dtype, device=device,
                                                        trust_remote_code=trust_remote_code)
        self.contract = self._contract(max_length)
        self.max_length = max_length or self.contract["max_length"]
        self.batch_tokens = max(int(batch_tokens), self.max_length or 1)
        self.normalize = normalize
        if normalize and not self.contract.get("reward_std"):
            raise ValueError(f"{model_dir}: normalize=True needs the reward statistics of a final evaluation "
                             "(reward_mean / reward_std in scoring.json); this export has none. Train with eval data, "
                             "or score without normalize.")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.padding_side = padding_side  # padded batches only (a model the packed forward cannot run)
        self.packed = packed and use_packed_attention(base_model(self.model))
        self.truncated = 0  # texts longer than max_length whose end was kept, since the scorer was made

    def _contract(self, max_length: int | None) -> dict[str, Any]:
        contract = read_contract(self.model_dir)
        if contract is None:
            contract = assumed_contract(self.tokenizer, max_length=max_length or DEFAULT_MAX_LENGTH)
            note = f"{self.model_dir}: {assumption_note(contract)}"
            warnings.warn(note, stacklevel=3)
            logger.warning(note)
            return contract
        check_tokenizer(contract, self.tokenizer, where=self.model_dir)
        return contract

    # ---- public API -----------------------------------------------------------------------------------------------

    def score(self, texts_or_prompts: Sequence[Any], responses: Sequence[Any] | None = None) -> list[float]:
        """One reward per whole text, or per (prompt, response): strings (joined as given) or message lists (a
        string response to a message prompt is the assistant's turn)."""
        if responses is None:
            ids = [self.encode(t) for t in texts_or_prompts]
        else:
            if len(responses) != len(texts_or_prompts):
                raise ValueError(f"score(prompts, responses): {len(texts_or_prompts)} prompts but {len(responses)} "
                                 "responses; give one response per prompt.")
            ids = [self.encode(p, r) for p, r in zip(texts_or_prompts, responses)]
        return self.finish(self.rewards_of_ids(ids))

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None,
                 **kwargs: Any) -> list[float]:
        """TRL's reward-function signature (GRPOTrainer's ``reward_funcs``): one reward per prompt + completion."""
        if prompts is None or completions is None:
            raise TypeError("RewardScorer(prompts=..., completions=...): TRL's reward-function call; use score() "
                            "for whole texts.")
        return self.score(prompts, completions)

    def score_pairs(self, pairs: Sequence[tuple[Any, Any, Any]]) -> list[tuple[float, float]]:
        """(chosen reward, rejected reward) per (prompt, chosen, rejected); prompt None: the sides are whole texts."""
        sides = [(self.encode(p, c) if p is not None else self.encode(c),
                  self.encode(p, r) if p is not None else self.encode(r)) for p, c, r in pairs]
        chosen, rejected = self.rewards_of_pairs(sides)
        return list(zip(self.finish(chosen), self.finish(rejected)))

    def encode(self, text_or_prompt: Any, response: Any = None) -> list[int]:
        """Token ids as training made them (rm_scale.data.formats), cut to the last ``max_length`` tokens."""
        return self.cut(self.tokens(text_or_prompt, response))

    def cut(self, ids: list[int]) -> list[int]:
        """The last ``max_length`` tokens of a longer sequence (where the reward is read), counted in ``truncated``."""
        if self.max_length and len(ids) > self.max_length:
            self.truncated += 1
            return ids[-self.max_length:]
        return ids

    def tokens(self, text_or_prompt: Any, response: Any = None) -> list[int]:
        """Token ids as training made them, whole (`encode` cuts them to ``max_length``)."""
        if isinstance(text_or_prompt, str) and (response is None or isinstance(response, str)):
            ids = text_ids([text_or_prompt + (response or "")], self.tokenizer)[0]
        elif _is_messages(text_or_prompt):
            reply = [] if response is None else _as_messages(response)
            ids = conversation_ids(list(text_or_prompt) + reply, self.tokenizer)
        else:
            raise TypeError(f"cannot score {type(text_or_prompt).__name__} + {type(response).__name__}: give text "
                            "strings, or a list of {'role', 'content'} messages (and a string or message response).")
        return ids

    # ---- batches --------------------------------------------------------------------------------------------------

    def rewards_of_ids(self, seqs: Sequence[list[int]]) -> list[float]:
        """Raw rewards of token-id sequences, in their order."""
        out = [0.0] * len(seqs)
        for chunk in self._chunks([len(s) for s in seqs]):
            values = self._forward([seqs[i] for i in chunk])
            for i, v in zip(chunk, values):
                out[i] = v
        return out

    def rewards_of_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> tuple[list[float], list[float]]:
        """Raw (chosen, rejected) rewards of token-id pairs; packed, each pair's common prefix is computed once."""
        if not self.packed:
            flat = self.rewards_of_ids([s for pair in pairs for s in pair])
            return flat[0::2], flat[1::2]
        chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
        for chunk in self._chunks([len(c) + len(r) for c, r in pairs]):
            batch = pack_groups([{"input_ids_chosen": pairs[i][0], "input_ids_rejected": pairs[i][1]} for i in chunk],
                                row_length=self.batch_tokens, pad_id=self.tokenizer.pad_token_id)
            index = torch.cat([batch["chosen_index"], batch["rejected_index"]])
            spans = torch.cat([batch["chosen_span"], batch["rejected_span"]])
            values = self._packed(batch, index, spans)
            for k, i in enumerate(chunk):
                chosen[i], rejected[i] = values[k], values[len(chunk) + k]
        return chosen, rejected

    def _chunks(self, sizes: list[int]) -> Iterator[list[int]]:
        """Indices by length, cut where a micro-batch would pass ``batch_tokens`` (padded: count x longest)."""
        chunk: list[int] = []
        used = 0
        for i in sorted(range(len(sizes)), key=sizes.__getitem__):  # ascending: the newest item is the longest
            cost = used + sizes[i] if self.packed else sizes[i] * (len(chunk) + 1)
            if chunk and cost > self.batch_tokens:
                yield chunk
                chunk, used = [], 0
            chunk.append(i)
            used += sizes[i]
        if chunk:
            yield chunk

    def _forward(self, seqs: list[list[int]]) -> list[float]:
        if self.packed:
            batch = pack_sequences(seqs, row_length=self.batch_tokens, pad_id=self.tokenizer.pad_token_id)
            return self._packed(batch, batch["index"], batch["spans"])
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):  # the reward is read at the last attention-mask 1, either padding side
            start = width - len(s) if self.padding_side == "left" else 0
            ids[r, start : start + len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[r, start : start + len(s)] = 1
        device = self._device()
        with torch.inference_mode():
            return forward_rewards(self.model, ids.to(device), mask.to(device)).float().cpu().tolist()

    def _packed(self, batch: Mapping[str, torch.Tensor], index: torch.Tensor, spans: torch.Tensor) -> list[float]:
        device = self._device()
        with torch.inference_mode():
            rewards = forward_packed_rewards(self.model, batch["packed_input_ids"].to(device),
                                             batch["packed_position_ids"].to(device), index,
                                             groups=batch["packed_groups"], spans=spans)
        return rewards.float().cpu().tolist()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def finish(self, rewards: list[float]) -> list[float]:
        """Raw rewards as the scorer returns them: normalised with the contract's statistics when asked."""
        if not self.normalize:
            return list(rewards)
        mean, std = self.contract["reward_mean"], self.contract["reward_std"]
        return [(r - mean) / std for r in rewards]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def _as_messages(response: Any) -> list[dict[str, Any]]:
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if _is_messages(response):
        return list(response)
    raise TypeError(f"a response must be a string or a list of {{'role', 'content'}} messages, got "
                    f"{type(response).__name__}")
