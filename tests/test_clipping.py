"""One DP-SGD step without noise equals -lr * sum_i clip(g_i) / B from a brute-force per-example loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from models import ARCHITECTURES, brute_force_clipped_sum, make_case

BATCH = 12
LR = 0.5
REL_TOL = 1e-5


MODES = ("auto", "vmap")


def private_step(
    model, inputs, labels, max_grad_norm, loss_reduction="mean", max_physical_batch_size=None, grad_sample_mode="auto"
):
    """One noiseless DP-SGD step over the whole batch (poisson_sampling=False keeps it the given batch)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=len(inputs))
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            loss_reduction=loss_reduction,
            max_physical_batch_size=max_physical_batch_size,
            grad_sample_mode=grad_sample_mode,
        )
    reduction = "mean" if loss_reduction == "mean" else "sum"
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
        optimizer.step()
    return optimizer


def assert_step_matches(before, after, clipped_sum, batch):
    trainable = [(b, a) for b, a in zip(before.parameters(), after.parameters()) if b.requires_grad]
    assert len(trainable) == len(clipped_sum)
    for (b, a), total in zip(trainable, clipped_sum):
        expected = b.detach() - LR * total / batch
        torch.testing.assert_close(a.detach(), expected, rtol=REL_TOL, atol=REL_TOL * expected.abs().max().item())


def median_grad_norm(model, inputs, labels) -> float:
    norms = []
    for i in range(len(inputs)):
        model.zero_grad()
        nn.functional.cross_entropy(model(inputs[i : i + 1]), labels[i : i + 1]).backward()
        norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)))
    model.zero_grad()
    return torch.stack(norms).median().item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_noiseless_step_equals_brute_force_clipping(architecture, mode):
    model, inputs, labels = make_case(architecture, BATCH)
    # Clip at the median norm so that about half the examples are clipped and half are not.
    max_grad_norm = median_grad_norm(model, inputs, labels)
    reference = copy.deepcopy(model)
    clipped_sum = brute_force_clipped_sum(reference, inputs, labels, max_grad_norm)
    private_step(model, inputs, labels, max_grad_norm, grad_sample_mode=mode)
    assert_step_matches(reference, model, clipped_sum, BATCH)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("architecture", ["mlp", "transformer"])
def test_sum_reduction_equals_brute_force(architecture, mode):
    model, inputs, labels = make_case(architecture, BATCH)
    max_grad_norm = median_grad_norm(model, inputs, labels)
    reference = copy.deepcopy(model)
    clipped_sum = brute_force_clipped_sum(reference, inputs, labels, max_grad_norm)
    private_step(model, inputs, labels, max_grad_norm, loss_reduction="sum", grad_sample_mode=mode)
    assert_step_matches(reference, model, clipped_sum, BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_physical_chunks_give_the_same_step(mode):
    model, inputs, labels = make_case("embedding_conv1d", BATCH)
    max_grad_norm = median_grad_norm(model, inputs, labels)
    reference = copy.deepcopy(model)
    clipped_sum = brute_force_clipped_sum(reference, inputs, labels, max_grad_norm)
    optimizer = private_step(model, inputs, labels, max_grad_norm, max_physical_batch_size=5, grad_sample_mode=mode)
    assert optimizer.steps_taken == 1  # chunks of 5, 5, 2 make one logical step
    assert_step_matches(reference, model, clipped_sum, BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_are_untouched_and_excluded_from_the_norm(mode):
    model, inputs, labels = make_case("transformer", BATCH)
    for p in model.embed.parameters():
        p.requires_grad_(False)
    frozen_before = model.embed.weight.detach().clone()
    max_grad_norm = median_grad_norm(model, inputs, labels)
    reference = copy.deepcopy(model)
    clipped_sum = brute_force_clipped_sum(reference, inputs, labels, max_grad_norm)
    private_step(model, inputs, labels, max_grad_norm, grad_sample_mode=mode)
    assert torch.equal(model.embed.weight, frozen_before)
    assert_step_matches(reference, model, clipped_sum, BATCH)


@pytest.mark.parametrize("mode", MODES)
def test_clipping_bounds_every_example_contribution(mode):
    """A single example's contribution to the noiseless sum has norm exactly C when its gradient is larger."""
    model, inputs, labels = make_case("mlp", 1)
    inputs = inputs * 100  # a huge gradient
    before = copy.deepcopy(model)
    private_step(model, inputs, labels, max_grad_norm=0.01, grad_sample_mode=mode)
    delta = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(model.parameters(), before.parameters())))
    assert delta.item() == pytest.approx(LR * 0.01, rel=1e-5)


