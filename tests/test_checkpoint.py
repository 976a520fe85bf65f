"""Atomic checkpoints, `resume_from_checkpoint: auto`, the signal-triggered stop and the early errors, in one process.

The multi-process versions (2-rank ZeRO-3, signals and kills from outside, Slurm) are in test_preemption.py and
test_slurm_train.py.
"""

import json
import os
import signal

import pytest
import torch
import yaml
from transformers import AutoTokenizer, TrainerCallback

from rm_scale import RewardConfig, RewardTrainer
from rm_scale.train import checkpoint as ckpt
from rm_scale.model import load_reward_model
from rm_scale.train.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback, TrainingPreempted
from rm_scale.commands.recipe import load_preference_files
from tiny import make_tiny_model_dir


def _fake_checkpoint(root, step, *, complete=True, world_size=2, mtime=None):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        (folder / ckpt.MARKER).write_text(json.dumps({"step": step, "world_size": world_size}))
        if mtime is not None:
            os.utime(folder / ckpt.MARKER, (mtime, mtime))
    return folder


def test_resume_picks_the_latest_complete_checkpoint_never_a_partial_one(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path / "missing") is None
    assert ckpt.resolve_resume("auto", tmp_path) is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ckpt.resolve_resume(True, tmp_path)
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8)
    _fake_checkpoint(tmp_path, 12, complete=False)  # a save cut short
    assert ckpt.resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoint-8")
    for yes in (True, "true", "yes"):  # recipes turn YAML booleans of string fields into "yes"/"no"
        assert ckpt.resolve_resume(yes, tmp_path) == str(tmp_path / "checkpoint-8")
    # `latest` names the checkpoint committed last (e.g. a run resumed from step 4 that saved again)
    ckpt.write_atomic(tmp_path / ckpt.LATEST, "checkpoint-4\n")
    assert ckpt.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    # ... unless it points at something incomplete
    ckpt.write_atomic(tmp_path / ckpt.LATEST, "checkpoint-12\n")
    assert ckpt.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    for off in (None, False, "never", "no", "null", ""):
        assert ckpt.resolve_resume(off, tmp_path) is None
    assert ckpt.resolve_resume(str(tmp_path / "checkpoint-12"), tmp_path) == str(tmp_path / "checkpoint-12")
    with pytest.raises(ValueError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path)


def test_rotation_keeps_the_newest_complete_ones_and_drops_partial_ones(tmp_path):
    _fake_checkpoint(tmp_path, 2, mtime=100)
    _fake_checkpoint(tmp_path, 4, mtime=200)
    _fake_checkpoint(tmp_path, 5, complete=False)
    _fake_checkpoint(tmp_path, 6, mtime=300)
    assert ckpt.rotate(tmp_path, None) == [] and len(ckpt.list_checkpoints(tmp_path)) == 4
    ckpt.rotate(tmp_path, 1, keep=[str(tmp_path / "checkpoint-2")])  # e.g. the best model's
    assert [(s, done) for s, _, done in ckpt.list_checkpoints(tmp_path)] == [(2, True), (6, True)]


