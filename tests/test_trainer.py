"""The public API in one process on a tiny model built from a config."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from rm_scale import RewardConfig, RewardTrainer
from rm_scale.model import load_reward_model, score_head
from rm_scale.commands.recipe import load_preference_files


@pytest.fixture(scope="module")
def demo_data():
    return load_preference_files(["rm_scale:demo/train"]).select(range(96))


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, learning_rate=2e-3,
                logging_steps=4, save_strategy="no", report_to=[], seed=0, lr_scheduler_type="constant")
    base.update(kw)
    return RewardConfig(**base)


def test_loss_falls_and_every_parameter_changes(tiny_dir, demo_data, tmp_path):
    model = load_reward_model(str(tiny_dir))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # a preference a 2-layer, 32-wide model learns in 12 steps (the demo's needs the real model): one brush-off
    easy = demo_data.map(lambda r: {"rejected": "Not my problem."})
    trainer = RewardTrainer(model=model, args=_args(tmp_path, center_rewards_coefficient=0.01), tokenizer=tok,
                            train_dataset=easy, eval_dataset=easy.select(range(32)))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss_exact" in h]
    assert logs[-1]["loss_exact"] < logs[0]["loss_exact"] - 0.05, logs
    assert "loss_center" in logs[0] and logs[0]["pairs"] == 32
    assert all(0 < x["padding_efficiency"] <= 1 and x["peak_memory_gb"] > 0 for x in logs)
    assert not any("rank_balance" in x for x in logs)  # one process: nothing to balance
    assert all(x["pairs_per_s"] > 0 and x["tokens_per_s"] > x["pairs_per_s"] for x in logs[1:])
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert unchanged == []
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] > 0.5 and "eval_rewards_std" in metrics
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines if "loss_exact" in x] == [4, 8, 12]
    hist = lines[0]["rewards_histogram"]
    assert sum(hist["chosen"]) == sum(hist["rejected"]) == 32 and len(hist["chosen"]) == len(hist["edges"]) + 1


def test_processing_class_and_model_name_are_accepted(tiny_dir, demo_data, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    trainer = RewardTrainer(model=str(tiny_dir), args=_args(tmp_path, max_steps=2), processing_class=tok,
                            train_dataset=demo_data)
    trainer.train()
    assert trainer.state.global_step == 2
    with pytest.raises(ValueError, match="once"):
        RewardTrainer(model=str(tiny_dir), args=_args(tmp_path), tokenizer=tok,
                      processing_class=AutoTokenizer.from_pretrained(tiny_dir), train_dataset=demo_data)


def test_margin_column_changes_the_loss(tiny_dir, demo_data, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    losses = {}
    for margin in (0.0, 3.0):
        data = demo_data.map(lambda r: {"margin": margin})
        trainer = RewardTrainer(model=load_reward_model(str(tiny_dir)), args=_args(tmp_path, max_steps=1, logging_steps=1),
                                tokenizer=tok, train_dataset=data)
        trainer.train()
        losses[margin] = trainer.state.log_history[0]["loss_exact"]
    # At init rewards are ~0, so the loss is about log(1 + e^margin): margin 3 gives a much larger loss.
    assert losses[3.0] > losses[0.0] + 2.0


def test_lora_trains_adapters_and_score_head(tiny_dir, demo_data, tmp_path):
    from peft import LoraConfig, TaskType

    model = load_reward_model(str(tiny_dir))
    head_before = score_head(model).weight.detach().clone()
    peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    trainer = RewardTrainer(model=model, args=_args(tmp_path), tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
                            train_dataset=demo_data, peft_config=peft_config)
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any("score" in n for n in trainable)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])}
    assert changed == set(trainable)
    assert not torch.equal(score_head(trainer.model).weight, head_before)


def test_wrong_args_type_is_a_clear_error(tiny_dir, demo_data):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="RewardConfig"):
        RewardTrainer(model=str(tiny_dir), args=TrainingArguments(output_dir="/tmp/x"), train_dataset=demo_data)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardConfig(output_dir="/tmp/x", center_rewards_coefficient=-1.0)
    with pytest.raises(ValueError, match="max_length"):
        RewardConfig(output_dir="/tmp/x", max_length=1)


def test_strict_data_stops_before_the_first_step(tiny_dir, tmp_path):
    from rm_scale.data import PairFiles

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "User: a", "chosen": " Sure", "rejected": " no"}) + "\n" + "{oops\n")
    trainer = RewardTrainer(model=str(tiny_dir), args=_args(tmp_path / "out", strict_data=True, max_steps=2),
                            tokenizer=AutoTokenizer.from_pretrained(tiny_dir), train_dataset=PairFiles([str(path)]))
    with pytest.raises(ValueError, match=f"{path}:2: malformed JSON"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_streamed_training_with_a_background_worker_sees_the_same_batches(tiny_dir, tmp_path):
    """dataloader_num_workers=1 tokenises in a worker process; batches, losses and epochs match 0 workers."""
    from rm_scale.data import PairFiles

    data = PairFiles(["rm_scale:demo/eval"])  # 128 pairs: 16 steps of 8 = one epoch, then a second one
    losses = {}
    for workers in (0, 1):
        args = _args(tmp_path / f"w{workers}", max_steps=20, logging_steps=1, dataloader_num_workers=workers,
                     batching="length_grouped")
        trainer = RewardTrainer(model=load_reward_model(str(tiny_dir)), args=args,
                                tokenizer=AutoTokenizer.from_pretrained(tiny_dir), train_dataset=data)
        trainer.train()
        losses[workers] = [h["loss_exact"] for h in trainer.state.log_history if "loss_exact" in h]
        assert trainer._data_state["epoch"] == 1  # the stream went on into its second pass
    assert len(losses[0]) == 20
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_eval_reports_accuracy_per_subset_and_named_sets(tiny_dir, demo_data, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    eval_data = demo_data.select(range(40)).map(lambda r, i: {"subset": "even" if i % 2 == 0 else "odd"},
                                                  with_indices=True)
    swapped = eval_data.map(lambda r: {"chosen": r["rejected"], "rejected": r["chosen"]})
    trainer = RewardTrainer(model=str(tiny_dir), args=_args(tmp_path, max_steps=12), tokenizer=tok,
                            train_dataset=demo_data, eval_dataset={"plain": eval_data, "swapped": swapped})
    trainer.train()
    metrics = trainer.evaluate()
    for part in ("even", "odd"):
        plain, flipped = metrics[f"eval_plain_accuracy_{part}"], metrics[f"eval_swapped_accuracy_{part}"]
        assert abs(plain + flipped - 1.0) < 1e-9  # swapping sides flips every decision (ties count half)
    overall = (metrics["eval_plain_accuracy_even"] + metrics["eval_plain_accuracy_odd"]) / 2
    assert abs(overall - metrics["eval_plain_accuracy"]) < 1e-9


def test_packed_batches_train_with_the_loss_of_padded_batches(tiny_dir, tmp_path):
    """Same pairs per micro-batch (a token budget that never binds; one micro-batch per stream block, so both orders
    are the block order): packed and padded give the same losses and gradient norms, and packed training proceeds."""
    from rm_scale.data import PairFiles

    logs = {}
    for batching in ("fixed", "packed"):
        args = _args(tmp_path / batching, max_steps=6, logging_steps=1, batching=batching, token_budget=10**6,
                     stream_block_size=8)
        trainer = RewardTrainer(model=load_reward_model(str(tiny_dir)), args=args,
                                tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
                                train_dataset=PairFiles(["rm_scale:demo/train"]))
        trainer.train()
        logs[batching] = [h for h in trainer.state.log_history if "loss_exact" in h]
    for a, b in zip(logs["fixed"], logs["packed"]):
        assert abs(a["loss_exact"] - b["loss_exact"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    assert logs["packed"][-1]["padding_efficiency"] > logs["fixed"][-1]["padding_efficiency"]


def test_transformers_still_calls_the_hooks_the_loss_and_checkpoints_rely_on(tiny_dir, tmp_path):
    """The step's global pair count (get_batch_samples → compute_loss's num_items_in_batch), the atomic checkpoint
    commit (_save_checkpoint) and each rank's data position (_save_rng_state) ride on transformers' Trainer hooks; a
    transformers release that stops calling them would silently change the loss or lose resume. Streamed, GAS 2."""
    from rm_scale.data import PairFiles
    from rm_scale.train.checkpoint import MARKER

    calls: dict[str, list] = {"get_batch_samples": [], "_save_checkpoint": [], "_save_rng_state": [],
                              "compute_loss": []}

    class Recording(RewardTrainer):
        def get_batch_samples(self, *a, **k):
            out = super().get_batch_samples(*a, **k)
            calls["get_batch_samples"].append(len(out[0]))
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            calls["compute_loss"].append(None if num_items_in_batch is None else int(num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _save_checkpoint(self, *a, **k):
            calls["_save_checkpoint"].append(self.state.global_step)
            return super()._save_checkpoint(*a, **k)

        def _save_rng_state(self, *a, **k):
            calls["_save_rng_state"].append(self.state.global_step)
            return super()._save_rng_state(*a, **k)

    args = _args(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
                 save_strategy="steps", save_steps=2)
    trainer = Recording(model=str(tiny_dir), args=args, tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
                        train_dataset=PairFiles(["rm_scale:demo/train"]))
    trainer.train()
    assert calls["get_batch_samples"] == [2, 2]
    assert calls["compute_loss"] == [8, 8, 8, 8]  # every micro-batch divides by the pairs of its whole step
    assert calls["_save_checkpoint"] == [2] and calls["_save_rng_state"] == [2]
    assert (tmp_path / "checkpoint-2" / MARKER).exists() and (tmp_path / "checkpoint-2" / "rm_scale_data_rank0.json").exists()


def test_training_without_the_step_pair_count_fails_loudly(tiny_dir, demo_data, tmp_path):
    class Old(RewardTrainer):  # what a transformers that no longer passes num_items_in_batch would do
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, None)

    trainer = Old(model=str(tiny_dir), args=_args(tmp_path, max_steps=1),
                  tokenizer=AutoTokenizer.from_pretrained(tiny_dir), train_dataset=demo_data)
    with pytest.raises(RuntimeError, match="num_items_in_batch"):
        trainer.train()


def test_the_callers_args_and_peft_config_are_not_changed(tiny_dir, tmp_path):
    from peft import LoraConfig, TaskType

    from rm_scale.data import PairFiles

    args = _args(tmp_path, max_steps=1, gradient_checkpointing=True)
    peft = LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=4, lora_alpha=8, target_modules=["q_proj"])
    before_args, before_peft = args.to_dict(), peft.to_dict()
    trainer = RewardTrainer(model=str(tiny_dir), args=args, tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
                            train_dataset=PairFiles(["rm_scale:demo/train"]), peft_config=peft)
    assert args.to_dict() == before_args and peft.to_dict() == before_peft
    assert trainer.args.ignore_data_skip and trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert "score" in trainer.model.peft_config["default"].modules_to_save
    # an IterableDataset turns dispatch_batches off on the trainer's args only
    from datasets import IterableDataset

    from rm_scale.commands.recipe import load_preference_files

    rows = load_preference_files(["rm_scale:demo/train"]).select(range(8))
    args = _args(tmp_path, max_steps=1, accelerator_config={"dispatch_batches": True})
    trainer = RewardTrainer(model=str(tiny_dir), args=args, tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
                            train_dataset=IterableDataset.from_generator(lambda: iter(rows)))
    assert args.accelerator_config.dispatch_batches is True
    assert trainer.args.accelerator_config.dispatch_batches is False
