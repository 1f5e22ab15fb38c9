"""Issue #6, user-level privacy for language models (GPT-2 with LoRA adapters, padded conversations).

- One noiseless step with ``privacy_unit="user"`` equals a brute-force loop: per user, the sum (or mean) of its
  examples' gradients (each computed on the example alone, unpadded), clipped as one unit, summed, divided by the
  number of users; with physical chunks that split a user's examples.
- A user holding many examples moves the noiseless sum by at most the clipping norm C (at example level the same
  user moves it by many times C).
- The accountant records a user-level event: epsilon equals dp_accounting's composed
  PoissonSampledDpEvent(q_users, GaussianDpEvent(sigma)); the ledger entry is per user.
"""

from __future__ import annotations

import copy

import dp_accounting
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.budget import BudgetLedger
from dptrain.lm import PrivacySettings, causal_lm_loss, train_causal_lm
from test_lm_gradients import LR, example_gradients, lora_gpt2, padded_batch


def user_sums(grads: list[list[torch.Tensor]], users: list[int], reduction: str) -> dict[int, list[torch.Tensor]]:
    out = {}
    for u in sorted(set(users)):
        rows = [i for i, v in enumerate(users) if v == u]
        scale = 1.0 / len(rows) if reduction == "mean" else 1.0
        out[u] = [scale * sum(grads[i][k] for i in rows) for k in range(len(grads[0]))]
    return out


def norm(tensors: list[torch.Tensor]) -> float:
    return torch.sqrt(sum(t.pow(2).sum() for t in tensors)).item()


