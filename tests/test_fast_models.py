"""Issue #4, whole models: one noiseless DP-SGD step with the fast engine ("auto") and with the torch.func reference
("vmap") each equals -lr * sum_i clip(g_i) / B from a brute-force per-example loop.

Models: a transformer LM (nn.TransformerEncoder with a causal mask), Hugging Face GPT-2 with a tiny config (tied
wte / lm_head, with and without padding), an LSTM LM and the CNN of Opacus' MNIST example. Losses are per-example
means over each example's own tokens, averaged over the batch (loss_reduction="mean"), so each example's loss is a
function of that example alone. float64 where the layers allow it, so that 1e-5 relative measures the method.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from dptrain import PrivacyEngine
from dptrain.grad import FastGradSampler
from dptrain.grad.layers.linear import LinearRule, ghost_is_cheaper

LR = 0.5
REL_TOL = 1e-5
MODES = ("auto", "vmap")


# --------------------------------------------------------------------------------------------------------------------
# Models and their per-example losses
# --------------------------------------------------------------------------------------------------------------------


class TransformerLM(nn.Module):
    """Token + position embeddings, two nn.TransformerEncoderLayer (batch_first) under a causal mask, linear head."""

    def __init__(self, vocab: int = 20, dim: int = 16, layers: int = 2, max_len: int = 8, window: int = 0) -> None:
        super().__init__()
        self.window = window  # > 0: sliding-window causal attention (each position sees the last ``window``)
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, steps = tokens.shape
        positions = torch.arange(steps, device=tokens.device).expand(batch, -1)
        mask = nn.Transformer.generate_square_subsequent_mask(steps, dtype=self.head.weight.dtype)
        if self.window:
            distance = torch.arange(steps)[:, None] - torch.arange(steps)[None, :]
            mask = mask.masked_fill(distance >= self.window, float("-inf"))
        h = self.encoder(self.embed(tokens) + self.position(positions), mask=mask, is_causal=not self.window)
        return self.head(h)


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


class MnistCNN(nn.Module):
    """The CNN of Opacus' MNIST example (tanh activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def gpt2(dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic, so the loop and the batch agree
    )  # fmt: skip
    model = GPT2LMHeadModel(config).to(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as in the released GPT-2
    return model


def token_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean cross-entropy over the example's own non-ignored (label != -100) tokens, shape (B,)."""
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    counts = (labels != -100).sum(1).clamp(min=1)
    return per_token.sum(1) / counts


def lm_loss(model, tokens, labels):
    return token_mean_ce(model(tokens), labels)


def gpt2_loss(model, tokens, labels):
    return token_mean_ce(model(tokens).logits, labels)


def gpt2_padded_loss(model, tokens, attention_mask, labels):
    return token_mean_ce(model(tokens, attention_mask=attention_mask).logits, labels)


def classifier_loss(model, x, labels):
    return F.cross_entropy(model(x), labels, reduction="none")


# --------------------------------------------------------------------------------------------------------------------
# Reference and private step
# --------------------------------------------------------------------------------------------------------------------


def per_example_gradients(model, tensors, loss_fn) -> list[list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(len(tensors[0])):
        loss = loss_fn(model, *(t[i : i + 1] for t in tensors))[0]
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append([gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, params)])
    return grads


def brute_force_clipped_sum(model, tensors, loss_fn) -> tuple[list[torch.Tensor], float]:
    """sum_i clip(g_i, C) with C the median per-example norm (about half the examples are clipped)."""
    grads = per_example_gradients(model, tensors, loss_fn)
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in per_param)) for per_param in grads])
    max_grad_norm = norms.median().item()
    factors = (max_grad_norm / norms.clamp(min=max_grad_norm)).tolist()
    total = [sum(f * per_param[k] for f, per_param in zip(factors, grads)) for k in range(len(grads[0]))]
    return total, max_grad_norm


def private_step(model, tensors, loss_fn, max_grad_norm, mode, params=None):
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    loader = DataLoader(TensorDataset(*tensors), batch_size=len(tensors[0]))
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            loss_reduction="mean",
            grad_sample_mode=mode,
        )
    for batch in loader:
        optimizer.zero_grad()
        loss_fn(model, *batch).mean().backward()
        optimizer.step()
    return optimizer


def assert_step_equals_brute_force(model, tensors, loss_fn, mode):
    reference = copy.deepcopy(model)
    clipped_sum, max_grad_norm = brute_force_clipped_sum(reference, tensors, loss_fn)
    before = copy.deepcopy(model)
    optimizer = private_step(model, tensors, loss_fn, max_grad_norm, mode)
    assert optimizer.steps_taken == 1
    trainable = [(b, a) for b, a in zip(before.parameters(), model.parameters()) if b.requires_grad]
    assert len(trainable) == len(clipped_sum)
    batch = len(tensors[0])
    for (b, a), total in zip(trainable, clipped_sum):
        expected = b.detach() - LR * total / batch
        assert not torch.equal(expected, b.detach()) or not total.any()
        torch.testing.assert_close(
            a.detach(), expected, rtol=REL_TOL, atol=REL_TOL * LR * total.abs().max().item() / batch + 1e-12
        )