def _three_noiseless_steps(model, inputs, labels, mode):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=4)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
            poisson_sampling=False, grad_sample_mode=mode,
        )
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert optimizer.steps_taken == 3
    return model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_later_steps_match_the_reference_engine(architecture):
    """From the second step on the fast engine also skips autograd's own weight gradients: still exact."""
    model, inputs, labels = make_case(architecture, BATCH)
    fast = _three_noiseless_steps(copy.deepcopy(model), inputs, labels, "auto")
    reference = _three_noiseless_steps(copy.deepcopy(model), inputs, labels, "vmap")
    for a, b in zip(fast.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in fast.parameters())


def test_a_forward_that_raises_leaves_parameters_trainable():
    model, inputs, labels = make_case("mlp", BATCH)
    model = _three_noiseless_steps(model, inputs, labels, "auto")
    head = model.net[2]  # its input carries gradient, so its weights are suspended during its forward
    with pytest.raises(RuntimeError):
        head(torch.randn(BATCH, 11, requires_grad=True))  # wrong feature size: the forward raises
    assert all(p.requires_grad for p in model.parameters())


class InplaceCNN(nn.Module):
    """A first layer whose input carries no gradient, followed by an in-place activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).flatten(1))


def test_first_layer_with_inplace_activation_later_steps_match_and_skip_autograd_gradients():
    """From the second step, autograd computes no parameter gradient of rule layers, not even of a first layer
    (whose output is then put on the graph by a tap that tolerates in-place operations); the steps stay exact."""
    torch.manual_seed(3)
    model, inputs, labels = InplaceCNN(), torch.randn(BATCH, 1, 6, 6), torch.randint(0, 3, (BATCH,))
    fast = _three_noiseless_steps(copy.deepcopy(model), inputs, labels, "auto")
    reference = _three_noiseless_steps(copy.deepcopy(model), inputs, labels, "vmap")
    for a, b in zip(fast.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for p in fast.parameters():
        p.grad = None
    nn.functional.cross_entropy(fast(inputs), labels).backward()
    assert all(p.grad is None for p in fast.parameters())  # the clipped sum alone will fill .grad


@pytest.mark.parametrize("failure", ["nan_in_second_chunk", "loop_left_after_first_chunk"])
def test_an_unfinished_logical_step_leaves_nothing_behind(failure):
    """A logical batch of two chunks that never completes (its second chunk raises a non-finite gradient error, or
    the training loop leaves the loader after the first chunk): nothing of its first chunk may reach the next
    step's update, which must equal that of an engine that never saw the unfinished batch."""
    from dptrain import NonFiniteGradientError

    model, inputs, labels = make_case("mlp", 2 * BATCH)
    first, second = (inputs[:BATCH], labels[:BATCH]), (inputs[BATCH:], labels[BATCH:])

    def run(batches):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=LR)
        loader = DataLoader(TensorDataset(*first), batch_size=BATCH)
        with pytest.warns(UserWarning, match="poisson_sampling=False"):
            trained, optimizer, loader = PrivacyEngine().make_private(
                module=trained, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
                poisson_sampling=False, max_physical_batch_size=BATCH // 2,
            )
        for x, y, unfinished in batches:
            loader.dataset.tensors = (x, y)
            for chunk, (cx, cy) in enumerate(loader):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(trained(cx), cy)
                poisoned = unfinished and failure == "nan_in_second_chunk" and chunk == 1
                (loss * float("nan") if poisoned else loss).backward()
                try:
                    optimizer.step()
                except NonFiniteGradientError:
                    assert poisoned
                if unfinished and failure == "loop_left_after_first_chunk":
                    break
        return trained, optimizer

    unfinished_then_good, optimizer = run([(*first, True), (*second, False)])
    only_good, _ = run([(*second, False)])
    # A batch skipped after an error in one of its chunks is charged as a step (the skip depends on the data); a
    # batch the loop left early never ended, releases nothing and is not charged.
    assert optimizer.steps_taken == (2 if failure == "nan_in_second_chunk" else 1)
    assert optimizer.steps_skipped == (1 if failure == "nan_in_second_chunk" else 0)
    for a, b in zip(unfinished_then_good.parameters(), only_good.parameters()):
        torch.testing.assert_close(a, b)
