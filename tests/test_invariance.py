"""Loss and gradient do not depend on how a global batch is laid out: 1 rank x GAS 4 == 2 ranks x GAS 2 ==
4 ranks x GAS 1, real processes under ZeRO-3 (gloo on CPU), with the per-pair centering term and the whole-step terms
(global batch mean, variance, target std), and with the lean RMSNorm / MLP (the default) == the stock modules. The
pure-math version with uneven slices is in test_loss.py."""

import pytest

from launch import launch_config, metrics, run_train, tiny_ds_config, tiny_recipe

pytestmark = pytest.mark.slow


def test_world_size_and_accumulation_do_not_change_loss_or_gradient(tmp_path):
    recipe, _ = tiny_recipe(
        tmp_path, data={"train": ["rm_scale:demo/train"], "streaming": False}, max_steps=3,
        per_device_train_batch_size=2, center_rewards_coefficient=0.1, batch_mean_coefficient=0.5,
        reward_variance_coefficient=0.2, target_reward_std=1.0, target_std_coefficient=0.3)
    launch = launch_config("zero3.yaml", tmp_path, ds_config=tiny_ds_config("zero3.json", tmp_path))
    runs = {}
    # (1, 4, stock): the stock RMSNorm and MLP (lean_activations off), against which the lean layers under ZeRO-3 agree
    for world, gas, *stock in ((1, 4), (2, 2), (4, 1), (1, 4, "stock")):
        out = tmp_path / f"w{world}_gas{gas}{'_stock' if stock else ''}"
        run_train(recipe, ["--output_dir", str(out), "--gradient_accumulation_steps", str(gas),
                           *(["--lean_activations", "false"] if stock else [])],
                  launch=launch if world > 1 else None, nproc=world)
        runs[(world, gas, *stock)] = {m["step"]: m for m in metrics(out) if "loss_exact" in m}
    ref = runs[(1, 4)]
    for layout, got in runs.items():
        for step in (1, 2, 3):
            assert got[step]["pairs"] == 8, layout
            assert abs(got[step]["loss_exact"] - ref[step]["loss_exact"]) <= 1e-5, (layout, step)
            for term in ("loss_center", "loss_batch_mean", "loss_variance", "loss_target_std"):
                assert abs(got[step][term] - ref[step][term]) <= 1e-5, (layout, step, term)
            assert abs(got[step]["grad_norm"] - ref[step]["grad_norm"]) <= 1e-4 * max(1.0, ref[step]["grad_norm"])


@pytest.mark.parametrize("batching", ["token_budget", "packed", "packed_shared_prefix"])
def test_uneven_micro_batches_on_two_ranks_match_one_process(tmp_path, batching):
    """Token-budget (or packed, or packed with each pair's prefix computed once) batches give the ranks micro-batches
    of different sizes (and GAS 4): the step's loss and gradient still equal one process computing the same pairs in
    one padded batch."""
    import json

    from transformers import AutoTokenizer

    from rm_scale.data.stream import PairStream, StreamConfig
    from rm_scale.train.stream_eval import pair_ids

    shared = batching == "packed_shared_prefix"
    batching = "packed" if shared else batching
    budget = 160 if shared else 250  # binds below 8 pairs often enough to make uneven micro-batches
    stream_cfg = dict(sources=["rm_scale:demo/train"], pairs_per_batch=8, batching=batching, token_budget=budget,
                      block_size=64, seed=3, max_length=1024, shared_prefix=shared)
    recipe, model_dir = tiny_recipe(
        tmp_path, data={"train": ["rm_scale:demo/train"], "streaming": True}, max_steps=1, seed=3,
        per_device_train_batch_size=8, gradient_accumulation_steps=4, batching=batching, token_budget=budget,
        stream_block_size=64, center_rewards_coefficient=0.1, batch_mean_coefficient=0.5,
        **({"shared_prefix": shared} if batching == "packed" else {}))
    launch = launch_config("zero3.yaml", tmp_path, ds_config=tiny_ds_config("zero3.json", tmp_path))
    out = tmp_path / "two"
    run_train(recipe, ["--output_dir", str(out)], launch=launch, nproc=2)
    two = next(m for m in metrics(out) if "loss_exact" in m)

    # the pairs each rank trained on in that step, read from the same stream the ranks ran
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows, sizes = [], []
    for rank in range(2):
        batches = iter(PairStream(StreamConfig(**stream_cfg), tok, rank=rank, world_size=2))
        for _ in range(4):  # GAS 4
            pairs = pair_ids(next(batches))
            sizes.append(len(pairs))
            for c, r in ((p["input_ids_chosen"], p["input_ids_rejected"]) for p in pairs):
                rows.append({"input_ids_chosen": c, "attention_mask_chosen": [1] * len(c),
                             "input_ids_rejected": r, "attention_mask_rejected": [1] * len(r)})
    assert len(set(sizes)) > 1, sizes  # the micro-batches really are uneven
    if shared:
        assert two["prefix_sharing"] > 1.2, two  # the prompts really were computed once
    union = tmp_path / "union.jsonl"
    union.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_dir = tmp_path / "one"
    run_train(recipe, ["--output_dir", str(one_dir), "--data.train", f"[{union}]", "--data.streaming", "false",
                       "--per_device_train_batch_size", str(len(rows)), "--gradient_accumulation_steps", "1"])
    one = next(m for m in metrics(one_dir) if "loss_exact" in m)
    assert two["pairs"] == one["pairs"] == len(rows)
    assert abs(two["loss_exact"] - one["loss_exact"]) <= 1e-5
    assert abs(two["loss_batch_mean"] - one["loss_batch_mean"]) <= 1e-6
    assert abs(two["grad_norm"] - one["grad_norm"]) <= 1e-4 * max(1.0, one["grad_norm"])
