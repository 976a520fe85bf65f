"""`rm-scale demo` (`make demo`): the embedded default job, end to end, offline.

Builds the SmolLM2-135M-Instruct folder from the GGUF shipped on PyPI (once, cached), then runs a 2-rank ZeRO-3
`accelerate launch` of `recipes/demo.yaml` on the demo pairs shipped with rm_scale, and reports where the model and
metrics are and the held-out accuracy — failing loudly if it does not clearly beat chance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIN_ACCURACY = 0.75  # chance is 0.5; the demo preference is easy, so anything near chance means a bug


def run_demo(*, output_dir: str, num_processes: int = 2) -> int:
    for needed in ("launch/zero3.yaml", "recipes/demo.yaml", "ds_configs/zero3.json"):
        if not (ROOT / needed).exists():
            raise SystemExit(f"rm-scale demo runs from a checkout of rm_scale: {ROOT / needed} is missing.")
    from rm_scale.model.pretrained import smollm2_path  # lazy: keeps `rm-scale --help` fast

    print("rm_scale demo: preparing SmolLM2-135M-Instruct (built once from the shipped GGUF, then cached) ...", flush=True)
    print(f"rm_scale demo: model folder {smollm2_path()}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "launch/zero3.yaml", "--num_processes", str(num_processes),
        "-m", "rm_scale", "train", "--config", "recipes/demo.yaml", "--output_dir", output_dir,
    ]
    print("rm_scale demo: " + " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        print(f"rm_scale demo: training failed (exit {proc.returncode}).", file=sys.stderr)
        return proc.returncode
    out = ROOT / output_dir
    metrics = json.loads((out / "final_metrics.json").read_text())
    accuracy = metrics["eval_accuracy"]
    print()
    print(f"  model (HF folder):   {out / 'final'}")
    print(f"  training metrics:    {out / 'metrics.jsonl'}")
    print(f"  held-out metrics:    {out / 'final_metrics.json'}")
    print(f"  held-out accuracy:   {accuracy:.3f}  (chance 0.5; rewards chosen {metrics['eval_rewards_chosen_mean']:+.2f}, "
          f"rejected {metrics['eval_rewards_rejected_mean']:+.2f})")
    if accuracy < MIN_ACCURACY:
        print(f"rm_scale demo: held-out accuracy {accuracy:.3f} < {MIN_ACCURACY}: something is wrong.", file=sys.stderr)
        return 1
    return 0