def test_metrics_are_truncated_to_the_resumed_step(tmp_path):
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3, 4, 5)] + ['{"step": 6, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert ckpt.truncate_metrics(tmp_path, 3) == 3
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert ckpt.truncate_metrics(tmp_path, 3) == 0


def test_world_size_and_output_dir_errors_say_what_to_do(tmp_path):
    folder = _fake_checkpoint(tmp_path, 4, world_size=4)
    ckpt.check_world_size(folder, 4, streamed=False, zero_stage=3)
    ckpt.check_world_size(folder, 2, streamed=False, zero_stage=2)  # a warning only
    with pytest.raises(ValueError, match=r"saved by 4 processes but this run has 2 \(ZeRO-3 .*--num_processes 4"):
        ckpt.check_world_size(folder, 2, streamed=False, zero_stage=3)
    with pytest.raises(ValueError, match=r"this run has 2 \(streamed data positions are per rank"):
        ckpt.check_world_size(folder, 2, streamed=True, zero_stage=None)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        ckpt.check_writable(blocker / "out")


@pytest.mark.parametrize("case", ["data", "output_dir", "world_size"])
def test_train_fails_before_loading_the_model(tmp_path, case):
    """Each error comes from the preflight: the model path does not even exist."""
    from rm_scale.commands.run import train_from_recipe

    out = tmp_path / "out"
    train = {"output_dir": str(out), "max_steps": 4, "report_to": [], "resume_from_checkpoint": "auto"}
    data = {"train": ["rm_scale:demo/train"]}
    if case == "data":
        data["train"] = [str(tmp_path / "nope-*.jsonl")]
        match = "matches no file"
    elif case == "output_dir":
        (tmp_path / "a_file").write_text("")
        train["output_dir"] = str(tmp_path / "a_file" / "out")
        match = "not writable"
    else:
        _fake_checkpoint(out, 2, world_size=8)  # a streamed run (max_steps > 0) saved by 8 ranks
        match = "saved by 8 processes but this run has 1 .*streamed"
    recipe = {"model": {"name_or_path": str(tmp_path / "no-model")}, "lora": None, "data": data, "train": train}
    with pytest.raises(ValueError, match=match):
        train_from_recipe(recipe)


def test_handlers_are_chained_and_restored():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        cb = PreemptionCallback()
        cb.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert cb.received == {signal.SIGUSR1} and seen == [signal.SIGUSR1]
        cb.uninstall()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        assert cb.received == {signal.SIGUSR1} and seen == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ---- a real run in this process: signal at step 3 -> checkpoint, TrainingPreempted; resume: auto -> same model -----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    return path, AutoTokenizer.from_pretrained(path), load_preference_files(["rm_scale:demo/train"]).select(range(64))


class _SignalAt(TrainerCallback):
    def __init__(self, step, sig):
        self.step, self.sig = step, sig

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:  # arrives during the step after `step`: handled at its end
            os.kill(os.getpid(), self.sig)


def _train(tiny, out, *, resume=None, callbacks=()):
    path, tok, data = tiny
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=8, max_steps=8, learning_rate=2e-3,
                        logging_steps=1, save_strategy="steps", save_steps=4, save_total_limit=1, report_to=[],
                        seed=0)
    trainer = RewardTrainer(model=load_reward_model(str(path)), args=args, tokenizer=tok, train_dataset=data,
                            callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_sigterm_saves_stops_with_75_and_auto_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    full = _train(tiny, tmp_path / "full")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(TrainingPreempted) as stop:
            _train(tiny, tmp_path / "cut", callbacks=[_SignalAt(2, signal.SIGTERM)])
        # the process is meant to exit now: a second signal (the launcher hurrying the ranks) must not kill it
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert stop.value.code == PREEMPTED_EXIT_CODE and not stop.value.requeued
    cut = tmp_path / "cut"
    assert ckpt.latest_checkpoint(cut) == str(cut / "checkpoint-3")
    assert json.loads((cut / "checkpoint-3" / ckpt.MARKER).read_text())["world_size"] == 1
    resumed = _train(tiny, cut, resume="auto")
    assert resumed.state.global_step == 8
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    records = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_exact" in r] == list(range(1, 9))  # no step twice after the resume
    # save_total_limit=1: only the newest complete checkpoint is left, and `latest` names it
    assert [s for s, _, _ in ckpt.list_checkpoints(cut)] == [8]
    assert (cut / ckpt.LATEST).read_text().strip() == "checkpoint-8"


def test_recipe_resume_auto_is_a_valid_config():
    args = RewardConfig(output_dir="x", resume_from_checkpoint="auto", report_to=[])
    assert args.save_on_signal and args.requeue_on_signal and args.ddp_timeout == 1800
    yaml.safe_dump(args.to_dict())
