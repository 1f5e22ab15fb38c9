"""Issue #14 item 1: no parameter or buffer of the model changes during a training forward pass except through
the DP optimizer's step. A layer that keeps statistics of the batch in a buffer, or rewrites its own weight in
forward, saves data-dependent values with the model without noise: refused at the forward pass that does it,
naming the tensor, whatever the engine. What legitimately happens outside forward passes stays allowed."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.independence import IndependenceCheck


class Counting(nn.Module):
    """Counts the inputs' total in a buffer (in place): data-dependent state outside the DP step."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.seen += x.detach().sum()
        return self.lin(x)


class Remembering(nn.Module):
    """Replaces a buffer by the batch mean (a new tensor object, not an in-place change)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        self.mean = x.detach().mean(0)
        return self.lin(x)


class SelfEditing(nn.Module):
    """Moves its own weight towards the batch in forward, under no_grad (no gradient, no clipping, no noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.add_(1e-3 * x.mean(0))
        return self.lin(x)


def _private(model: nn.Module, mode: str = "auto", data: TensorDataset | None = None, batch_size: int = 8, **kwargs):
    torch.manual_seed(0)
    if data is None:
        data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=batch_size), noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode=mode, **kwargs,
        )


def _check_of(model: nn.Module) -> "IndependenceCheck":
    hooks = [getattr(h, "__self__", None) for h in model._forward_hooks.values()]
    return next(h for h in hooks if isinstance(h, IndependenceCheck))


def _token_data(vocab: int, steps: int, count: int = 16) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)  # the same tokens whatever ran before
    ids = torch.randint(0, vocab, (count, steps), generator=generator)
    return TensorDataset(ids, torch.randint(0, 2, (count,), generator=generator))


def _one_step(model, optimizer, loader):
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("mode", ["auto", "vmap"])
@pytest.mark.parametrize(
    "layer,tensor", [(Counting, "buffer seen"), (Remembering, "buffer mean"), (SelfEditing, "parameter lin.weight")]
)
def test_state_changed_in_a_training_forward_pass_is_refused_naming_it(layer, tensor, mode):
    model, optimizer, loader = _private(layer(), mode)
    x, _ = next(iter(loader))
    with pytest.raises(RuntimeError, match=f"{tensor} changed during a training forward pass"):
        model(x)
    assert optimizer.steps_taken == 0


def test_a_refused_forward_pass_leaves_nothing_to_step_on():
    model, optimizer, loader = _private(Counting())
    before = model.lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="buffer seen"):
        _one_step(model, optimizer, loader)
    assert torch.equal(model.lin.weight, before) and optimizer.steps_taken == 0


def test_changes_outside_training_forward_passes_are_allowed():
    """Evaluation without gradients, weights projected after step(), a checkpoint loaded between steps, physical
    chunks of a logical batch: none is a change during a training forward pass."""
    model, optimizer, loader = _private(Counting(), max_physical_batch_size=4)
    x, _ = next(iter(loader))
    with torch.no_grad():
        model(x)  # evaluation: Counting counts, but no gradient flows (no training forward pass)
    model.seen.zero_()  # a change outside any forward pass
    model.eval()  # Counting keeps no statistics in eval mode: the DP steps proceed
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            model.lin.weight.clamp_(-0.5, 0.5)  # a projection after the step: a function of released values
        steps += 1
    assert optimizer.steps_taken == 4 and steps == 8  # 4 logical batches of 2 physical chunks
    model.load_state_dict(model.state_dict())


def test_frozen_parameters_stay_bit_identical_and_a_detached_model_is_unguarded():
    engine = PrivacyEngine()
    model = Counting()
    model.lin.bias.requires_grad_(False)
    bias = model.lin.bias.detach().clone()
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD([model.lin.weight], lr=0.1),
            data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False,
        )
    model.eval()
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert torch.equal(model.lin.bias, bias)
    engine.detach()
    model.train()
    model(torch.randn(2, 4))  # no longer private: no guard
    assert float(model.seen) != 0.0


# --------------------------------------------------------------------------------------------------------------------
# Issue #14 item 2: no examples coupled through the model
# --------------------------------------------------------------------------------------------------------------------


class BatchCentred(nn.Module):
    """Subtracts the batch mean: every example's output (and gradient) depends on all the others."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True))


class Independent(nn.Module):
    """Dropout and a per-example LayerNorm: independent examples (the check must not be fooled by the masks)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Dropout(0.5), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


class AboveTheMedian(nn.Module):
    """Keeps the examples whose score is above the batch's median: a comparison across the batch, zero gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        score = x.sum(1, keepdim=True)
        return self.lin(x) * (score > score.median()).to(x.dtype)


class AboveTheBatchMean(nn.Module):
    """Token model: zeroes the hidden states of the examples whose score is not above the batch's mean score."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(12, 2)

    def forward(self, ids):
        h = self.embed(ids).flatten(1)
        score = h.sum(1, keepdim=True)
        return self.head(h * (score > score.mean()).to(h.dtype))


