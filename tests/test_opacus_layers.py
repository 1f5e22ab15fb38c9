"""``dptrain.layers``: Opacus' DP layer names are the torch layers, and a model built with them gets exact per-example
clipping (compared with a per-example loop)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain import layers


class CharModel(nn.Module):
    def __init__(self, recurrent: type[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.rnn = recurrent(6, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])


def test_the_layer_names_are_the_torch_layers():
    assert (layers.DPLSTM, layers.DPGRU, layers.DPRNN) == (nn.LSTM, nn.GRU, nn.RNN)
    assert layers.DPMultiheadAttention is nn.MultiheadAttention


@pytest.mark.parametrize("recurrent", [layers.DPLSTM, layers.DPGRU, layers.DPRNN])
def test_a_model_of_dp_layers_is_clipped_per_example_exactly(recurrent):
    torch.manual_seed(0)
    model = CharModel(recurrent)
    ids, labels = torch.randint(0, 12, (6, 4)), torch.randint(0, 3, (6,))
    reference = [p.detach().clone() for p in model.parameters()]
    clip = 0.05  # small: every example is clipped
    grads = []
    for i in range(6):  # the per-example loop
        model.zero_grad()
        nn.functional.cross_entropy(model(ids[i : i + 1]), labels[i : i + 1]).backward()
        g = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum(x.square().sum() for x in g))
        grads.append([x * min(1.0, clip / float(norm)) for x in g])
    expected = [r - sum(g[k] for g in grads) / 6 for k, r in enumerate(reference)]
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(ids, labels), batch_size=6), noise_multiplier=0.0,
            max_grad_norm=clip, poisson_sampling=False,
        )  # fmt: skip
    x, y = next(iter(loader))
    optimizer.zero_grad()
    nn.functional.cross_entropy(private(x), y, reduction="mean").backward()
    optimizer.step()
    for got, want in zip(model.parameters(), expected):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def _loader_and_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    data = DataLoader(TensorDataset(torch.randn(30, 4), torch.randint(0, 2, (30,))), batch_size=10)
    return model, data


@pytest.mark.parametrize("mode, engine", [("hooks", "Fast"), ("ew", "Fast"), ("functorch", "Vmap")])
def test_opacus_grad_sample_modes_map_onto_the_two_engines(mode, engine):
    model, data = _loader_and_model()
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data, noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode=mode, clipping="flat",
    )  # fmt: skip
    assert type(optimizer.grad_sampler).__name__.startswith(engine)


def test_ghost_clipping_takes_and_returns_the_criterion_as_opacus_does():
    model, data = _loader_and_model()
    criterion = nn.CrossEntropyLoss()
    engine = PrivacyEngine()
    private, optimizer, returned, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data, target_epsilon=3.0,
        target_delta=1e-5, epochs=1, max_grad_norm=1.0, grad_sample_mode="ghost", criterion=criterion,
    )  # fmt: skip
    assert returned is criterion
    for x, y in loader:
        optimizer.zero_grad()
        if len(y):
            returned(private(x), y).backward()
        optimizer.step()
    assert optimizer.steps_taken == 3 and 0 < engine.get_epsilon(1e-5) <= 3.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clipping": "per_layer"}, "list of norms"),
        ({"clipping": "automatic"}, "not supported"),
        ({"grad_sample_mode": "ghost"}, "go together"),
        ({"criterion": nn.CrossEntropyLoss()}, "go together"),
        ({"grad_sample_mode": "jacobian"}, "or Opacus'"),
    ],
)
def test_opacus_arguments_dptrain_cannot_honour_are_refused_before_anything_is_attached(kwargs, message):
    model, data = _loader_and_model()
    with pytest.raises(ValueError, match=message):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
            noise_multiplier=1.0, max_grad_norm=1.0, **kwargs,
        )  # fmt: skip
    assert not model._forward_hooks and not model._forward_pre_hooks  # nothing left attached


def test_a_step_hook_sees_every_real_step_with_its_noisy_gradients_and_accounting_still_runs():
    model, data = _loader_and_model()
    engine = PrivacyEngine()
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data, noise_multiplier=1.0,
        max_grad_norm=1.0, max_physical_batch_size=4,
    )  # fmt: skip
    seen = []
    optimizer.attach_step_hook(lambda opt: seen.append([p.grad.clone() for p in model.parameters()]))
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in loader:
        optimizer.zero_grad()
        if len(y):
            nn.functional.cross_entropy(private(x), y).backward()
        optimizer.step()
    assert len(seen) == optimizer.steps_taken == 3  # real steps only, not one per chunk
    assert engine.accountant.steps == 3  # the engine's accounting is not replaced
    # the hook ran before each update: with SGD the total change is -lr times the sum of what it saw
    for k, (p, b) in enumerate(zip(model.parameters(), before)):
        assert torch.allclose(p.detach(), b - 0.1 * sum(g[k] for g in seen), atol=1e-6)
