"""Issue #6: the causal-LM loss is each example's own mean token loss, averaged over examples."""

from __future__ import annotations

import math

import pytest
import torch

from dptrain.lm import causal_lm_loss, tiny_gpt2, token_log_likelihoods


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(30, n_layer=1, n_embd=16, n_head=2, n_positions=16, seed=0).double().eval()


def _batch():
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 2], [1, 4, 4, 3, 0, 0, 0], [1, 9, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    return ids, mask


def test_each_example_loss_is_its_own_token_mean_whatever_the_batch(model):
    ids, mask = _batch()
    per_example = causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask, reduction="none")
    for i in range(3):
        alone = ids[i : i + 1, : int(mask[i].sum())]
        # Hugging Face's own loss on one unpadded example is that example's token mean.
        hf = model(input_ids=alone, labels=alone).loss
        assert per_example[i].item() == pytest.approx(hf.item(), rel=1e-6)  # HF computes its loss in float32
    mean = causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    assert mean.item() == pytest.approx(per_example.mean().item(), rel=1e-12)
    total = causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask, reduction="sum")
    assert total.item() == pytest.approx(per_example.sum().item(), rel=1e-12)


def test_batch_wide_token_mean_is_not_a_per_example_loss(model):
    """Why not Hugging Face's batch loss: it weights examples by token counts, so it is not mean_i l_i."""
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    hf_batch = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ours = causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    assert abs(hf_batch.item() - ours.item()) > 1e-3


def test_ignore_index_and_mask_and_empty_batch(model):
    ids, mask = _batch()
    labels = ids.clone()
    labels[0, 3:] = -100  # predict only tokens 1 and 2 of the first example
    logits = model(input_ids=ids, attention_mask=mask).logits
    first = causal_lm_loss(logits[:1], labels[:1], reduction="none")
    ll = token_log_likelihoods(logits[:1], ids[:1])
    assert first.item() == pytest.approx(-(ll[0, 0] + ll[0, 1]).item() / 2, rel=1e-10)
    # An example with nothing to predict has loss 0, and a batch of zero examples gives a differentiable 0.
    nothing = causal_lm_loss(logits[2:], ids[2:], torch.zeros_like(mask[2:]), reduction="none")
    assert nothing.item() == 0.0
    empty_logits = logits[:0].detach().requires_grad_()
    empty = causal_lm_loss(empty_logits, ids[:0], mask[:0])
    empty.backward()
    assert empty.item() == 0.0 and empty_logits.grad is not None
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(logits, ids, reduction="token")
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(logits, ids[:, :3])
    assert math.isfinite(causal_lm_loss(logits, ids, mask).item())
