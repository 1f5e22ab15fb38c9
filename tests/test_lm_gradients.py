"""Issue #6, Hugging Face causal LMs and LoRA: one noiseless DP-SGD step with the fast engine ("auto") and with the
torch.func reference ("vmap") equals a brute-force per-example loop.

The loop computes each example's gradient on that example *alone, without its padding* (trimmed to its own length,
no attention mask), while the engine sees the right-padded batch with an attention mask: equality shows that padding
and the mask are respected and that no example's gradient depends on another's. GPT-2 ties ``lm_head`` to ``wte``
(one Parameter, two uses). LoRA (peft) adapters on GPT-2's Conv1D layers: only the adapters change, the frozen base
stays bit-identical, and the fast engine hooks only the adapters' nn.Linear modules. float64 throughout.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.grad import FastGradSampler
from dptrain.lm import add_lora, causal_lm_loss, tiny_gpt2

LR = 0.5
VOCAB = 40
MODES = ("auto", "vmap")


def gpt2(seed: int = 0):
    model = tiny_gpt2(VOCAB, n_layer=2, n_embd=16, n_head=2, n_positions=16, seed=seed).double()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model


def lora_gpt2(seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # init_lora_weights=False: B is random too, so every adapter parameter gets a non-zero gradient.
        return add_lora(gpt2(seed), r=4, alpha=8, init_lora_weights=False).double()


def padded_batch(lengths: list[int], steps: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), steps), generator=generator)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0  # pad id
    return ids, mask


def batch_loss(model, ids, mask):
    return causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)


def example_gradients(model, ids, mask) -> list[list[torch.Tensor]]:
    """Each example's gradient on the example alone, trimmed to its own tokens (no padding, no mask)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(ids.shape[0]):
        tokens = ids[i : i + 1, : int(mask[i].sum())]
        loss = causal_lm_loss(model(input_ids=tokens).logits, tokens)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])
    return out


def clipped_sum(grads: list[list[torch.Tensor]], clip: float) -> list[torch.Tensor]:
    norms = [torch.sqrt(sum(g.pow(2).sum() for g in per)) for per in grads]
    factors = [min(1.0, clip / n.item()) for n in norms]
    return [sum(f * per[k] for f, per in zip(factors, grads)) for k in range(len(grads[0]))]


def median_norm(grads: list[list[torch.Tensor]]) -> float:
    return torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in per)) for per in grads]).median().item()


def one_private_step(model, ids, mask, clip, mode):
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(ids, mask), batch_size=len(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # poisson_sampling=False: one fixed batch, for the comparison
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(params, lr=LR), data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip
    for batch_ids, batch_mask in loader:
        optimizer.zero_grad()
        batch_loss(model, batch_ids, batch_mask).backward()
        optimizer.step()
    assert optimizer.steps_taken == 1
    return model


def assert_step_equals_loop(model, ids, mask, mode):
    reference = copy.deepcopy(model)
    grads = example_gradients(reference, ids, mask)
    clip = median_norm(grads)  # about half the examples are clipped
    expected_sum = clipped_sum(grads, clip)
    before = copy.deepcopy(model)
    model = one_private_step(model, ids, mask, clip, mode)
    trainable = [(b, a) for b, a in zip(before.parameters(), model.parameters()) if b.requires_grad]
    assert len(trainable) == len(expected_sum)
    for (b, a), total in zip(trainable, expected_sum):
        expected = b.detach() - LR * total / len(ids)
        torch.testing.assert_close(a.detach(), expected, rtol=1e-7, atol=1e-10)
    return before, model


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_padded_step_equals_per_example_loop(mode):
    ids, mask = padded_batch([9, 4, 7, 2, 6])
    model = gpt2()
    before, after = assert_step_equals_loop(model, ids, mask, mode)
    # The tied weight moved once, as one parameter.
    assert after.lm_head.weight is after.transformer.wte.weight
    assert not torch.equal(before.transformer.wte.weight, after.transformer.wte.weight)


@pytest.mark.parametrize("mode", MODES)
def test_lora_gpt2_step_equals_per_example_loop_and_freezes_the_base(mode):
    ids, mask = padded_batch([8, 3, 9, 5], seed=1)
    model = lora_gpt2()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before, after = assert_step_equals_loop(model, ids, mask, mode)
    for n, p in after.named_parameters():
        if n in trainable:
            assert not torch.equal(p, dict(before.named_parameters())[n]), n
        else:
            assert torch.equal(p, frozen_before[n]), f"frozen parameter {n} changed"
            assert p.grad is None, f"frozen parameter {n} received a gradient"


def test_fast_engine_hooks_only_lora_linear_layers():
    model = lora_gpt2()
    sampler = FastGradSampler(model)
    try:
        assert sampler.fallbacks == []  # no torch.func fallback: peft's lora_A / lora_B are plain nn.Linear
        assert sampler.fast_layers and all(".lora_A." in p or ".lora_B." in p for p in sampler.fast_layers)
        assert len(sampler.fast_layers) == 2 * 2 * 4  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    finally:
        sampler.detach()


def test_state_dict_keys_and_save_pretrained_unchanged_by_make_private(tmp_path):
    model = lora_gpt2()
    keys = list(model.state_dict())
    ids, mask = padded_batch([5, 7], seed=2)
    model = one_private_step(model, ids, mask, 1.0, "auto")
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)  # peft saves the adapters only
    assert (tmp_path / "adapter_config.json").is_file()
