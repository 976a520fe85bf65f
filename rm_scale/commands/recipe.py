"""Recipes: one YAML file with `model`, `lora`, `data` and `train` sections, plus `--key value` overrides.

`train` holds `RewardConfig` fields (any `TrainingArguments` field). World size, nodes and ranks are never here: they
belong to the launcher. DeepSpeed settings live in `ds_configs/*.json`, chosen by the accelerate config (or by
`train.deepspeed` when launched without accelerate).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rm_scale.config import RewardConfig
from rm_scale.data.sources import Source, file_kind, parse_sources, resolve_files
from rm_scale.model.pretrained import smollm2_path
from rm_scale.model.reward import DTYPES

SECTIONS = ("model", "lora", "data", "train")
MODEL_KEYS = {"name_or_path", "dtype", "trust_remote_code", "revision", "attn_implementation"}
DATA_KEYS = {"train", "eval", "streaming"}
LORA_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias", "use_rslora"}
# The model shipped with rm_scale (no download); shipped data names live in rm_scale.data.sources.
SMOLLM2 = "rm_scale:smollm2-135m-instruct"


def _reward_config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RewardConfig) if f.init}


def load_recipe(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe and apply ``--section.key value`` / ``--key value`` overrides; validate the keys."""
    recipe: dict[str, Any] = {s: None if s == "lora" else {} for s in SECTIONS}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe is a mapping with sections {SECTIONS}.")
        unknown = set(loaded) - set(SECTIONS)
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; allowed: {list(SECTIONS)}.")
        recipe.update(loaded)
    _apply_overrides(recipe, overrides)
    validate_recipe(recipe, source=str(path) if path else "<overrides>")
    _coerce_yaml_1_1(recipe["train"])
    return recipe


def _coerce_yaml_1_1(train: dict[str, Any]) -> None:
    """Undo YAML 1.1 surprises for typed fields: `1e-5` (no dot) reads as a string, and `no`/`yes` read as booleans
    where TrainingArguments expects the strings ("eval_strategy: no")."""
    types = {f.name: str(f.type) for f in dataclasses.fields(RewardConfig)}
    for key, value in train.items():
        kind = types.get(key, "")
        if "float" in kind and isinstance(value, str):
            try:
                train[key] = float(value)
            except ValueError:
                pass
        elif isinstance(value, bool) and "bool" not in kind and ("str" in kind or "Strategy" in kind):
            train[key] = "yes" if value else "no"


def flag_pairs(args: Sequence[str]) -> list[tuple[str, str]]:
    """``--key value`` pairs; a flag followed by another flag (or nothing) is a boolean switch: ``--bf16`` = true."""
    out, i = [], 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--"):
            raise ValueError(f"Override {flag!r} must look like --key or --section.key (then its value).")
        if "=" in flag:  # --key=value
            key, _, value = flag.partition("=")
            out.append((key, value))
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((flag, args[i + 1]))
            i += 2
        else:
            out.append((flag, "true"))
            i += 1
    return out


def _apply_overrides(recipe: dict[str, Any], overrides: Sequence[str]) -> None:
    train_fields = _reward_config_fields()
    for flag, raw in flag_pairs(overrides):
        key = flag[2:].replace("-", "_")
        value = _parse_value(raw)
        if key.startswith("no_") and key not in train_fields and key[3:] in train_fields and value is True:
            key, value = key[3:], False  # HfArgumentParser's --no_<flag> for a field that is on by default
        if key == "gradient_checkpointing":  # TRL's name: it must win over a recipe's activation_checkpointing
            recipe["train"]["activation_checkpointing"] = value
        if "." in key:
            section, key = key.split(".", 1)
        elif key in train_fields:
            section = "train"
        elif key in MODEL_KEYS:
            section = "model"
        else:
            raise ValueError(f"Unknown override --{key}: use --section.key with a section in {SECTIONS}.")
        if section not in SECTIONS:
            raise ValueError(f"Unknown section in override {flag!r}; allowed: {SECTIONS}.")
        if section == "lora" and recipe["lora"] is None:
            recipe["lora"] = {}
        recipe[section][key] = value


