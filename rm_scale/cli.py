"""`rm-scale` command line: `train`, `demo`.

    rm-scale train --config recipe.yaml [--key value ...] [--dry-run]
    accelerate launch --config_file launch/zero3.yaml -m rm_scale train --config recipes/zero3.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rm-scale", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a reward model from a recipe")
    train.add_argument("--config", required=True, help="recipe YAML (sections model, lora, data, train)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed dict, then exit")
    train.add_argument(
        "--launch-config", help="with --dry-run: the accelerate YAML whose DeepSpeed JSON and process count to show"
    )
    demo = sub.add_parser("demo", help="the embedded default: 2-rank ZeRO-3 training of SmolLM2-135M on demo pairs")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--num-processes", type=int, default=2)
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from rm_scale.recipe import load_recipe

        recipe = load_recipe(args.config, rest)
        if args.dry_run:
            return dry_run(recipe, launch_config=args.launch_config)
        from rm_scale.run import train_from_recipe

        train_from_recipe(recipe)
        return 0
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    from rm_scale.demo import run_demo

    return run_demo(output_dir=args.output_dir, num_processes=args.num_processes)


def dry_run(recipe: dict[str, Any], *, launch_config: str | None = None) -> int:
    """Print the recipe after overrides, the resolved RewardConfig and the final DeepSpeed dict."""
    from rm_scale.config import RewardConfig
    from rm_scale.dsconfig import resolve_ds_config

    ds_path, world_size = recipe["train"].get("deepspeed"), int(os.environ.get("WORLD_SIZE", "1"))
    if launch_config:
        launch = yaml.safe_load(Path(launch_config).read_text())
        ds_path = ds_path or launch.get("deepspeed_config", {}).get("deepspeed_config_file")
        world_size = int(launch.get("num_processes", world_size))
    ds_path = ds_path or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    train = {k: v for k, v in recipe["train"].items() if k != "deepspeed"}
    args = RewardConfig(**train)
    print("# recipe (after overrides)")
    print(yaml.safe_dump(recipe, sort_keys=False), end="")
    print("# RewardConfig (resolved)")
    print(json.dumps(_jsonable(args.to_dict()), indent=2, sort_keys=True))
    print(f"# DeepSpeed ({ds_path or 'none'}, world size {world_size})")
    print(json.dumps(resolve_ds_config(ds_path, args, world_size=world_size) if ds_path else None, indent=2))
    return 0


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