@pytest.mark.parametrize("mode", ["auto", "vmap"])
@pytest.mark.parametrize(
    "layer, tokens, error",
    [
        (BatchCentred, False, "depends on other examples' inputs"),  # through the gradient
        # without gradient: each example's output is compared with the one it has in a batch of copies of itself
        (AboveTheMedian, False, "replaced by copies of it"),
        (AboveTheBatchMean, True, "replaced by copies of it"),
    ],
)
def test_a_model_coupling_the_examples_of_a_batch_is_refused_at_the_first_forward_pass(mode, layer, tokens, error):
    torch.manual_seed(0)
    model, _, loader = _private(layer(), mode, data=_token_data(10, 3) if tokens else None)
    x, _ = next(iter(loader))
    with pytest.raises(RuntimeError, match=f"couples the examples of a batch: .*{error}"):
        model(x)


def test_independent_examples_with_dropout_pass_the_check_and_train_as_before(monkeypatch):
    """The check's extra pass forks the random generators: the training run draws the same dropout masks and
    takes the same steps as a run without the check."""
    results = []
    for check in (True, False):
        if not check:
            monkeypatch.setattr(IndependenceCheck, "_after", lambda self, *args: None)
        torch.manual_seed(2)
        model, optimizer, loader = _private(Independent(), "auto", noise_generator=torch.Generator().manual_seed(1))
        torch.manual_seed(4)
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_the_check_runs_once_and_passes_an_independent_token_model():
    model, optimizer, loader = _private(Independent())
    x, _ = next(iter(loader))
    model(x)
    assert _check_of(model).checked
    lookup = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    lookup, _, ids_loader = _private(lookup, data=_token_data(10, 3))
    ids, _ = next(iter(ids_loader))
    lookup(ids)  # token ids: checked from the embedding outputs on, independent: no error
    assert _check_of(lookup).checked


def test_module_validator_lists_layers_that_change_their_state_in_training_ahead_of_time():
    from torch.ao.quantization import MinMaxObserver
    from torch.nn.utils import spectral_norm
    from torch.nn.utils.parametrizations import spectral_norm as parametrized_spectral_norm

    from dptrain import ModuleValidator

    model = nn.Sequential(
        spectral_norm(nn.Linear(4, 4)), parametrized_spectral_norm(nn.Linear(4, 4)), MinMaxObserver(), nn.LazyLinear(2)
    )
    errors = ModuleValidator.validate(model)
    reasons = {e.path: e.reason for e in errors}
    assert set(reasons) == {"0", "1.parametrizations.weight.0", "2", "3"}, reasons
    assert "power-iteration" in reasons["0"] and "observer" in reasons["2"] and "lazy" in reasons["3"]
    assert ModuleValidator.validate(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))) == []
    with pytest.raises(ValueError, match="spectral"):
        _private(nn.Sequential(spectral_norm(nn.Linear(4, 2))))


class TokenMixer(nn.Module):
    """Token ids in, but the hidden states are centred over the batch: coupled after the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids):
        h = self.embed(ids).mean(1)
        return self.head(h - h.mean(0, keepdim=True))


def test_a_token_model_coupling_its_examples_after_the_embedding_is_refused():
    model, _, loader = _private(TokenMixer(), data=_token_data(10, 3))
    ids, _ = next(iter(loader))
    with pytest.raises(RuntimeError, match="couples the examples of a batch"):
        model(ids)


def test_a_first_batch_of_one_example_defers_the_check_to_a_larger_batch():
    model, _, loader = _private(BatchCentred())
    check = _check_of(model)
    x, _ = next(iter(loader))
    model(x[:1])  # nothing to compare with one example
    assert not check.checked
    with pytest.raises(RuntimeError, match="couples the examples of a batch"):
        model(x)


def test_a_hugging_face_gpt2_is_checked_from_its_token_embeddings_and_passes():
    from dptrain.lm import tiny_gpt2

    model = tiny_gpt2(32, n_layer=1, n_embd=16, n_head=2, n_positions=8, seed=0)
    model, _, loader = _private(model, data=_token_data(32, 6, count=8), batch_size=4)
    ids, _ = next(iter(loader))
    model(ids)
    assert _check_of(model).checked  # the check ran (from the wte output; wpe's broadcast leading 1 holds no example)


def test_the_check_reruns_a_few_examples_and_the_whole_batch_when_the_forward_needs_it():
    """A forward that only runs on its batch's size (a state passed in for every example) gets the whole batch."""

    class WithState(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            state = torch.zeros(8, 2)  # needs exactly 8 examples
            return self.lin(x - x.mean(0, keepdim=True)) + state

    seen: list[int] = []
    model, _, loader = _private(WithState())
    model.lin.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    x, _ = next(iter(loader))
    with pytest.raises(RuntimeError, match="couples the examples of a batch"):
        model(x)
    assert seen == [8, 4, 8]  # the user's pass, the sub-batch attempt, the whole batch


def test_an_error_of_the_forward_pass_itself_is_not_masked_by_the_state_check():
    class Failing(Counting):
        def forward(self, x):
            super().forward(x)  # changes the buffer, then fails
            raise ValueError("the user's own error")

    model, _, loader = _private(Failing())
    x, _ = next(iter(loader))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="the user's own error"):
        warnings.simplefilter("error")  # not even a warning about a silenced second error
        model(x)
    model.eval()  # the next pass starts a fresh snapshot: nothing left over from the failed one
    with pytest.raises(ValueError, match="the user's own error"):
        model(x)
