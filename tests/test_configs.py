"""Every shipped config file (recursively) loads and validates; conflicts are errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rm_scale.config import RewardConfig
from rm_scale.dsconfig import load_ds_config, resolve_ds_config
from rm_scale.commands.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "outputs", "build", "node_modules", ".pytest_cache"}


def _shipped(pattern: str) -> list[Path]:
    return sorted(p for p in ROOT.rglob(pattern) if not SKIP_DIRS & set(p.relative_to(ROOT).parts))


DS = _shipped("ds_configs/**/*.json")
LAUNCH = _shipped("launch/**/*.yaml")
RECIPES = _shipped("recipes/**/*.yaml")


def test_every_config_folder_is_found():
    assert len(DS) >= 4 and len(LAUNCH) >= 5 and len(RECIPES) >= 4


def test_every_json_and_yaml_in_the_repo_parses():
    for path in _shipped("*.json") + _shipped("*.yaml") + _shipped("*.yml"):
        text = path.read_text()
        json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


@pytest.mark.parametrize("path", DS, ids=lambda p: str(p.relative_to(ROOT)))
def test_deepspeed_configs_fill_from_the_run_config(path):
    args = RewardConfig(output_dir="/tmp/rm_scale_cfg", per_device_train_batch_size=3, gradient_accumulation_steps=5,
                        max_grad_norm=0.7, learning_rate=1e-5)
    config = resolve_ds_config(path, args, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 60
    assert config["gradient_clipping"] == 0.7
    if "optimizer" in config:
        assert config["optimizer"]["params"]["lr"] == 1e-5


def test_a_hard_coded_conflict_is_an_error(tmp_path):
    config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    config["gradient_accumulation_steps"] = 8
    path = tmp_path / "conflict.json"
    path.write_text(json.dumps(config))
    args = RewardConfig(output_dir="/tmp/rm_scale_cfg", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        resolve_ds_config(path, args, world_size=2)


def test_zero3_without_gathered_save_is_rejected(tmp_path):
    config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    path = tmp_path / "nosave.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        load_ds_config(path)


@pytest.mark.parametrize("path", LAUNCH, ids=lambda p: str(p.relative_to(ROOT)))
def test_launch_configs_show_their_command_and_point_at_real_files(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file launch/{path.name} ")
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {"DEEPSPEED", "MULTI_GPU"}
    assert config["use_cpu"] is False  # use_cpu: true silently turns DeepSpeed off
    if config["distributed_type"] == "DEEPSPEED":
        ds = config["deepspeed_config"]["deepspeed_config_file"]
        assert (ROOT / ds).exists(), ds
        stage = load_ds_config(ROOT / ds)["zero_optimization"]["stage"]
        assert config["deepspeed_config"]["zero3_init_flag"] is (stage == 3)
    recipe = first.split("--config ")[1].split()[0] if "--config " in first else None
    assert recipe is None or (ROOT / recipe).exists(), recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipes_load_and_build_a_reward_config(path):
    recipe = load_recipe(path)
    RewardConfig(**recipe["train"])
    launch = next(line for line in path.read_text().splitlines() if "accelerate launch" in line)
    launch_file = launch.split("--config_file ")[1].split()[0]
    assert (ROOT / launch_file).exists(), launch_file
    assert f"--config recipes/{path.name}" in launch


def test_recipe_errors_name_the_key_and_the_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: x}\ndata: {train: [a.jsonl]}\ntrain: {output_dir: o, learnign_rate: 1}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key\(s\) \['learnign_rate'\] in 'train'"):
        load_recipe(bad)
    bad.write_text("model: {name_or_path: x}\ndata: {train: [a.jsonl]}\ntrain: {output_dir: o, world_size: 2}\n")
    with pytest.raises(ValueError, match="belongs to the launcher"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="Unknown override --nope"):
        load_recipe(ROOT / "recipes" / "zero3.yaml", ["--nope", "1"])
    recipe = load_recipe(ROOT / "recipes" / "zero3.yaml", ["--learning_rate", "5e-6", "--lora.r", "4"])
    assert recipe["train"]["learning_rate"] == 5e-6 and recipe["lora"] == {"r": 4}
    # TRL's --no_gradient_checkpointing (HfArgumentParser's form) turns it off, also over the recipe's own setting
    recipe = load_recipe(ROOT / "recipes" / "zero3.yaml", ["--no_gradient_checkpointing", "--output_dir", "o"])
    assert RewardConfig(**recipe["train"]).activation_checkpointing is False


def test_dry_run_prints_the_resolved_config_and_deepspeed_dict():
    proc = subprocess.run(
        [sys.executable, "-m", "rm_scale", "train", "--config", "recipes/zero3.yaml", "--dry-run",
         "--launch-config", "launch/zero3.yaml", "--per_device_train_batch_size", "3"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    # raw_decode: DeepSpeed's "Setting accelerator to CPU" log line sometimes lands on stdout right after the dict
    ds, _ = json.JSONDecoder().raw_decode(proc.stdout.split("# DeepSpeed (ds_configs/zero3.json, world size 2)\n")[1])
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 3 * 2 * 2
    assert ds["zero_optimization"]["reduce_scatter"] is False  # 2 CPU ranks: gloo (rm_scale.dsconfig.gloo_defaults)
    assert "learning_rate: 1.0e-05" in proc.stdout
    assert "# data.train (map-style)" in proc.stdout and "pair 1: prompt:" in proc.stdout  # the data is read too


def test_a_deepspeed_scheduler_block_is_called_out_and_no_shipped_json_has_one(tmp_path):
    """A JSON "scheduler" makes transformers build DeepSpeed's schedule instead of the recipe's lr_scheduler_type
    (the offload JSON shipped a WarmupDecayLR under a cosine recipe): --dry-run warns; the shipped JSONs have none."""
    assert not [p.name for p in (ROOT / "ds_configs").glob("*.json") if "scheduler" in json.loads(p.read_text())]
    config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    config["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto"}}
    ds = tmp_path / "sched.json"
    ds.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "rm_scale", "train", "--config", "recipes/zero3.yaml", "--dry-run", "--deepspeed",
         str(ds), "--lr_scheduler_type", "cosine"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "# warning: The DeepSpeed JSON's scheduler (WarmupDecayLR) replaces lr_scheduler_type='cosine'" in proc.stdout


def test_model_loading_options_from_the_model_section_or_train_model_init_kwargs():
    """RewardConfig's model_init_kwargs / trust_remote_code in a recipe's train section load the model under
    `rm-scale train` too (they applied only to a model given by name in Python); a clash is an error."""
    from rm_scale.commands.recipe import resolve_model

    spec = resolve_model({"model": {"name_or_path": "m", "revision": "v1"},
                          "train": {"model_init_kwargs": {"dtype": "bfloat16", "attn_implementation": "eager"}}})
    assert spec.load_kwargs() == {"dtype": "bfloat16", "trust_remote_code": False, "revision": "v1",
                                  "attn_implementation": "eager"}
    with pytest.raises(ValueError, match=r"model.dtype='float32' but train sets dtype='bfloat16': set it in one"):
        resolve_model({"model": {"name_or_path": "m", "dtype": "float32"},
                       "train": {"model_init_kwargs": {"dtype": "bfloat16"}}})
    with pytest.raises(ValueError, match=r"\['device_map'\] not supported by rm-scale train"):
        resolve_model({"model": {"name_or_path": "m"}, "train": {"model_init_kwargs": {"device_map": "auto"}}})


def test_yaml_exponent_floats_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {train: [a.jsonl]}\ntrain: {output_dir: o, learning_rate: 1e-5}\n")
    assert load_recipe(path)["train"]["learning_rate"] == 1e-5


def test_yaml_no_is_the_string_no_for_strategies(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {train: [a.jsonl]}\ntrain: {output_dir: o, save_strategy: no}\n")
    recipe = load_recipe(path, ["--eval_strategy", "no"])
    assert recipe["train"]["save_strategy"] == "no" and recipe["train"]["eval_strategy"] == "no"
    assert RewardConfig(**recipe["train"]).save_strategy == "no"


def test_gloo_defaults_fill_only_what_the_zero3_json_leaves_unset():
    from rm_scale.dsconfig import gloo_defaults, on_gloo

    assert on_gloo("gloo", 2) and not on_gloo("gloo", 1) and not on_gloo("nccl", 2)
    assert on_gloo(None, 2) == (not torch.cuda.is_available())

    config = {"zero_optimization": {"stage": 3}}
    assert gloo_defaults(config) == {"zero_optimization.reduce_scatter": False}
    assert config["zero_optimization"]["reduce_scatter"] is False
    given = {"zero_optimization": {"stage": 3, "reduce_scatter": True}}
    assert gloo_defaults(given) == {} and given["zero_optimization"]["reduce_scatter"] is True
    for other in ({"zero_optimization": {"stage": 2}}, {}, {"zero_optimization": "not a dict"}):
        before = json.dumps(other)
        assert gloo_defaults(other) == {} and json.dumps(other) == before
