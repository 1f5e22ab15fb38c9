"""Issue #6: the synthetic support-chat corpus, tokenizer, generation, DP evaluation, local model loading, and a small
seeded memorisation experiment run through ``dptrain experiment memorization --quick --json``.

The experiment here is a smaller version of ``--quick`` (120 users, canaries repeated 1 and 16 times, two each, one
DP run at eps = 3; ~25 s on 2 cores). Measured (seed 0): the pin repeated 16 times has mean exposure 19.9 bits (the
maximum) without DP and is extracted for one of the two users; with user-level DP at eps = 3, 0.8 bits and none.
"""

from __future__ import annotations

import argparse
import io
import json
import math

import numpy as np
import pytest
import torch

import dptrain.lm.memorization as memorization
from dptrain.lm import (
    SimpleTokenizer,
    continuation_log_likelihoods,
    generate,
    load_causal_lm,
    private_validation_perplexity,
    public_support_chats,
    support_chat_corpus,
    tiny_gpt2,
    validation_perplexity,
)
from dptrain.cli.experiment import add_experiment_arguments, format_report, run_experiment_command
from dptrain.lm.corpus import CANARY_FIRST_NAMES, vocabulary_text
from dptrain.lm.data import lm_dataset

SMALL = memorization.MemorizationConfig(
    num_users=120,
    validation_users=100,
    canary_repeats=(1, 16),
    canaries_per_level=2,
    public_conversations=600,
    pretrain_epochs=2,
    epochs=12,
    epsilons=(3.0,),
    users_per_step=40.0,
    exposure_samples=500,
)


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer.from_texts([vocabulary_text()])


# -- corpus and tokenizer ------------------------------------------------------------------------------------------


def test_corpus_is_seeded_and_plants_each_canary_as_often_as_asked(tokenizer):
    corpus = support_chat_corpus(num_users=60, validation_users=20, canary_repeats=(1, 4, 16), seed=3)
    again = support_chat_corpus(num_users=60, validation_users=20, canary_repeats=(1, 4, 16), seed=3)
    assert corpus.texts() == again.texts() and corpus.user_ids() == again.user_ids()
    assert corpus.texts() != support_chat_corpus(num_users=60, validation_users=20, seed=4).texts()
    assert len(set(corpus.user_ids())) == 60
    assert not set(corpus.user_ids("train")) & set(corpus.user_ids("validation"))
    all_text = corpus.texts("train") + corpus.texts("validation")
    for canary in corpus.canaries:
        holding = [c for c in corpus.train if canary.text in c.text]
        assert len(holding) == canary.repeats and {c.user_id for c in holding} == {canary.user_id}
        assert corpus.user_ids().count(canary.user_id) == canary.repeats + 1  # plus one plain conversation
        assert sum(canary.user_name in t for t in all_text) in (canary.repeats, canary.repeats + 1)
        assert canary.secret_format.index(canary.text) >= 0 and canary.secret_format.size == 10**6
    public = public_support_chats(500, seed=1)
    for canary in corpus.canaries:
        assert not any(canary.user_name in t for t in public)
    # Canary names occur in public text (so a pre-trained model knows the words), never next to a pin.
    first = CANARY_FIRST_NAMES[0]
    assert any(first in t for t in public) and not any(first in t and "pin" in t for t in public)
    for text in all_text + public:
        ids = tokenizer.encode(text)
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


def test_tokenizer_spells_numbers_digit_by_digit_and_saves(tmp_path, tokenizer):
    ids = tokenizer.encode("my pin is 123456.", add_eos=True)
    assert ids[0] == ids[-1] == tokenizer.eos_token_id
    assert [tokenizer.vocab[i] for i in ids[4:10]] == [" 1", "2", "3", "4", "5", "6"]
    assert tokenizer.encode("zzzqx", add_special_tokens=False) == [tokenizer.unk_token_id]
    tokenizer.save(tmp_path)
    loaded = SimpleTokenizer.load(tmp_path)
    assert loaded.vocab == tokenizer.vocab and loaded.encode("hello agent") == tokenizer.encode("hello agent")


# -- models, generation, evaluation --------------------------------------------------------------------------------


def _model(tokenizer, seed=0):
    return tiny_gpt2(tokenizer.vocab_size, n_layer=1, n_embd=16, n_head=2, n_positions=96, seed=seed,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def test_load_causal_lm_reads_a_local_directory_only(tmp_path, tokenizer):
    model = _model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    loaded = load_causal_lm(tmp_path / "model")
    ids = torch.tensor([tokenizer.encode("customer: hello.")])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_causal_lm(tmp_path / "gpt2")


def test_generate_greedy_and_sampled(tokenizer):
    model = _model(tokenizer)
    prompt = "customer: hi, this is ada costa.\nagent:"
    greedy = generate(model, tokenizer, prompt, max_new_tokens=6, stop_at_eos=False)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(6):  # the greedy chain by hand
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy == tokenizer.decode(ids[len(tokenizer.encode(prompt)) :])
    sample = lambda seed: generate(model, tokenizer, prompt, 8, greedy=False, temperature=0.9, top_k=20,
                                   generator=torch.Generator().manual_seed(seed), stop_at_eos=False)  # fmt: skip
    assert sample(1) == sample(1)
    assert model.training  # generation restores the mode it found
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, prompt, 3, greedy=False, temperature=0.0)


