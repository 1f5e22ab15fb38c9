"""Issue #10, item 1: models as people write them run exactly, on the fast path.

- A nanoGPT-style GPT (tests/nanogpt.py: its own LayerNorm by ``F.layer_norm``, position ids ``arange(T)`` without
  a batch dimension, ``F.scaled_dot_product_attention``, tied head, the loss computed inside ``forward`` from
  (B*T, V) logits): one noiseless DP-SGD step equals a brute-force per-example loop, with no torch.func replay.
- Custom modules calling ``F.linear``, ``F.conv2d``, ``F.group_norm``, ``F.rms_norm``, ``F.embedding`` on their
  own parameters get the built-in layers' rules; any other use of their parameters falls back, still exact.
- A model whose loss is a batch-wide token mean with ``ignore_index`` is refused (not a per-example loss).
- An unbatched layer output used other than by broadcasting is not expanded (the replay attributes it, exactly).

float64 so that 1e-6 relative measures the method.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from nanogpt import GPT, GPTConfig

LR = 0.5
REL_TOL = 1e-6


def _private(model: nn.Module, data: tuple, batch: int, max_grad_norm: float = 0.05, mode: str = "auto"):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loader = DataLoader(TensorDataset(*data), batch_size=batch)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        return PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip


def _brute_force_step(model: nn.Module, batch: list[tuple], loss_of, max_grad_norm: float) -> list[torch.Tensor]:
    """The parameters after one noiseless DP-SGD step, by a loop over examples (the obviously correct reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for example in batch:
        model.zero_grad()
        loss_of(model, *(t.unsqueeze(0) for t in example)).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / float(norm))
        for t, g in zip(total, grads):
            t += factor * g
    return [p.detach() - LR * t / len(batch) for p, t in zip(params, total)]


def _assert_step_exact(model: nn.Module, data: tuple, batch: int, loss_of, steps: int = 2, **private) -> object:
    """``steps`` noiseless steps of the private model each equal the brute-force step; returns the optimizer."""
    reference = copy.deepcopy(model)
    max_grad_norm = private.get("max_grad_norm", 0.05)
    model, optimizer, loader = _private(model, data, batch, **private)
    for step, examples in zip(range(steps), loader):
        expected = _brute_force_step(reference, list(zip(*examples)), loss_of, max_grad_norm)
        optimizer.zero_grad()
        loss_of(model, *examples).backward()
        optimizer.step()
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p, e in zip(trainable, expected):
            torch.testing.assert_close(p.detach(), e, rtol=REL_TOL, atol=REL_TOL * float(e.abs().max()))
        with torch.no_grad():
            for r, p in zip(reference.parameters(), model.parameters()):
                r.copy_(p)
    return optimizer


def _on_the_fast_path(optimizer) -> None:
    sampler = optimizer.grad_sampler
    assert not sampler._unbatched_layers, "a whole-model replay ran"
    assert not sampler.fallbacks, "a layer fell back to torch.func"
    assert all(owner.fallback_from is None and owner.standins for owner, _ in sampler._functional)


# --------------------------------------------------------------------------------------------------------------------
# nanoGPT-style
# --------------------------------------------------------------------------------------------------------------------


def _nanogpt_loss(model, x, y):
    _, loss = model(x, y)
    return loss


