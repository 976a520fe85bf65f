"""Loss and gradient do not depend on how a global batch is laid out: 1 rank x GAS 4 == 2 ranks x GAS 2 ==
4 ranks x GAS 1, real processes under ZeRO-3 (gloo on CPU), with the per-pair centering term and the whole-step terms
(global batch mean, variance, target std). The pure-math version with uneven slices is in test_loss.py."""

import pytest
import yaml

from launch import launch_config, metrics, run_train, tiny_ds_config
from tiny import make_tiny_model_dir

pytestmark = pytest.mark.slow


def test_world_size_and_accumulation_do_not_change_loss_or_gradient(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": ["rm_scale:demo/train"], "streaming": False},
        "train": {"output_dir": str(tmp_path / "unused"), "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1,
                  "save_strategy": "no", "report_to": [], "seed": 0, "per_device_train_batch_size": 2,
                  "center_rewards_coefficient": 0.1, "batch_mean_coefficient": 0.5,
                  "reward_variance_coefficient": 0.2, "target_reward_std": 1.0, "target_std_coefficient": 0.3},
    }))
    launch = launch_config("zero3.yaml", tmp_path, ds_config=tiny_ds_config("zero3.json", tmp_path))
    runs = {}
    for world, gas in ((1, 4), (2, 2), (4, 1)):
        out = tmp_path / f"w{world}_gas{gas}"
        run_train(recipe, ["--output_dir", str(out), "--gradient_accumulation_steps", str(gas)],
                  launch=launch if world > 1 else None, nproc=world)
        runs[(world, gas)] = {m["step"]: m for m in metrics(out) if "loss_exact" in m}
    ref = runs[(1, 4)]
    for layout, got in runs.items():
        for step in (1, 2, 3):
            assert got[step]["pairs"] == 8, layout
            assert abs(got[step]["loss_exact"] - ref[step]["loss_exact"]) <= 1e-5, (layout, step)
            for term in ("loss_center", "loss_batch_mean", "loss_variance", "loss_target_std"):
                assert abs(got[step][term] - ref[step][term]) <= 1e-5, (layout, step, term)
            assert abs(got[step]["grad_norm"] - ref[step]["grad_norm"]) <= 1e-4 * max(1.0, ref[step]["grad_norm"])