def lm_batch(batch: int, steps: int, vocab: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))


# --------------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "batch, steps, window, dtype",
    [(4, 6, 0, torch.float32), (4, 6, 0, torch.float64), (5, 5, 3, torch.float32)],
    ids=["causal", "causal-float64", "window-B==T"],
)
def test_transformer_lm_step_equals_brute_force(mode, batch, steps, window, dtype):
    """The (T, T) attention mask is shared by all examples, also when T equals the batch size."""
    torch.manual_seed(0)
    model = TransformerLM(window=window).to(dtype)
    assert_step_equals_brute_force(model, lm_batch(batch, steps), lm_loss, mode)


@pytest.mark.parametrize("mode", MODES)
def test_lstm_lm_step_equals_brute_force(mode):
    torch.manual_seed(1)
    model = LSTMLM()  # float32: see test_fast_layers for RNNs in float64
    assert_step_equals_brute_force(model, lm_batch(5, 6), lm_loss, mode)


@pytest.mark.parametrize("mode", MODES)
def test_mnist_cnn_step_equals_brute_force(mode):
    torch.manual_seed(2)
    model = MnistCNN().double()
    tensors = (torch.randn(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,)))
    assert_step_equals_brute_force(model, tensors, classifier_loss, mode)


def _next_token_data(batch: int, steps: int, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(1, vocab, (batch, steps))
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]
    return tokens, labels


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_step_equals_brute_force(mode):
    torch.manual_seed(3)
    model = gpt2()
    assert_step_equals_brute_force(model, _next_token_data(4, 6), gpt2_loss, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_with_padding_step_equals_brute_force(mode):
    """Right padding: pad positions are masked out of attention and their labels ignored, per example."""
    torch.manual_seed(4)
    model = gpt2()
    tokens, labels = _next_token_data(4, 6)
    lengths = torch.tensor([6, 4, 2, 5])
    attention_mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    tokens = tokens.masked_fill(attention_mask == 0, 0)
    labels = labels.masked_fill(torch.arange(6)[None, :] >= (lengths[:, None] - 1), -100)
    assert_step_equals_brute_force(model, (tokens, attention_mask, labels), gpt2_padded_loss, mode)


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_frozen_and_unused_parameters(mode):
    """Frozen parameters stay bit-identical; a trainable but unused layer gets a zero clipped sum (and no noise here)."""
    torch.manual_seed(5)
    model = gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    for p in model.transformer.ln_f.parameters():
        p.requires_grad_(False)
    model.unused = nn.Linear(4, 4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    unused = [p.detach().clone() for p in model.unused.parameters()]
    assert_step_equals_brute_force(model, _next_token_data(4, 6), gpt2_loss, mode)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    for p, before in zip(model.unused.parameters(), unused):
        assert torch.equal(p, before)


# --------------------------------------------------------------------------------------------------------------------
# Memory: the fast engine keeps no per-example gradients where it need not
# --------------------------------------------------------------------------------------------------------------------


def _collect(model, tensors, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    sampler = FastGradSampler(model, loss_reduction="mean")
    try:
        loss_fn(model, *tensors).mean().backward()
        return sampler.collect(params), params
    finally:
        sampler.detach()


def test_fast_engine_materialises_nothing_for_ghost_path_linears(monkeypatch):
    torch.manual_seed(6)
    model = TransformerLM()
    tokens, labels = lm_batch(5, 7)
    for layer in (model.head, model.encoder.layers[0].linear1, model.encoder.layers[0].linear2):
        assert ghost_is_cheaper(7, layer.in_features, layer.out_features)

    def forbidden(*args, **kwargs):
        raise AssertionError("a ghost-path Linear materialised per-example gradients")

    monkeypatch.setattr(LinearRule, "_weight_grads", forbidden)
    monkeypatch.setattr(LinearRule, "per_example", forbidden)
    grads, params = _collect(model, (tokens, labels), lm_loss)
    assert grads.shared == {}  # no parameter is used twice, so nothing is kept per example
    norms = grads.squared_norms()
    summed = grads.weighted_sum(torch.ones(5))
    assert norms.shape == (5,) and bool((norms > 0).all())
    assert {p for p in params if p in summed} == set(params)


def test_tied_gpt2_materialises_nothing():
    torch.manual_seed(7)
    model = gpt2()
    tokens, labels = _next_token_data(3, 6)
    model.transformer.wpe.weight.requires_grad_(False)  # not a concern of this test (position ids are shared)
    grads, _ = _collect(model, (tokens, labels), gpt2_loss)
    assert set(grads.factored) == {model.transformer.wte.weight}  # tied wte / lm_head: cross terms
    assert grads.shared == {}  # nothing materialised per example
    assert grads.fallback is None  # every GPT-2 layer with parameters has a rule
