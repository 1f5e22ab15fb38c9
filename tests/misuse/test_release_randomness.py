"""Issue #14 item 4: every DP release draws its noise from a random source of the run, never from torch's global
generator (which scripts seed with the same ``torch.manual_seed(0)`` every time: two releases would repeat their
noise, and comparing them cancels it)."""

from __future__ import annotations

import numpy as np
import torch

from dptrain.randomness import RandomSource
from dptrain.sampling import PoissonBatchSampler


def _global_untouched(fn):
    """Run ``fn`` twice after the same torch.manual_seed(0): (its two results, whether the global stream moved)."""
    results, moved = [], False
    for _ in range(2):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        results.append(fn())
        moved |= not torch.equal(before, torch.get_rng_state())
    return results, moved


def test_a_default_random_source_is_seeded_by_the_os_not_by_torch_manual_seed():
    (a, b), moved = _global_untouched(lambda: RandomSource().normal(torch.Size([64]), torch.float32, torch.device("cpu")))
    assert not moved and not torch.equal(a, b)


def test_a_default_poisson_sampler_does_not_repeat_its_batches_after_torch_manual_seed():
    def batches():
        return [tuple(batch) for batch in PoissonBatchSampler(200, 0.1, 5)]

    (a, b), moved = _global_untouched(batches)
    assert not moved and a != b


def test_the_private_validation_perplexity_noise_is_fresh_secure_or_seeded_never_the_global_stream():
    from dptrain.lm import SimpleTokenizer, lm_dataset, private_validation_perplexity, support_chat_corpus, tiny_gpt2
    from dptrain.lm.corpus import vocabulary_text

    tokenizer = SimpleTokenizer.from_texts([vocabulary_text()])
    model = tiny_gpt2(tokenizer.vocab_size, n_layer=1, n_embd=16, n_head=2, n_positions=96, seed=0,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    corpus = support_chat_corpus(num_users=4, validation_users=8, canary_repeats=(1,), seed=0)
    data = lm_dataset(tokenizer, corpus.texts("validation"), 96)
    users = corpus.user_ids("validation")

    def release(**kwargs):
        return private_validation_perplexity(model, data, users, 1.0, loss_bound=8.0, **kwargs).mean_loss

    # Both releases start from the same torch.manual_seed(0) (the evaluation's DataLoader draws its base seed from
    # the global stream, which is not a release): noise from that stream would be the same twice.
    (a, b), _ = _global_untouched(release)
    assert a != b  # fresh noise each time, whatever the global seed
    (c, d), _ = _global_untouched(lambda: release(random=RandomSource(secure=True)))
    assert c != d
    seeded = [release(generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seeded release is reproducible, by the caller's choice


def test_a_dp_language_model_run_hands_its_own_noise_stream_to_later_releases():
    """``train_causal_lm`` returns the engine's random source: the memorisation experiment's evaluation release draws
    from it, so a secure run's release is secure too and a seeded run's release is no new generator seeded from the
    seed printed in the experiment's config."""
    from dptrain.lm import PrivacySettings, SimpleTokenizer, lm_dataset, support_chat_corpus, tiny_gpt2, train_causal_lm
    from dptrain.lm.corpus import vocabulary_text

    tokenizer = SimpleTokenizer.from_texts([vocabulary_text()])
    corpus = support_chat_corpus(num_users=6, validation_users=2, canary_repeats=(1,), seed=0)
    data = lm_dataset(tokenizer, corpus.texts("train"), 48)
    users = corpus.user_ids("train")
    for secure in (False, True):
        model = tiny_gpt2(tokenizer.vocab_size, n_layer=1, n_embd=8, n_head=2, n_positions=48, seed=0,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        privacy = PrivacySettings(target_epsilon=8.0, delta=1e-3, expected_units=3, secure_mode=secure)
        result = train_causal_lm(model, data, epochs=1, lr=1e-3, batch_size=8, user_ids=users, privacy=privacy)
        assert result.random is not None and result.random.secure is secure
        assert (result.random.generator is None) is secure  # secure: the OS CSPRNG, no seed anywhere
        assert "random" not in result.to_dict()  # not a published figure