@pytest.mark.parametrize("batch, steps", [(4, 8), (8, 8)], ids=["B<T", "B==T"])
def test_a_nanogpt_style_model_trains_exactly_on_the_fast_path(batch, steps):
    """With T == B the unbatched position ids (T,) also fit as a batch dimension: the probe must decide."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=steps, vocab_size=24, n_layer=2, n_head=2, n_embd=16)).double()
    x, y = torch.randint(0, 24, (2 * batch, steps)), torch.randint(0, 24, (2 * batch, steps))
    optimizer = _assert_step_exact(model, (x, y), batch, _nanogpt_loss)
    _on_the_fast_path(optimizer)


def test_nanogpt_with_ignored_targets_is_refused_with_the_per_example_loss_to_use():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=24, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(0, 24, (8, 8)), torch.randint(0, 24, (8, 8))
    y[0, 3:] = -1  # example 0 is shorter: a token mean over the batch weights it less
    model, optimizer, loader = _private(model, (x, y), 8)
    xb, yb = next(iter(loader))
    for _ in range(2):  # a caught error does not let the next forward pass through
        with pytest.raises(RuntimeError, match="not the mean of per-example losses.*dptrain.lm.causal_lm_loss"):
            model(xb, yb)


def test_a_model_returning_only_a_uniform_token_mean_loss_passes_the_loss_check():
    class LossOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = GPT(GPTConfig(block_size=6, vocab_size=16, n_layer=1, n_head=2, n_embd=8))

        def forward(self, x, y):
            return self.gpt(x, y)[1]

    torch.manual_seed(1)
    x, y = torch.randint(0, 16, (8, 6)), torch.randint(0, 16, (8, 6))
    _assert_step_exact(LossOnly().double(), (x, y), 4, lambda m, a, b: m(a, b))


class FlatLogits(nn.Module):
    """Token and batched position embeddings, a Linear, logits flattened to (B*T, V) inside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(16, 8), nn.Embedding(6, 8), nn.Linear(8, 16)

    def forward(self, x):
        positions = torch.arange(x.shape[1]).expand_as(x)
        logits = self.head(torch.tanh(self.tok(x) + self.pos(positions)))
        return logits.view(-1, logits.size(-1))


def test_logits_flattened_to_batch_times_tokens_inside_forward_train_exactly():
    def loss_of(model, x, y):
        return F.cross_entropy(model(x), y.view(-1))

    torch.manual_seed(2)
    x, y = torch.randint(0, 16, (8, 6)), torch.randint(0, 16, (8, 6))
    _on_the_fast_path(_assert_step_exact(FlatLogits().double(), (x, y), 4, loss_of))


def test_a_model_without_per_example_outputs_that_needs_the_replay_is_refused_clearly():
    """Unbatched position ids need the probe or the replay, and both need per-example outputs (or a loss)."""

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = GPT(GPTConfig(block_size=6, vocab_size=16, n_layer=1, n_head=2, n_embd=8))

        def forward(self, x):
            logits, _ = self.gpt(x, x)
            return logits.view(-1, logits.size(-1))

    torch.manual_seed(2)
    x, y = torch.randint(0, 16, (8, 6)), torch.randint(0, 16, (8, 6))
    model, optimizer, loader = _private(Flat(), (x, y), 4)
    xb, yb = next(iter(loader))
    with pytest.raises(RuntimeError, match=r"shape \(24, 16\) has no batch dimension.*return per-example outputs"):
        F.cross_entropy(model(xb), yb.view(-1)).backward()


# --------------------------------------------------------------------------------------------------------------------
# Functional rules
# --------------------------------------------------------------------------------------------------------------------


class Functional(nn.Module):
    """Parameters of its own, used through one functional call (or, with ``twist``, a transpose and a matmul)."""

    def __init__(self, kind: str, twist: bool = False) -> None:
        super().__init__()
        self.kind, self.twist = kind, twist
        if kind == "linear":
            self.weight, self.bias = nn.Parameter(torch.randn(6, 5) * 0.4), nn.Parameter(torch.randn(6) * 0.1)
        elif kind == "conv2d":
            self.weight, self.bias = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3), nn.Parameter(torch.randn(4) * 0.1)
        elif kind in ("group_norm", "rms_norm"):
            self.weight = nn.Parameter(1 + 0.3 * torch.randn(4))
            self.bias = nn.Parameter(0.1 * torch.randn(4)) if kind == "group_norm" else None
        elif kind == "embedding":
            self.weight, self.bias = nn.Parameter(torch.randn(10, 5)), None

    def forward(self, x):
        if self.kind == "linear":
            return x @ self.weight.t() + self.bias if self.twist else F.linear(x, self.weight, self.bias)
        if self.kind == "conv2d":
            return F.conv2d(x, self.weight, self.bias, stride=1, padding=1)
        if self.kind == "group_norm":
            return F.group_norm(x, 2, self.weight, self.bias, 1e-5)
        if self.kind == "rms_norm":
            return F.rms_norm(x, (4,), self.weight, 1e-6)
        return F.embedding(x, self.weight, padding_idx=0)


