"""Issue #2: make_private does not wrap the user's model. It returns the same object; state_dict keys, save/load,
train()/eval() keep working; frozen parameters are never touched."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 12)
        self.body = nn.Sequential(nn.LayerNorm(12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 12))
        self.head = nn.Linear(12, 3)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)) * self.scale)


def _loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=batch_size)


def _make_private(model: nn.Module, optimizer: torch.optim.Optimizer, **kw):
    engine = PrivacyEngine()
    out = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=_loader(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(0),
        **kw,
    )
    return engine, *out


def _train(model, optimizer, loader, epochs: int = 2) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()


def test_make_private_returns_same_module_with_same_keys() -> None:
    torch.manual_seed(0)
    model = Classifier()
    keys = list(model.state_dict().keys())
    values = {k: v.clone() for k, v in model.state_dict().items()}
    _, private, _, _ = _make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert private is model
    assert type(private) is Classifier
    assert list(private.state_dict().keys()) == keys
    assert not any(k.startswith("_module") for k in private.state_dict())
    for k, v in private.state_dict().items():
        assert torch.equal(v, values[k])
    # The parameters are the very same tensors (the optimizer the user built still points at them).
    assert [id(p) for p in private.parameters()] == [id(p) for p in model.parameters()]


def test_save_load_into_fresh_non_private_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = Classifier()
    _, model, opt, loader = _make_private(model, torch.optim.Adam(model.parameters(), lr=0.01))
    _train(model, opt, loader)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)

    fresh = Classifier()
    fresh.load_state_dict(torch.load(path))  # strict: any renamed or extra key would fail here
    model.eval()
    fresh.eval()
    x = torch.randn(10, 6)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    # The optimizer state saves and loads too.
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    plain = torch.optim.Adam(fresh.parameters(), lr=0.01)
    plain.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert plain.state_dict()["param_groups"][0]["lr"] == 0.01


def test_train_eval_modes_still_work() -> None:
    torch.manual_seed(0)
    model = Classifier()
    _, model, opt, loader = _make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.eval()
    assert not model.training and not model.body[2].training
    x = torch.randn(5, 6)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)  # dropout off in eval
    model.train()
    assert model.training and model.body[2].training
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout on in train
    _train(model, opt, loader, epochs=1)
    # Evaluation forward passes with gradients enabled between steps do not disturb training.
    model.eval()
    _ = model(x).sum()
    _train(model, opt, loader, epochs=1)
    assert opt.steps_taken == 2 * len(loader)


def test_frozen_parameters_untouched() -> None:
    torch.manual_seed(0)
    model = Classifier()
    model.embed.requires_grad_(False)
    model.body[0].weight.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(frozen) == {"embed.weight", "embed.bias", "body.0.weight"}
    # Momentum and weight decay would move a frozen parameter if it were handed any gradient (even zero).
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    _, model, opt, loader = _make_private(model, opt)
    _train(model, opt, loader, epochs=2)
    assert opt.steps_taken == 8
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
            assert not p.requires_grad
        else:
            assert not torch.equal(p, trainable[n]), n
    assert {id(p) for p in opt.params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_deepcopy_of_private_model_for_evaluation() -> None:
    # A common pattern: keep a copy of the best model. The copy computes the same outputs.
    torch.manual_seed(0)
    model = Classifier()
    _, model, opt, loader = _make_private(model, torch.optim.SGD(model.parameters(), lr=0.1))
    _train(model, opt, loader, epochs=1)
    best = copy.deepcopy(model).eval()
    model.eval()
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(best(x), model(x))