def test_continuation_log_likelihoods_sum_the_continuation_tokens(tokenizer):
    model = _model(tokenizer).eval()
    prompt, rests = "my pin is", [" 123456", " 9", " 00"]
    scores = continuation_log_likelihoods(model, tokenizer, prompt, rests, batch_size=2)
    for rest, score in zip(rests, scores):
        ids = tokenizer.encode(prompt + rest)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        start = len(tokenizer.encode(prompt))
        manual = sum(log_probs[t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert score == pytest.approx(manual, rel=1e-5)


def test_private_validation_perplexity(tokenizer):
    model = _model(tokenizer)
    corpus = support_chat_corpus(num_users=10, validation_users=40, canary_repeats=(1,), seed=0)
    data = lm_dataset(tokenizer, corpus.texts("validation"), 96)
    users = corpus.user_ids("validation")
    exact = private_validation_perplexity(model, data, users, 1e-9, loss_bound=100.0)
    # Negligible noise, loose bound: the mean over users of each user's mean token loss.
    from dptrain.lm.evaluation import per_example_token_losses

    sums, counts = per_example_token_losses(model, data)
    per_user = {}
    for u, s, c in zip(users, sums, counts):
        a, b = per_user.get(u, (0.0, 0))
        per_user[u] = (a + s, b + c)
    expected = np.mean([a / b for a, b in per_user.values()])
    assert exact.mean_loss == pytest.approx(expected, rel=1e-6)
    assert validation_perplexity(model, data) == pytest.approx(math.exp(sums.sum() / counts.sum()), rel=1e-9)
    clipped = private_validation_perplexity(model, data, users, 1e-9, loss_bound=1.0)
    assert clipped.mean_loss == pytest.approx(1.0, rel=1e-6)  # an untrained model's losses are all clipped
    seeded = [torch.Generator().manual_seed(k) for k in range(60)]
    releases = [private_validation_perplexity(model, data, users, 5.0, 8.0, generator=g) for g in seeded]
    # noise_std is the stated standard deviation of the released mean loss (to first order). It is computed from the
    # noisy count (the true one is private), so each release states a slightly different value: compare with their
    # mean. 60 seeded draws: the sample std is within ~10 %.
    std = np.mean([r.noise_std for r in releases])
    assert np.std([r.mean_loss for r in releases]) == pytest.approx(std, rel=0.35)
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_validation_perplexity(model, data, users, 0.0)


# -- the experiment ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    """``dptrain experiment memorization --quick --json`` with --quick made smaller (SMALL) for the test suite."""
    patch = pytest.MonkeyPatch()
    patch.setattr(memorization, "QUICK", SMALL)
    ledger = tmp_path_factory.mktemp("ledger") / "privacy.db"
    try:
        parser = add_experiment_arguments(argparse.ArgumentParser())
        args = parser.parse_args(["memorization", "--quick", "--json", "--ledger", str(ledger)])
        out = io.StringIO()
        assert run_experiment_command(args, out=out) == 0
    finally:
        patch.undo()
    return json.loads(out.getvalue()), ledger


def test_memorization_experiment_separates_nonprivate_from_dp(quick_result):
    result, _ = quick_result
    names = [r["name"] for r in result["runs"]]
    assert names == ["public base (no fine-tuning)", "non-private", "DP eps=3"]
    base, nonprivate, dp = result["runs"]
    top = lambda run: run["by_repeats"][-1]  # noqa: E731  (the canaries repeated 16 times)
    assert top(nonprivate)["repeats"] == 16
    assert top(nonprivate)["mean_exposure"] > 15  # of 19.9: memorised
    assert top(dp)["mean_exposure"] < 5 and top(base)["mean_exposure"] < 5
    assert top(nonprivate)["extracted"] >= 1 and all(not c["extracted"] for c in dp["canaries"])
    assert result["separation"]["separated"] is True
    assert nonprivate["validation_perplexity"] < base["validation_perplexity"]
    assert dp["privacy_unit"] == "user" and dp["training"]["privacy_unit"] == "user"
    assert dp["epsilon"] <= 3.0 * (1 - SMALL.eval_share) and dp["epsilon_total"] <= 3.0
    assert isinstance(dp["sample"], str) and dp["sample"].startswith(memorization.SAMPLE_PROMPT)


def test_memorization_ledger_shows_fine_tuning_and_evaluation(quick_result):
    from dptrain.budget import BudgetLedger

    result, path = quick_result
    (view,) = result["ledger"]["budgets"]
    assert view["privacy_unit"] == "user" and view["cap"] == 3.0 and view["spent"] <= 3.0
    assert [e["phase"] for e in view["entries"]] == ["fine-tuning", "evaluation"]
    fine_tuning, evaluation = view["entries"]
    assert fine_tuning["status"] == "spent" and fine_tuning["steps"] == result["runs"][2]["training"]["steps"]
    assert evaluation["sample_rate"] == 1.0 and evaluation["steps"] == 1
    assert evaluation["noise_multiplier"] == result["runs"][2]["released_validation_perplexity"]["noise_multiplier"]
    ledger = BudgetLedger(path, create=False)  # the file given with --ledger holds the same entries
    assert [e.id for e in ledger.history(view["budget"])] == [e["id"] for e in view["entries"]]
    text = format_report(result)
    assert "non-private" in text and "DP eps=3" in text and "fine-tuning" in text and "evaluation" in text
    assert "separation (as expected)" in text
    # the exact validation perplexity (no noise) is declared outside the guarantee, in the JSON and the table
    assert "runs[].validation_perplexity" in result["outside_the_guarantee"]
    assert "val ppl: the exact one, computed without noise, outside the guarantee" in text


def test_experiment_command_rejects_bad_options():
    parser = add_experiment_arguments(argparse.ArgumentParser())
    with pytest.raises(ValueError, match="epsilon"):
        run_experiment_command(parser.parse_args(["memorization", "--epsilon", "0"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["unknown"])