def _parse_value(raw: str) -> Any:
    """YAML scalars, plus floats YAML 1.1 reads as strings (``5e-6`` has no dot)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def validate_recipe(recipe: dict[str, Any], *, source: str) -> None:
    """Raise ValueError naming the file, the key and the fix."""
    for forbidden in ("world_size", "num_processes", "local_rank", "num_machines"):
        if forbidden in (recipe.get("train") or {}):
            raise ValueError(f"{source}: train.{forbidden} belongs to the launcher (accelerate / Slurm), not the recipe.")
    checks = (("model", MODEL_KEYS), ("data", DATA_KEYS), ("lora", LORA_KEYS), ("train", _reward_config_fields()))
    for section, allowed in checks:
        body = recipe.get(section)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping, got {type(body).__name__}.")
        unknown = set(body) - allowed
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown)} in {section!r}; allowed: {sorted(allowed)}.")
    if not recipe["model"].get("name_or_path"):
        raise ValueError(f"{source}: model.name_or_path is required (a local folder, a hub name, or {SMOLLM2}).")
    if not recipe["data"].get("train"):
        raise ValueError(f"{source}: data.train is required (files, globs or rm_scale:demo/train).")
    if not recipe["train"].get("output_dir"):
        raise ValueError(f"{source}: train.output_dir is required.")


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == SMOLLM2:
        return str(smollm2_path())
    return name_or_path


def resolve_data_files(files: str | Sequence[str]) -> list[str]:
    """Expand shipped names (rm_scale:demo/...), globs and folders; a path that matches nothing is an error."""
    return resolve_files([files] if isinstance(files, str) else list(files))


def load_preference_files(files: str | Sequence[str]) -> Any:
    """A map-style `datasets.Dataset` of the raw rows of local .jsonl/.json/.parquet/.csv files (optionally .gz)."""
    from datasets import load_dataset

    paths = resolve_data_files(files)
    kinds = {file_kind(p) for p in paths}
    if len(kinds) != 1 or kinds & {"saved"}:
        raise ValueError(f"One file type per data list, and no save_to_disk folders here; got {sorted(kinds)}.")
    kind = kinds.pop()
    return load_dataset("json" if kind == "jsonl" else kind, data_files=paths, split="train")


@dataclass(frozen=True)
class ModelSpec:
    """The recipe's `model` section, resolved: a local folder or hub name (the shipped SmolLM2 built if asked for)."""

    path: str
    dtype: str = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None

    def load_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keywords beyond the path (the model's; the tokenizer takes the revision too)."""
        out: dict[str, Any] = {"dtype": self.dtype, "trust_remote_code": self.trust_remote_code}
        out.update({k: v for k, v in (("revision", self.revision), ("attn_implementation", self.attn_implementation))
                    if v is not None})
        return out


@dataclass(frozen=True)
class DataSpec:
    """The recipe's `data` section, parsed once: training sources, evaluation (sources, "split" or None), and whether
    the training data streams (auto: when train.max_steps > 0, since a stream has no length)."""

    train: list[Source]
    eval: list[Source] | str | None
    streaming: bool


def resolve_model(recipe: dict[str, Any]) -> ModelSpec:
    """The model section, with what ``train.model_init_kwargs`` / ``train.trust_remote_code`` say (RewardConfig
    fields that would otherwise apply only to a model given by name in Python); the same key set differently in both
    places is an error."""
    model, train = recipe["model"], recipe.get("train", {})
    merged = {**(train.get("model_init_kwargs") or {}), "trust_remote_code": train.get("trust_remote_code")}
    merged = {k: v for k, v in merged.items() if v is not None}
    unknown = sorted(set(merged) - (MODEL_KEYS - {"name_or_path"}))
    if unknown:
        raise ValueError(f"train.model_init_kwargs: {unknown} not supported by rm-scale train (it takes "
                         f"{sorted(MODEL_KEYS - {'name_or_path', 'trust_remote_code'})}); drop them.")
    for key, value in model.items():
        if key in merged and merged[key] != value:
            raise ValueError(f"model.{key}={value!r} but train sets {key}={merged[key]!r}: set it in one place.")
    merged.update({k: v for k, v in model.items() if k != "name_or_path"})
    if merged.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"model.dtype={merged['dtype']!r}: use one of {list(DTYPES)}.")
    return ModelSpec(path=resolve_model_path(model["name_or_path"]), dtype=merged.get("dtype", "float32"),
                     trust_remote_code=bool(merged.get("trust_remote_code", False)), revision=merged.get("revision"),
                     attn_implementation=merged.get("attn_implementation"))


