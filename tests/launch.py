"""Run rm_scale for real: one plain process, or several through `accelerate launch` with the shipped configs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_ds_config(name: str, tmp: Path) -> Path:
    """A shipped DeepSpeed JSON with persistence threshold 0: else ZeRO-3 keeps a tiny model's params whole."""
    config = json.loads((ROOT / "ds_configs" / name).read_text())
    if config["zero_optimization"]["stage"] == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp / name
    path.write_text(json.dumps(config))
    return path


def launch_config(name: str, tmp: Path, *, ds_config: Path | None = None) -> Path:
    """A shipped accelerate YAML, pointed at ``ds_config`` when given."""
    config = yaml.safe_load((ROOT / "launch" / name).read_text())
    if ds_config is not None:
        config["deepspeed_config"]["deepspeed_config_file"] = str(ds_config)
    path = tmp / name
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_recipe(folder: Path, *, data: dict | None = None, **train) -> tuple[Path, Path]:
    """A tiny model in ``folder/tiny`` and ``folder/recipe.yaml`` training it on the shipped demo pairs.

    ``train`` entries override the quiet defaults (no saving, no reporting, seed 0, lr 1e-3, log every step, output
    to ``folder/unused``: tests pass ``--output_dir``); ``data`` replaces the data section. Returns (recipe, model dir).
    """
    from tiny import make_tiny_model_dir

    model_dir = make_tiny_model_dir(folder / "tiny")
    defaults = {"output_dir": str(folder / "unused"), "learning_rate": 1e-3, "logging_steps": 1,
                "save_strategy": "no", "report_to": [], "seed": 0,
                # speed: exact either way; checkpointing (the default) runs in test_trl_parity, also under ZeRO-3
                "activation_checkpointing": False}
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "data": data if data is not None else {"train": ["rm_scale:demo/train"]},
        "train": {**defaults, **train},
    }))
    return recipe, model_dir


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    return e


def run_train(recipe: Path, overrides: list[str], *, launch: Path | None = None, nproc: int = 2,
              timeout: int = 600, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if launch is None:
        cmd = [sys.executable, "-m", "rm_scale", "train", "--config", str(recipe), *overrides]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()),
               "-m", "rm_scale", "train", "--config", str(recipe), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")]


def start_train(recipe: Path, overrides: list[str], *, launch: Path, log: Path, nproc: int = 2,
                extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """`run_train` through `accelerate launch`, but returns the running launcher (output to ``log``) at once."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()),
           "-m", "rm_scale", "train", "--config", str(recipe), *overrides]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """``{local rank: pid}`` of the launcher's worker processes (its children with LOCAL_RANK set)."""
    out = {}
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"LOCAL_RANK="):
                out[int(item.split(b"=", 1)[1])] = pid
    return out
