"""`rm-scale` command line: `train`, `eval`, `score`, `serve`, `inspect-data`, `demo`.

    rm-scale train --config recipe.yaml [--key value ...] [--dry-run]
    rm-scale train --model_name_or_path M --dataset_name D --output_dir O [...]   (TRL's `trl reward` flags)
    rm-scale eval --model outputs/run/final --data test.jsonl [--json]
    rm-scale score --model outputs/run/final --data rollouts.jsonl --out scores.jsonl
    rm-scale serve --model outputs/run/final [--port 8000]
    rm-scale inspect-data data/*.jsonl.gz --world-size 8 [--json]
    accelerate launch --config_file launch/zero3.yaml -m rm_scale train --config recipes/zero3.yaml
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from rm_scale.data.batching import BATCHING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rm-scale", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a reward model from a recipe")
    train.add_argument("--config", help="recipe YAML (sections model, lora, data, train); without it, TRL's flags: "
                       "--model_name_or_path M --dataset_name D [--dataset_config C] [--use_peft] --output_dir O")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed dict, then exit")
    train.add_argument(
        "--launch-config", help="with --dry-run: the accelerate YAML whose DeepSpeed JSON and process count to show"
    )
    ev = sub.add_parser("eval", help="score a trained model on preference files: accuracy (per subset), rewards, PNG")
    ev.add_argument("--model", required=True, help="a saved model folder (<output_dir>/final) or a PEFT adapter folder")
    ev.add_argument("--data", required=True, nargs="+", help="preference files (.jsonl/.json/.parquet/.csv, globs)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--max-length", type=int, help="drop (and count) pairs with a longer side; default: keep all")
    ev.add_argument("--plot", help="where to write the PNG (default: <model>/reward_eval.png)")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    ev.add_argument("--format", help="a data set preset for --data (README, 'Public data sets'), e.g. shp")
    ev.add_argument("--groups", action="store_true", help="each multi-response row as one group (prompt computed "
                    "once): accuracy over its edges, best-of-K accuracy, ties (README, 'K responses per prompt')")
    ev.add_argument("--tie-strength", type=float, help="with --groups: the tie model's nu, to report tie accuracy")
    _score_parsers(sub)
    ins = sub.add_parser("inspect-data", help="what the trainer would see: format, kept/dropped pairs, per-rank "
                         "counts, lengths, padding efficiency")
    ins.add_argument("paths", nargs="*", help="preference files, globs, folders (or --config)")
    ins.add_argument("--config", help="a recipe: inspect its data.train sources (format, columns, where) with its "
                     "tokenizer and batching")
    ins.add_argument("--show", type=int, default=3, help="print the first N pairs as read and as the model sees them")
    ins.add_argument("--model", default="rm_scale:smollm2-135m-instruct", help="tokenizer to use (folder or name)")
    ins.add_argument("--world-size", type=int, default=1)
    ins.add_argument("--pairs-per-batch", type=int, default=8, help="per_device_train_batch_size")
    ins.add_argument("--max-length", type=int, default=1024)
    ins.add_argument("--batching", default="length_grouped", choices=list(BATCHING))
    ins.add_argument("--token-budget", type=int)
    ins.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false", default=None,
                     help="packed batches without each pair's shared prefix computed once")
    ins.add_argument("--strict", action="store_true", help="stop at the first bad row with file, line, field, fix")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    demo = sub.add_parser("demo", help="the embedded default: 2-rank ZeRO-3 training of SmolLM2-135M on demo pairs")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.add_argument("--num-processes", type=int, default=2)
    args, rest = parser.parse_known_args(argv)
    try:
        return _dispatch(parser, args, rest)
    except ValueError as e:  # a user's input: the message names the file/field and the fix; no traceback
        print(f"rm-scale {args.command}: error: {e}", file=sys.stderr)
        _exit_without_waiting()
        return 2


def _exit_without_waiting() -> None:
    """A rank that failed exits at once: the other ranks may be inside a collective this one will never join, so it
    must not wait for them at exit (rm_scale.distributed.leave_together_at_exit, armed by a finished train())."""
    distributed = sys.modules.get("rm_scale.distributed")  # loaded only if torch was: --help stays light
    if distributed is not None:
        distributed.leave_together_at_exit(armed=False)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    if args.command == "train":
        from rm_scale.commands.recipe import load_recipe, recipe_from_trl_flags  # lazy, as below: --help needs no torch
        from rm_scale.train.preemption import restore_default_sigterm  # lazy: imports torch

        restore_default_sigterm()

        recipe = load_recipe(args.config, rest) if args.config else recipe_from_trl_flags(rest)
        if args.dry_run:
            return dry_run(recipe, launch_config=args.launch_config)
        from rm_scale.commands.run import train_from_recipe  # lazy: imports torch

        faulthandler.enable()  # a rank killed by a fatal signal prints every thread's Python stack first
        train_from_recipe(recipe)
        return _leave_launched_rank(0)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "eval":
        from rm_scale.commands.evaluate import run_eval  # lazy: imports torch

        return run_eval(args.model, args.data, batch_size=args.batch_size, max_length=args.max_length,
                        as_json=args.json, plot_path=args.plot, dtype=args.dtype, data_format=args.format,
                        groups=args.groups, tie_strength=args.tie_strength)
    if args.command == "score":
        from rm_scale.commands.score import run_score  # lazy: imports torch

        return run_score(args.model, args.data, args.out, data_format=args.format, normalize=args.normalize,
                         batch_tokens=args.batch_tokens, max_length=args.max_length, dtype=args.dtype,
                         rows_per_batch=args.rows_per_batch)
    if args.command == "serve":
        from rm_scale.commands.serve import run_serve  # lazy: imports torch and uvicorn

        return run_serve(args.model, host=args.host, port=args.port, max_batch_tokens=args.max_batch_tokens,
                         max_wait_ms=args.max_wait_ms, max_request_bytes=args.max_request_bytes,
                         max_items=args.max_items, normalize=args.normalize, dtype=args.dtype,
                         token_env=args.token_env)
    if args.command == "inspect-data":
        from rm_scale.commands.inspect_data import run_inspect  # lazy: imports torch

        if not args.paths and not args.config:
            parser.error("inspect-data needs data paths or --config recipe.yaml")
        return run_inspect(args.paths, model=args.model, world_size=args.world_size,
                           pairs_per_batch=args.pairs_per_batch, max_length=args.max_length, batching=args.batching,
                           token_budget=args.token_budget, strict=args.strict, as_json=args.json,
                           config_file=args.config, show=args.show, shared_prefix=args.shared_prefix)
    from rm_scale.commands.demo import run_demo  # lazy: the demo imports nothing heavy, but keep --help minimal

    return run_demo(output_dir=args.output_dir, num_processes=args.num_processes)


def _leave_launched_rank(code: int) -> int:
    """A launched rank (WORLD_SIZE > 1) that finished and left its process group ends here: the atexit handlers run
    (W&B's finish, the heartbeat thread's join), logs and stdio are flushed, then os._exit skips the interpreter's
    finalisation. There, among C++ destructors and daemon threads, a 2-rank ZeRO-3 rank that had already saved its
    model aborted (SIGABRT; seen once in CI's suite, not in 20 runs here), and the launcher failed the whole run. A
    single process returns as usual."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    atexit._run_exitfuncs()  # what the interpreter would run at exit, now
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _score_parsers(sub: Any) -> None:
    dtypes = ["float32", "bfloat16", "float16", "auto"]
    sc = sub.add_parser("score", help="the reward of every row of files (sharded over ranks, resumable) to JSONL")
    sc.add_argument("--model", required=True, help="a saved model folder (<output_dir>/final) or adapter folder")
    sc.add_argument("--data", required=True, nargs="+", help="JSONL / JSON / parquet files or globs: rows with "
                    "text, prompt + response, or preference pairs in any format training reads")
    sc.add_argument("--out", required=True, help="the scores, one JSON line per row in input order")
    sc.add_argument("--format", help="a data set preset for preference rows (README, 'Public data sets')")
    sc.add_argument("--normalize", action="store_true", help="(reward - mean) / std from the model's final evaluation")
    sc.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward (2k-16k cost the same per token on CPU)")
    sc.add_argument("--max-length", type=int, help="default: the model's (scoring.json); longer texts keep their end")
    sc.add_argument("--dtype", default="float32", choices=dtypes)
    sc.add_argument("--rows-per-batch", type=int, default=256, help="rows scored and written (flushed) together")
    sv = sub.add_parser("serve", help="an HTTP reward server (OpenRLHF's /get_reward, /score, /health)")
    sv.add_argument("--model", required=True, help="a saved model folder (<output_dir>/final) or adapter folder")
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch-tokens", type=int, default=16384, help="tokens per forward of batched requests")
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others to batch")
    sv.add_argument("--max-request-bytes", type=int, help="larger requests get a 400 (default 8 MiB)")
    sv.add_argument("--max-items", type=int, help="texts per request (default 4096)")
    sv.add_argument("--normalize", action="store_true", help="(reward - mean) / std from the model's final evaluation")
    sv.add_argument("--dtype", default="float32", choices=dtypes)
    sv.add_argument("--token-env", default="RM_SCALE_SERVE_TOKEN",
                    help="environment variable holding a bearer token to require (unset: no token)")


def dry_run(recipe: dict[str, Any], *, launch_config: str | None = None) -> int:
    """Print the recipe after overrides, the resolved RewardConfig and the final DeepSpeed dict."""
    from rm_scale.config import RewardConfig  # lazy: imports torch and transformers
    from rm_scale.dsconfig import resolve_ds_config, scheduler_note  # lazy, with the line above

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
    resolved = resolve_ds_config(ds_path, args, world_size=world_size) if ds_path else None
    print(json.dumps(resolved, indent=2))
    note = scheduler_note(resolved, args.lr_scheduler_type) if resolved else None
    if note:
        print(f"# warning: {note}")
    return _dry_run_data(recipe, args)


def _dry_run_data(recipe: dict[str, Any], args: Any) -> int:
    """The data as training would read it: each source's format and the first pairs; an error without any pair."""
    from transformers import AutoTokenizer  # lazy, with the two imports of dry_run

    from rm_scale.commands.inspect_data import describe_formats, sample_pairs  # lazy, as in dry_run
    from rm_scale.commands.recipe import resolve_data, resolve_model  # lazy, as in dry_run
    from rm_scale.data.stream import require_pairs, stream_config  # lazy, as in dry_run
    from rm_scale.model.reward import ensure_pad_token  # lazy, as in dry_run

    data, model = resolve_data(recipe, args), resolve_model(recipe)
    tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code,
                                              revision=model.revision)
    ensure_pad_token(tokenizer)
    config = stream_config(data.train, args, split="train")
    print(f"# data.train ({'streamed' if data.streaming else 'map-style'})")
    for source, fmt in zip(data.train, describe_formats(config)):
        print(f"{source.paths}: {fmt}")
    require_pairs(config, tokenizer)  # ValueError (exit 2): not a single usable pair, with the counts by reason
    for i, sample in enumerate(sample_pairs(config, tokenizer, count=2), 1):
        print(f"pair {i}: prompt: {sample['prompt'][:200]}\n        chosen: {sample['chosen'][:200]}\n"
              f"        rejected: {sample['rejected'][:200]}")
    return 0


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