def resolve_data(recipe: dict[str, Any], args: RewardConfig) -> DataSpec:
    """Parse the data section and check that every path matches a file ("Data path ... matches no file")."""
    data = recipe["data"]
    train = parse_sources(data["train"])
    spec = data.get("eval")
    evaluation = spec if spec in (None, "split") else parse_sources(spec)
    if spec == "split" and not args.eval_fraction:
        raise ValueError("data.eval: split needs train.eval_fraction > 0 (the share of prompts held out).")
    for source in train + (evaluation if isinstance(evaluation, list) else []):
        resolve_files(source.paths)
    streaming = data.get("streaming", "auto")
    streaming = args.max_steps > 0 if streaming == "auto" else bool(streaming)
    return DataSpec(train=train, eval=evaluation, streaming=streaming)


# TRL's command line (`trl reward --model_name_or_path M --dataset_name D ...`): ScriptArguments and ModelConfig flags.
TRL_DATA_FLAGS = ("dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split")
TRL_MODEL_FLAGS = ("model_name_or_path", "model_revision", "dtype", "torch_dtype", "trust_remote_code",
                   "attn_implementation")
TRL_LORA_FLAGS = {"use_peft": None, "lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                  "lora_target_modules": "target_modules"}


def recipe_from_trl_flags(args: Sequence[str]) -> dict[str, Any]:
    """A recipe from TRL's reward command line, so ``trl reward ...`` becomes ``rm-scale train ...``: the model and
    data set flags, ``--use_peft`` with TRL's LoRA defaults (r 16, alpha 32, dropout 0.05), any RewardConfig field."""
    flags = {k[2:].replace("-", "_"): v for k, v in flag_pairs(args)}
    known = set(TRL_DATA_FLAGS) | set(TRL_MODEL_FLAGS) | set(TRL_LORA_FLAGS)
    rest = [x for k, v in flags.items() if k not in known for x in (f"--{k}", v)]
    for needed in ("model_name_or_path", "dataset_name"):
        if needed not in flags:
            raise ValueError(f"rm-scale train needs --config recipe.yaml, or TRL's flags: --{needed} is missing "
                             "(--model_name_or_path M --dataset_name D [--dataset_config C] [--dataset_train_split S] "
                             "--output_dir O [any RewardConfig field]).")
    model = {"name_or_path": flags["model_name_or_path"], "dtype": flags.get("dtype", flags.get("torch_dtype",
                                                                                                "float32"))}
    if flags.get("trust_remote_code", "false").lower() == "true":
        model["trust_remote_code"] = True
    model.update({key: flags[flag] for flag, key in (("model_revision", "revision"),
                                                     ("attn_implementation", "attn_implementation")) if flag in flags})
    name, config = flags["dataset_name"], flags.get("dataset_config")
    data: dict[str, Any] = {"train": [dataset_path(name, config, flags.get("dataset_train_split", "train"))]}
    eval_strategy = flags.get("eval_strategy", "no")
    if eval_strategy != "no":
        data["eval"] = [dataset_path(name, config, flags.get("dataset_test_split", "test"))]
    lora = None
    if flags.get("use_peft", "false").lower() == "true":
        lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
        lora.update({TRL_LORA_FLAGS[k]: _parse_value(v) for k, v in flags.items() if TRL_LORA_FLAGS.get(k)})
    recipe = {"model": model, "lora": lora, "data": data, "train": {}}
    _apply_overrides(recipe, rest)
    validate_recipe(recipe, source="<command line>")
    _coerce_yaml_1_1(recipe["train"])
    return recipe


def dataset_path(name: str, config: str | None, split: str) -> str:
    """A local file / folder as it is; a hub data set as ``hub:name[:config]@split`` (streamed by datasets)."""
    if os.path.exists(os.path.expanduser(name)):
        return name
    return f"hub:{name}{':' + config if config else ''}@{split}"
