"""Using a trained reward model (#16): the scoring contract saved with every export, `RewardScorer` (batch scoring,
TRL's reward-function call), and that rewards do not depend on how they are batched.

One tiny model is trained through the command line (1 process, with a final evaluation: the export carries reward
statistics); every test scores that export.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from launch import ROOT
from rm_scale.model.contract import CONTRACT_FILE, read_contract, template_hash
from rm_scale.scoring import RewardScorer

DEMO_EVAL = ROOT / "rm_scale" / "data" / "demo_data" / "eval.jsonl"


@pytest.fixture(scope="module")
def export(trained_export):
    return trained_export


def _texts():
    rows = [json.loads(line) for line in DEMO_EVAL.read_text().splitlines()[:12]]
    # lengths from a few tokens to ~40: a real mix for the batches
    return [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"][:20] for r in rows[:4]] + ["hello"]


def test_every_export_carries_its_scoring_contract(export):
    from transformers import AutoTokenizer

    contract = read_contract(str(export))
    tokenizer = AutoTokenizer.from_pretrained(export)
    config = json.loads((export / "config.json").read_text())
    assert contract["read_at"] == "last_real_token"
    assert (contract["pad_token_id"], contract["eos_token_id"]) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert contract["chat_template_sha256"] == template_hash(tokenizer) is not None
    assert contract["messages"] == "chat_template" and contract["append_eos"] is True
    assert (contract["max_length"], contract["truncation"]) == (64, "drop")
    assert contract["reward_mean"] == config["rm_scale_reward_mean"]
    assert contract["reward_std"] == config["rm_scale_reward_std"] > 0


def test_rewards_do_not_depend_on_batching(export):
    texts = _texts()
    packed = RewardScorer(str(export))
    assert packed.packed  # a Llama on sdpa: sequences packed end to end
    together = packed.score(texts)
    alone = [packed.score([t])[0] for t in texts]
    tiny_batches = RewardScorer(str(export), batch_tokens=1).score(texts)  # one sequence per forward
    right = RewardScorer(str(export), packed=False).score(texts)
    left = RewardScorer(str(export), packed=False, padding_side="left").score(texts)
    reordered = packed.score(texts[::-1])[::-1]
    for other in (alone, tiny_batches, right, left, reordered):
        assert torch.allclose(torch.tensor(other), torch.tensor(together), atol=1e-5, rtol=0)
    assert len(set(round(r, 4) for r in together)) > len(texts) // 2  # not a constant


def test_rewards_equal_the_text_classification_pipeline(export):
    from transformers import pipeline

    scorer = RewardScorer(str(export))
    # The scorer ends every text with EOS, as training did; the pipeline tokenises what it is given.
    texts = [t + " <eos>" for t in _texts()]
    pipe = pipeline("text-classification", model=str(export), function_to_apply="none", device="cpu")
    expected = [out["score"] for out in pipe(texts, batch_size=1)]
    assert torch.allclose(torch.tensor(scorer.score(texts)), torch.tensor(expected), atol=1e-5, rtol=0)


def test_prompt_response_messages_and_pairs_score_as_training_tokenised(export):
    from rm_scale.data.formats import conversation_ids, text_ids

    scorer = RewardScorer(str(export))
    prompts, responses = ["what is two plus two ?", "name a colour"], [" four", " blue"]
    assert scorer.score(prompts, responses) == pytest.approx(scorer.score([p + r for p, r in zip(prompts, responses)]),
                                                             abs=1e-6)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    ids = [conversation_ids(m + [{"role": "assistant", "content": r}], scorer.tokenizer)
           for m, r in zip(messages, responses)]
    assert scorer.score(messages, responses) == pytest.approx(scorer.rewards_of_ids(ids), abs=1e-6)
    assert scorer.encode(prompts[0] + responses[0]) == text_ids([prompts[0] + responses[0]], scorer.tokenizer)[0]
    # a pair's two sides share their prompt: computed once, the same rewards as each side alone
    pairs = [(p, r, " no idea") for p, r in zip(prompts, responses)]
    expected = [(scorer.score([p + c])[0], scorer.score([p + r])[0]) for p, c, r in pairs]
    for got, want in zip(scorer.score_pairs(pairs), expected):
        assert got == pytest.approx(want, abs=1e-5)


def test_a_trl_grpo_reward_function(export):
    from trl.trainer.utils import get_callable_name

    scorer = RewardScorer(str(export))
    prompts = [[{"role": "user", "content": "name a colour"}]] * 2
    completions = [[{"role": "assistant", "content": "blue"}], [{"role": "assistant", "content": "no"}]]
    # GRPOTrainer's call: keyword arguments, extra columns and trainer state alongside
    rewards = scorer(prompts=prompts, completions=completions, completion_ids=[[1], [2]], trainer_state=None)
    assert rewards == pytest.approx(scorer.score(prompts, completions), abs=1e-6) and len(rewards) == 2
    assert get_callable_name(scorer) == "rm_scale_reward"
    standard = scorer(prompts=["a b", "c d"], completions=[" e", " f"])
    assert standard == pytest.approx(scorer.score(["a b e", "c d f"]), abs=1e-6)


def test_a_real_trl_grpo_run_rewards_its_completions_with_the_scorer(export, tmp_path):
    """GRPOTrainer (TRL 1.16) trains a tiny policy for one step with ``reward_funcs=[scorer]``: the rewards it logged
    for each generated completion are the scorer's offline rewards of that prompt + completion."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tiny import make_tiny_model_dir

    policy_dir = make_tiny_model_dir(tmp_path / "policy", seed=1)
    scorer = RewardScorer(str(export))
    prompts = Dataset.from_list([{"prompt": "User: name a colour\nAssistant:"},
                                 {"prompt": "User: 2 + 2 ?\nAssistant:"}])
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=6, learning_rate=1e-3, logging_steps=1,
                      report_to="none", use_cpu=True, save_strategy="no", seed=0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir), reward_funcs=[scorer], args=args,
                          train_dataset=prompts, processing_class=AutoTokenizer.from_pretrained(policy_dir))
    trainer.train()
    logs = trainer._logs  # TRL keeps the last generation batch: prompts, completions, each reward function's rewards
    assert len(logs["prompt"]) == 4 and set(logs["rewards"]) == {"rm_scale_reward"}
    offline = scorer.score(list(logs["prompt"]), list(logs["completion"]))
    assert list(logs["rewards"]["rm_scale_reward"]) == pytest.approx(offline, abs=1e-5)
    logged = [h for h in trainer.state.log_history if "rewards/rm_scale_reward/mean" in h]
    assert logged and logged[0]["rewards/rm_scale_reward/mean"] == pytest.approx(sum(offline) / 4, abs=1e-5)


def test_normalize_uses_the_saved_statistics(export):
    raw, norm = RewardScorer(str(export)), RewardScorer(str(export), normalize=True)
    contract = raw.contract
    texts = _texts()[:5]
    expected = [(r - contract["reward_mean"]) / contract["reward_std"] for r in raw.score(texts)]
    assert norm.score(texts) == pytest.approx(expected, abs=1e-6)


def test_long_texts_keep_their_end_and_are_counted(export):
    scorer = RewardScorer(str(export))
    words = " ".join(["yes"] * 100)
    assert scorer.score([words]) == pytest.approx(scorer.rewards_of_ids([scorer.tokens(words)[-64:]]), abs=1e-6)
    assert scorer.truncated == 1


def test_a_mismatched_tokenizer_or_a_missing_contract_is_loud(export, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(export, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="chat template differs"):
        RewardScorer(str(other))
    (other / CONTRACT_FILE).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = RewardScorer(str(other))
    assert any("no scoring.json" in str(w.message) and "assuming" in str(w.message) for w in caught)
    assert scorer.contract["reward_std"] is None
    with pytest.raises(ValueError, match="normalize=True needs the reward statistics"):
        RewardScorer(str(other), normalize=True)
