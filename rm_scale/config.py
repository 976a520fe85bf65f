"""`RewardConfig`: transformers' `TrainingArguments` plus the reward-model fields, used exactly like TRL's."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from transformers import TrainingArguments

from rm_scale.data.batching import check_batching
from rm_scale.distributed import init_gloo_group


@dataclass
class RewardConfig(TrainingArguments):
    """Configuration of `RewardTrainer`; every `TrainingArguments` field keeps its meaning.

    Every field of TRL 1.16's `RewardConfig` is here with TRL's default (tests/test_trl_parity.py): unlike
    `TrainingArguments`, `learning_rate=1e-4`, `logging_steps=10`, activation (gradient) checkpointing on, and `bf16`
    on by default. Where rm_scale resolves a default differently, it says why:
    - `bf16=None` is True where bf16 runs (a CUDA GPU that supports it) unless fp16 is set, else False. TRL resolves it
      to `not fp16` everywhere, which makes `RewardConfig()` raise on a machine without such a GPU.
    - `ddp_backend` defaults to "gloo" when launched on several processes without a GPU: Accelerate only picks a
      backend for GPU-like devices, and without one each process believes it is alone and trains on all the data.
    """

    # ---- TRL 1.16's fields and defaults -------------------------------------------------------------------------
    learning_rate: float = field(default=1e-4, metadata={"help": "The initial learning rate for AdamW (TRL's default)."})
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every X update steps (an integer, or a float in [0, 1): a share of the total steps)."},
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass (less memory, ~20% more compute; exact). None: "
                  "gradient_checkpointing (TRL's name, on by default)."},
    )
    # Declared as TRL declares it (a bool, default True), so the command line takes TRL's --no_gradient_checkpointing.
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "TRL's name for activation_checkpointing (used when that is not set)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. None: on where bf16 runs (a CUDA GPU with bf16) unless fp16 is set."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for AutoModelForSequenceClassification.from_pretrained when `model` is "
                  "a path or hub name (e.g. {\"dtype\": \"bfloat16\"}); `revision` also picks the tokenizer's."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow models and tokenizers that ship their own Python code (when `model` is a name)."},
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A chat template for the tokenizer: a .jinja / .j2 file, or a tokenizer folder to take the "
                  "template (and its special tokens) from."},
    )
    eos_token: str | None = field(
        default=None, metadata={"help": "End-of-turn token (in the vocabulary). None: the tokenizer's eos token."}
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad batches to a multiple of this many tokens. 'auto': 128 on Neuron devices, else none."},
    )
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Keep the activations saved for the backward pass in CPU memory (pinned) instead of on the "
                  "accelerator."},
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Deprecated in TRL 1.1 (removed in its 2.0): set tokenizer.pad_token instead. The padding "
                  "token; None: the tokenizer's pad token, else its eos token."},
    )

    # ---- rm_scale's fields --------------------------------------------------------------------------------------

    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Longest tokenised sequence (prompt + response, per side). A pair with a longer side is dropped "
            "and counted, or cut to its last max_length tokens (see truncation). None: no limit."
        },
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the centering term mean((r_chosen + r_rejected)^2) (Eisenstein et al. 2023) that "
            "pushes rewards towards mean zero. None or 0: off."
        },
    )
    batch_mean_coefficient: float = field(
        default=0.0,
        metadata={
            "help": "Weight of (mean of ALL rewards in the optimizer step)^2: centering on the global batch (all "
            "micro-batches, all ranks), exact whatever the world size and accumulation. 0: off. With gradient "
            "accumulation the whole-step terms cost one extra no-grad forward per micro-batch."
        },
    )
    reward_variance_coefficient: float = field(
        default=0.0,
        metadata={"help": "Weight of the variance of all rewards in the optimizer step (global batch). 0: off."},
    )
    target_reward_std: float | None = field(
        default=None,
        metadata={"help": "With target_std_coefficient: pull the std of all rewards in the step towards this."},
    )
    target_std_coefficient: float = field(
        default=0.0, metadata={"help": "Weight of (std of all rewards in the step - target_reward_std)^2. 0: off."}
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Set every dropout probability of the model to 0 (deterministic rewards, as TRL does)."},
    )
    score_head_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of a freshly initialised score head (only when the checkpoint has none). Fixed so the head "
            "does not depend on the world size or on the global RNG."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenise a map-style dataset (datasets.map num_proc)."}
    )
    batching: str = field(
        default="fixed",
        metadata={
            "help": "Micro-batching of streamed data (train_dataset=PairFiles(...)): 'fixed' (per_device_train_batch_size "
            "pairs in shuffled order), 'length_grouped' (same count, pairs of similar length together), or "
            "'token_budget' (up to per_device_train_batch_size pairs while 2 x pairs x longest <= token_budget), or "
            "'packed' (padding-free: up to per_device_train_batch_size pairs and token_budget real tokens, every "
            "sequence laid end to end in rows of max_length; decoder models)."
        },
    )
    token_budget: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per micro-batch: with batching='token_budget' the padded tokens (2 x pairs x longest "
            "side), with batching='packed' the real tokens of chosen + rejected. Needed by both."
        },
    )
    packed_attention: bool = field(
        default=True,
        metadata={
            "help": "With batching='packed' and a model on 'sdpa' attention: compute each packed sequence's own causal "
            "block only (one SDPA call per sequence, rm_scale.model.packed_attention) instead of the whole row with a "
            "block-diagonal mask. Same result, less work; other attention implementations are left as they are."
        },
    )
    shared_prefix: bool | None = field(
        default=None,
        metadata={
            "help": "With batching='packed': compute the prefix that chosen and rejected share (their common first "
            "tokens) once per pair, each side attending to it and to its own tokens (same rewards and gradients, "
            "fewer tokens; token_budget counts the tokens computed). None (default): on when the model uses "
            "rm_scale's packed attention (an 'sdpa' decoder with packed_attention on); True without it is an error."
        },
    )
    response_groups: bool | None = field(
        default=None,
        metadata={
            "help": "Streamed data with batching='packed': each row's K >= 2 responses as ONE group (the prompt "
            "computed once, each response once, every labelled pair of the row scored from the K rewards) instead "
            "of independent pairs; per_device_train_batch_size then counts groups, and accuracy counts the groups' "
            "preference edges. None (default): on when loss_type, ties or merge_prompt_pairs needs it. Needs the "
            "shared prefix (an 'sdpa' decoder, packed_attention on)."
        },
    )
    merge_prompt_pairs: bool = field(
        default=False,
        metadata={
            "help": "With response_groups: the rows of one prompt within a stream block (stream_block_size rows) "
            "become one group, identical responses computed once (pair data such as UltraFeedback-binarized or "
            "HelpSteer2-preference with several pairs per prompt)."
        },
    )
    loss_type: str = field(
        default="bradley_terry",
        metadata={
            "help": "'bradley_terry': -log sigmoid(r_better - r_worse [- margin]) over every preference edge, divided "
            "by the step's edge count (TRL's loss on pairs); 'plackett_luce': the listwise likelihood of each group's "
            "ranking (tied responses share a place), divided by the step's group count; groups whose labels do not "
            "form a ranking are dropped (counted). Both over all micro-batches and ranks of a step."
        },
    )
    ties: str = field(
        default="drop",
        metadata={
            "help": "Tied responses (equal scores, a tie label): 'drop' (no loss, as TRL and every other trainer) or "
            "'tie_model': Davidson's Bradley-Terry extension, P(tie) = nu sqrt(pi_i pi_j) / (pi_i + pi_j + "
            "nu sqrt(pi_i pi_j)), pi = exp(reward), with nu = tie_strength; ties then count in the step's edges."
        },
    )
    tie_strength: float = field(
        default=1.0,
        metadata={"help": "Davidson's nu (> 0) for ties='tie_model': the larger, the likelier a tie at equal rewards "
                  "(P(tie) = nu / (2 + nu) there). Evaluation counts a tie edge right when a tie is the most likely "
                  "outcome, |r_i - r_j| < 2 ln nu (so only nu > 1 can predict a tie)."},
    )
    sparse_last_layer: bool = field(
        default=True,
        metadata={
            "help": "Compute the last decoder layer only at the tokens whose reward is read (keys and values still at "
            "every position; rm_scale.model.last_layer): same rewards and gradients, about 1/num_layers less compute. "
            "Llama, Mistral, Qwen2 and Qwen3 layers; other models keep their full last layer."
        },
    )
    lean_activations: bool = field(
        default=True,
        metadata={
            "help": "RMSNorm and the SwiGLU MLP save less for the backward and recompute the rest elementwise "
            "(rm_scale.model.lean_layers): bit-identical rewards, equal gradients, ~22% less activation memory "
            "without activation checkpointing. Llama, Mistral, Qwen2 and Qwen3; other models are unchanged."
        },
    )
    stream_block_size: int = field(
        default=1024,
        metadata={"help": "Pairs read, shuffled and batched together when streaming; resume re-reads at most one block."},
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of PROMPTS (by a seeded hash: all pairs of a prompt on one side) from "
            "the streamed training data, for evaluation (recipes: data.eval: split)."
        },
    )
    truncation: str = field(
        default="drop",
        metadata={
            "help": "Pairs with a side longer than max_length: 'drop' them (counted in the run's data report) or "
            "'keep_end': keep the last max_length tokens (the response end, where the reward is read, and the prompt "
            "tail). Streamed and file-based data."
        },
    )
    strict_data: bool = field(
        default=False,
        metadata={
            "help": "Stop at the first bad row (malformed line, missing/empty/non-text field, identical sides, bad "
            "UTF-8, empty file, too long) with its file, line, field and fix. Default: skip it and count the reason."
        },
    )
    save_on_signal: bool = field(
        default=True,
        metadata={
            "help": "On SIGUSR1 or SIGTERM (Slurm time limit, preemption, scancel, kill), every rank finishes the "
            "current optimizer step, a full checkpoint is saved, and train() raises TrainingPreempted: the process "
            "exits with code 75 (rm_scale.train.preemption). Resume with resume_from_checkpoint: auto."
        },
    )
    requeue_on_signal: bool = field(
        default=True,
        metadata={
            "help": "After the checkpoint triggered by SIGUSR1 inside a Slurm job, rank 0 runs `scontrol requeue "
            "$SLURM_JOB_ID` (SIGTERM never requeues: scancel sends it too)."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint folder; 'auto': the latest complete checkpoint of output_dir if there is one, else "
            "start fresh; true: the latest complete checkpoint (an error if none). Complete = has "
            "rm_scale_complete.json, written after every rank finished the save. Read by rm-scale train; pass it to "
            "RewardTrainer.train(resume_from_checkpoint=...) in your own scripts."
        },
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds a collective may wait (gloo and NCCL process groups, also the gloo group RewardConfig "
            "starts itself). A rank that hangs or vanishes makes the others fail after this long instead of "
            "blocking forever; the launcher then ends the job non-zero."
        },
    )

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    def __post_init__(self) -> None:
        if self.activation_checkpointing is None:  # TRL's gradient_checkpointing=False must still turn it off
            self.activation_checkpointing = self.gradient_checkpointing is not False
        if self.bf16 is None:
            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if isinstance(self.pad_to_multiple_of, str):  # the command line passes strings
            self.pad_to_multiple_of = _pad_multiple(self.pad_to_multiple_of)
        if self.pad_token is not None:
            warnings.warn("`pad_token` is deprecated (TRL 1.1, removed in 2.0): set tokenizer.pad_token and pass the "
                          "tokenizer as processing_class.", FutureWarning, stacklevel=3)
        if self.ddp_backend is None and not torch.cuda.is_available() and _launched_world_size() > 1:
            self.ddp_backend = "gloo"
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; torch warns on every DataLoader
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"RewardConfig.max_length must be >= 2 or None, got {self.max_length}.")
        check_batching(batching=self.batching, token_budget=self.token_budget, truncation=self.truncation)
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(
                f"RewardConfig.center_rewards_coefficient must be >= 0 (or None to disable), got "
                f"{self.center_rewards_coefficient}."
            )
        _check_group_fields(self)
        super().__post_init__()

    @cached_property
    def _setup_devices(self) -> torch.device:
        # With `deepspeed=<json>` transformers initialises the process group through DeepSpeed and passes no backend,
        # which on a CPU-only machine leaves Accelerate unable to pick one. Initialise gloo ourselves first; both
        # Accelerate and DeepSpeed then reuse the existing group.
        if self.ddp_backend == "gloo" and _launched_world_size() > 1:
            init_gloo_group(timeout=self.ddp_timeout_delta)
        return TrainingArguments._setup_devices.func(self)


LOSS_TYPES = ("bradley_terry", "plackett_luce")
TIES = ("drop", "tie_model")


def _check_group_fields(args: RewardConfig) -> None:
    """Validate loss_type / ties / tie_strength and resolve response_groups (None: on when one of them needs it)."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"RewardConfig.loss_type must be one of {LOSS_TYPES}, got {args.loss_type!r}.")
    if args.ties not in TIES:
        raise ValueError(f"RewardConfig.ties must be one of {TIES}, got {args.ties!r}.")
    if not args.tie_strength > 0:
        raise ValueError(f"RewardConfig.tie_strength (Davidson's nu) must be > 0, got {args.tie_strength}.")
    if args.loss_type == "plackett_luce" and args.ties == "tie_model":
        raise ValueError("loss_type='plackett_luce' ranks tied responses in one place (Breslow): ties='tie_model' "
                         "is for loss_type='bradley_terry'; set ties: drop.")
    needs = group_needs(args.loss_type, args.ties, args.merge_prompt_pairs)
    if args.response_groups is False and needs:
        raise ValueError(f"{', '.join(needs)} needs response_groups (one forward per prompt's responses): leave "
                         "response_groups unset or true.")
    if args.response_groups is None:
        args.response_groups = bool(needs)
    if args.response_groups and args.batching != "packed":
        raise ValueError(f"response_groups ({', '.join(needs) or 'set'}) needs batching='packed' (and token_budget): "
                         f"got batching={args.batching!r}.")


def group_needs(loss_type: str, ties: str, merge_prompt_pairs: bool) -> list[str]:
    """The settings that need response groups (one forward per prompt's responses); unset response_groups follows
    them."""
    return [name for name, on in (("loss_type='plackett_luce'", loss_type == "plackett_luce"),
                                  ("ties='tie_model'", ties == "tie_model"),
                                  ("merge_prompt_pairs", merge_prompt_pairs)) if on]


def _launched_world_size() -> int:
    """World size set by the launcher (accelerate, torchrun, deepspeed, srun via accelerate); 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _pad_multiple(value: str) -> int | None:
    if value == "auto":  # Neuron compiles once per input shape: padding bounds the number of compilations
        return 128 if os.environ.get("NEURON_RT_VISIBLE_CORES") else None
    return None if value.lower() in ("none", "null") else int(value)