CASES = {
    "linear": (lambda: nn.Sequential(Functional("linear"), nn.Tanh(), nn.Linear(6, 3)), (5,), False),
    "linear_twisted": (lambda: nn.Sequential(Functional("linear", True), nn.Tanh(), nn.Linear(6, 3)), (5,), False),
    "conv2d": (lambda: nn.Sequential(Functional("conv2d"), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 25, 3)), (2, 5, 5), False),
    "group_norm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), Functional("group_norm"), nn.Flatten(), nn.Linear(36, 3)), (2, 5, 5), False),
    "rms_norm": (lambda: nn.Sequential(nn.Linear(5, 4), Functional("rms_norm"), nn.Linear(4, 3)), (7, 5), False),
    "embedding": (lambda: nn.Sequential(Functional("embedding"), nn.Flatten(), nn.Linear(20, 3)), (4,), True),
}


def _classification(model, x, y):
    out = model(x)
    return F.cross_entropy(out.reshape(-1, 3) if out.dim() > 2 else out, y.reshape(-1))


@pytest.mark.parametrize("case", list(CASES))
def test_a_module_calling_functionals_on_its_own_parameters_gets_the_layer_rule(case):
    factory, shape, ids = CASES[case]
    torch.manual_seed(3)
    model = factory().double()
    x = torch.randint(0, 10, (8, *shape)) if ids else torch.randn(8, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (8, shape[0])) if case == "rms_norm" else torch.randint(0, 3, (8,))
    optimizer = _assert_step_exact(model, (x, y), 4, _classification, max_grad_norm=0.5)
    owner = optimizer.grad_sampler._functional[0][0]
    if case == "linear_twisted":  # a transpose of the weight: not a functional call, the fallback's
        assert owner.fallback_from is not None and not owner.standins
    else:
        assert owner.fallback_from is None and len(owner.standins) == 1


# --------------------------------------------------------------------------------------------------------------------
# Unbatched outputs used other than by broadcasting
# --------------------------------------------------------------------------------------------------------------------


class MeanOfPositions(nn.Module):
    """Position embeddings of ``arange(T)`` reduced over their first dimension (T) before use: expanding them to the
    batch would change what ``mean(0)`` reduces, and mix the examples' gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(12, 6), nn.Embedding(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        positions = self.pos(torch.arange(x.shape[1]))
        return self.head(self.tok(x) + positions.mean(0)).mean(1)


@pytest.mark.parametrize("batch", [4, 5], ids=["B!=T", "B==T"])
def test_an_unbatched_output_reduced_over_its_rows_is_not_expanded(batch):
    torch.manual_seed(4)
    x, y = torch.randint(0, 12, (2 * batch, 5)), torch.randint(0, 3, (2 * batch,))
    optimizer = _assert_step_exact(MeanOfPositions().double(), (x, y), batch, _classification, max_grad_norm=0.1)
    assert optimizer.grad_sampler._unbatched_layers  # attributed by the whole-model replay


class LateOutsideUse(nn.Module):
    """A functional RMSNorm whose weight the parent also uses directly once ``outside`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(4, 4), Functional("rms_norm"), nn.Linear(4, 3)
        self.outside = False

    def forward(self, x):
        h = self.norm(self.inp(x))
        if self.outside:
            h = h * self.norm.weight  # outside the owner's forward: its gradient would go unclipped
        return self.out(h)


def test_an_outside_use_of_a_functional_layers_parameter_from_a_later_step_is_refused():
    """After the first step autograd's gradients of the functional layer's parameters are suspended in its forward,
    so any gradient they receive comes from an outside use: refused at that step, nothing released."""
    torch.manual_seed(7)
    model = LateOutsideUse()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    private, optimizer, loader = _private(model, (x, y), 4)
    batches = iter(loader)
    xb, yb = next(batches)
    F.cross_entropy(private(xb), yb).backward()
    optimizer.step()
    model.outside = True
    xb, yb = next(batches)
    optimizer.zero_grad()
    F.cross_entropy(private(xb), yb).backward()
    with pytest.raises(RuntimeError, match="norm.weight receives gradient outside"):
        optimizer.step()
    assert optimizer.steps_taken == 1
