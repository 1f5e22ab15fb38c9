"""PrivacyEngine charging a BudgetLedger: refuse before training, stop at the last step that fits, settle."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import BudgetExhausted, PrivacyEngine
from dptrain.budget import BudgetExceededError, BudgetLedger

DELTA = 1e-5


def _setup(examples: int = 50, batch_size: int = 10):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(examples, 4), torch.randint(0, 2, (examples,)))
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=batch_size)


def _budget_of_three(tmp_path):
    """A ledger with budget "patients" of epsilon 3, an engine charging it, and a fresh (model, optimizer, loader)."""
    ledger = BudgetLedger(tmp_path / "privacy.db")
    ledger.create("patients", epsilon=3.0, delta=DELTA)
    return ledger, PrivacyEngine(ledger=ledger, budget="patients"), _setup()


def _train(model, optimizer, loader, epochs: int) -> None:
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


def test_a_run_that_does_not_fit_is_refused_before_any_step(tmp_path):
    ledger = BudgetLedger(tmp_path / "privacy.db")
    ledger.create("patients", epsilon=1.0, delta=DELTA)
    model, optimizer, loader = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    engine = PrivacyEngine(ledger=ledger, budget="patients")
    with pytest.raises(BudgetExceededError, match="cap"):
        engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=loader,
            target_epsilon=2.0, target_delta=DELTA, epochs=3, max_grad_norm=1.0,
        )
    assert ledger.history("patients") == []
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    # Nothing was attached: the model can still be made private within the budget.
    PrivacyEngine(ledger=ledger, budget="patients").make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader,
        target_epsilon=0.9, target_delta=DELTA, epochs=3, max_grad_norm=1.0,
    )
    assert len(ledger.history("patients")) == 1


def test_training_stops_at_the_exact_last_step_that_fits(tmp_path):
    ledger = BudgetLedger(tmp_path / "privacy.db")
    ledger.create("patients", epsilon=2.0, delta=DELTA)
    ledger.spend("patients", sample_rate=0.2, noise_multiplier=2.0, steps=5, note="an earlier run")
    exhausted = []
    model, optimizer, loader = _setup()
    with PrivacyEngine(ledger=ledger, budget="patients", on_budget_exhausted=exhausted.append) as engine:
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=2.0, max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(0),
        )
        allowance = optimizer.step_allowance
        assert allowance > 0
        with pytest.raises(BudgetExhausted, match="patients"):
            _train(model, optimizer, loader, epochs=1000)
        assert optimizer.steps_taken == allowance
        assert exhausted == [engine]
    entries = ledger.history("patients")
    assert [e.status for e in entries] == ["spent", "spent"]
    assert entries[-1].steps == allowance
    assert ledger.spent("patients") <= 2.0
    # One more step of the same kind would take the budget over its cap.
    assert ledger.max_steps("patients", 0.2, 2.0) == 0
    with pytest.raises(BudgetExceededError):
        ledger.spend("patients", sample_rate=0.2, noise_multiplier=2.0, steps=1)


def test_reservation_is_settled_to_the_steps_actually_taken(tmp_path):
    ledger, engine, (model, optimizer, loader) = _budget_of_three(tmp_path)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader,
        target_epsilon=2.0, target_delta=DELTA, epochs=10, max_grad_norm=1.0,
    )
    (reservation,) = ledger.history("patients")
    assert reservation.status == "reserved" and reservation.steps == 10 * len(loader)
    reserved_spent = ledger.spent("patients")
    _train(model, optimizer, loader, epochs=2)
    engine.close()
    engine.close()  # idempotent
    (entry,) = ledger.history("patients")
    assert entry.status == "spent" and entry.steps == optimizer.steps_taken == 2 * len(loader)
    assert ledger.spent("patients") < reserved_spent
    assert ledger.spent("patients") == pytest.approx(engine.get_epsilon(DELTA), rel=2e-2)


def test_planned_steps_cannot_be_overrun(tmp_path):
    ledger, engine, (model, optimizer, loader) = _budget_of_three(tmp_path)
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader,
        target_epsilon=1.0, target_delta=DELTA, epochs=2, max_grad_norm=1.0,
    )
    with pytest.raises(BudgetExhausted):
        _train(model, optimizer, loader, epochs=3)
    assert optimizer.steps_taken == 2 * len(loader)


def test_ledger_needs_a_budget_name(tmp_path):
    ledger = BudgetLedger(tmp_path / "privacy.db")
    with pytest.raises(ValueError, match="budget"):
        PrivacyEngine(ledger=ledger)
    with pytest.raises(ValueError, match="unknown|no budget|not found"):
        PrivacyEngine(ledger=ledger, budget="nobody")


def test_readme_training_example_stops_within_the_budget(tmp_path, monkeypatch, capsys):
    import re

    from readme import readme_section

    section = readme_section("Privacy budgets")
    code = re.search(r"```python\n(.*?)```", section[section.index("**Training against a budget.**") :], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "is spent" in out
    assert BudgetLedger(tmp_path / "clinic.db").spent("visits") <= 2.0


def test_no_step_after_close_goes_uncharged(tmp_path):
    """close() settles the reservation to the steps taken; a later step would be charged to nobody, so it is
    refused."""
    ledger, engine, (model, optimizer, loader) = _budget_of_three(tmp_path)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=4.0, max_grad_norm=1.0
    )
    with engine:
        _train(model, optimizer, loader, epochs=1)
    taken = optimizer.steps_taken
    with pytest.raises(BudgetExhausted):
        _train(model, optimizer, loader, epochs=1)
    assert optimizer.steps_taken == taken
    (entry,) = ledger.history("patients")
    assert entry.status == "spent" and entry.steps == taken


def test_lowering_the_noise_multiplier_under_a_budget_is_refused(tmp_path):
    """The ledger reserved the run at its noise multiplier; a step at a smaller one would cost more than charged."""
    ledger, engine, (model, optimizer, loader) = _budget_of_three(tmp_path)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=4.0, max_grad_norm=1.0
    )
    _train(model, optimizer, loader, epochs=1)
    optimizer.noise_multiplier = 2.0
    with pytest.raises(ValueError, match="noise_multiplier was changed"):
        _train(model, optimizer, loader, epochs=1)
    assert optimizer.steps_taken == len(loader)