def private_step(model, ids, mask, users, clip, *, privacy_unit="user", reduction="sum", mode="auto", chunk=None):
    """One step at q = 1 (one batch per epoch: every user, or every example, is sampled), no noise."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"privacy_unit": "user", "user_ids": users, "user_reduction": reduction} if privacy_unit == "user" else {}
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=LR),
        data_loader=DataLoader(TensorDataset(ids, mask), batch_size=len(ids)), noise_multiplier=0.0,
        max_grad_norm=clip, grad_sample_mode=mode, max_physical_batch_size=chunk, **kwargs,
    )  # fmt: skip
    for batch_ids, batch_mask in loader:
        optimizer.zero_grad()
        causal_lm_loss(model(input_ids=batch_ids, attention_mask=batch_mask).logits, batch_ids, batch_mask).backward()
        optimizer.step()
    assert optimizer.steps_taken == 1
    return model, optimizer


def applied_sum(before, after, expected_batch_size: float) -> list[torch.Tensor]:
    """The clipped sum a step applied: -(after - before) * expected_batch_size / lr, per trainable parameter."""
    return [
        -(a.detach() - b.detach()) * expected_batch_size / LR
        for b, a in zip(before.parameters(), after.parameters())
        if b.requires_grad
    ]


@pytest.mark.parametrize("mode", ["auto", "vmap"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_lora_user_step_equals_per_user_loop(mode, reduction):
    users = [4, 4, 9, 4, 4, 2, 9, 4, 7]  # user 4 holds five examples, spread over the batch
    ids, mask = padded_batch([9, 3, 7, 8, 5, 9, 2, 6, 4], seed=3)
    model = lora_gpt2(seed=1)
    per_user = user_sums(example_gradients(copy.deepcopy(model), ids, mask), users, reduction)
    clip = sorted(norm(g) for g in per_user.values())[len(per_user) // 2]  # about half the users are clipped
    expected = [sum(g[k] * min(1.0, clip / norm(g)) for g in per_user.values()) for k in range(len(per_user[4]))]
    before = copy.deepcopy(model)
    model, optimizer = private_step(model, ids, mask, users, clip, reduction=reduction, mode=mode, chunk=4)
    assert optimizer.expected_batch_size == 4  # q = 1 over 4 users
    for got, want in zip(applied_sum(before, model, 4), expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_user_with_many_examples_moves_the_noiseless_sum_by_at_most_the_clipping_norm():
    heavy = 24
    users = [0] * heavy + [1, 2, 2, 3, 4]
    ids, mask = padded_batch([9] * heavy + [5, 7, 3, 9, 6], seed=4)
    light = slice(heavy, None)
    model = lora_gpt2(seed=2)
    grads = example_gradients(copy.deepcopy(model), ids, mask)
    clip = 0.5 * min(norm(g) for g in grads)  # every example, hence every user, is clipped
    heavy_sum = user_sums(grads, users, "sum")[0]
    assert norm(heavy_sum) > 10 * clip  # unclipped, the heavy user would move the sum by over 10 C

    def clipped_sum_of(dataset_ids, dataset_mask, dataset_users, unit):
        start = copy.deepcopy(model)
        after, optimizer = private_step(copy.deepcopy(model), dataset_ids, dataset_mask, dataset_users, clip,
                                        privacy_unit=unit, chunk=8)  # fmt: skip
        return applied_sum(start, after, optimizer.expected_batch_size)

    with_user = clipped_sum_of(ids, mask, users, "user")
    without_user = clipped_sum_of(ids[light], mask[light], users[light], "user")
    moved = norm([a - b for a, b in zip(with_user, without_user)])
    assert moved <= clip * (1 + 1e-6)
    assert moved == pytest.approx(clip, rel=1e-6)  # exactly C: the heavy user's summed gradient, clipped once
    # At example level the same user's 24 examples are clipped one by one: together they move the sum by several C
    # (about sqrt(24) C here, their directions being far from aligned; up to 24 C).
    example_level = norm([a - b for a, b in zip(clipped_sum_of(ids, mask, None, "example"),
                                                clipped_sum_of(ids[light], mask[light], None, "example"))])  # fmt: skip
    assert example_level > 3 * clip


def test_user_level_epsilon_matches_dp_accounting_and_ledger(tmp_path):
    users = [i // 3 for i in range(24)]  # 8 users of 3 conversations
    ids, mask = padded_batch([4 + i % 5 for i in range(24)], seed=5)
    model = lora_gpt2(seed=3)
    ledger = BudgetLedger(tmp_path / "privacy.db")
    ledger.create("chats", epsilon=50.0, delta=1e-3, privacy_unit="user")
    params = [p for p in model.parameters() if p.requires_grad]
    sigma = 1.3
    with PrivacyEngine(ledger=ledger, budget="chats") as engine:
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(params, lr=0.1),
            data_loader=DataLoader(TensorDataset(ids, mask), batch_size=6), noise_multiplier=sigma, max_grad_norm=1.0,
            privacy_unit="user", user_ids=users,
            noise_generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        for _ in range(2):
            for batch_ids, batch_mask in loader:
                optimizer.zero_grad()
                if len(batch_ids):
                    logits = model(input_ids=batch_ids, attention_mask=batch_mask).logits
                    causal_lm_loss(logits, batch_ids, batch_mask).backward()
                optimizer.step()
    q = 1 / 4  # len(loader) = 24 / 6 batches: each user sampled with probability 1/4
    assert engine.privacy_unit == "user" and optimizer.steps_taken == 8
    assert optimizer.expected_batch_size == pytest.approx(q * 8)
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 8))  # fmt: skip
    assert engine.get_epsilon(1e-3) == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-9)
    (entry,) = ledger.history("chats")
    assert (entry.privacy_unit, entry.sample_rate, entry.noise_multiplier, entry.steps, entry.status) == (
        "user", q, sigma, 8, "spent")


def test_train_causal_lm_user_level_calibrates_and_charges_the_ledger(tmp_path):
    users = [i // 2 for i in range(20)]
    ids, mask = padded_batch([3 + i % 6 for i in range(20)], seed=6)
    ledger = BudgetLedger(tmp_path / "privacy.db")
    ledger.create("chats", epsilon=5.0, delta=1e-3, privacy_unit="user")
    privacy = PrivacySettings(target_epsilon=4.0, delta=1e-3, expected_units=5, max_physical_batch_size=4,
                              ledger=ledger, budget="chats")  # fmt: skip
    result = train_causal_lm(lora_gpt2(seed=4), TensorDataset(ids, mask), epochs=2, lr=1e-3, user_ids=users,
                             privacy=privacy)  # fmt: skip
    assert result.privacy_unit == "user" and result.sample_rate == pytest.approx(0.5)  # 10 users, 5 per step
    assert result.steps == 4 and 0.99 * 4.0 * 0.99 <= result.epsilon <= 4.0
    (entry,) = ledger.history("chats")
    assert entry.status == "spent" and entry.steps == 4 and entry.privacy_unit == "user"
    assert ledger.spent("chats") <= 5.0


class BigramLM(torch.nn.Module):
    """Embedding + linear head: unlike Hugging Face GPT-2, it runs on a batch of zero examples."""

    def __init__(self, vocab: int = 40, dim: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


def test_user_level_empty_batch_with_forward_pass_takes_a_noise_only_step():
    """At example level a forward/backward pass on an empty batch is fine (a noise-only step); so must it be here.
    (Hugging Face models cannot run on zero examples: skip their forward pass, as ``train_causal_lm`` does.)"""
    users = list(range(6))
    ids, mask = padded_batch([4, 5, 6, 3, 7, 2], seed=7)
    torch.manual_seed(0)
    model = BigramLM()
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(ids, mask), batch_size=1), noise_multiplier=1.0, max_grad_norm=1.0,
        privacy_unit="user", user_ids=users, noise_generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    empty = 0
    for batch_ids, batch_mask in loader:  # q = 1/6: some batches are empty
        empty += len(batch_ids) == 0
        optimizer.zero_grad()
        causal_lm_loss(model(batch_ids), batch_ids, batch_mask).backward()  # zero examples: a differentiable 0
        optimizer.step()
    assert empty > 0 and optimizer.steps_taken == 6
