"""Privacy cards: built from a real run, valid against the shipped JSON schema, and the schema rejects bad cards."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest

from dptrain.report.card import build_card, card_markdown, card_schema, max_attack_tpr, validate_card
from dptrain.app import (
    AuditConfig,
    DatasetConfig,
    LedgerConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    TrainingConfig,
    run_training,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(DP run summary, non-private run summary): short digits runs, seeded, nothing written but the ledger."""
    ledger = LedgerConfig(str(tmp_path_factory.mktemp("ledger") / "l.db"), "digits", cap=20.0)
    common = dict(
        dataset=DatasetConfig(), model=ModelConfig(hidden=(32,)), training=TrainingConfig(epochs=4, batch_size=700),
        audit=AuditConfig(membership=True),
    )
    dp = run_training(
        RunConfig(name="dp", privacy=PrivacyConfig(delta=1e-5, noise_multiplier=2.0), ledger=ledger, **common),
        write_files=False, handle_signals=False,
    )
    plain = run_training(RunConfig(name="plain", privacy=None, **common), write_files=False, handle_signals=False)
    return dp.summary, plain.summary


def test_schema_is_package_data_and_a_valid_2020_12_schema():
    schema = card_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert {"guarantee", "mechanism", "statement", "software", "audit"} <= set(schema["required"])


def test_dp_card_validates_and_carries_the_run_numbers(runs):
    run, _ = runs
    card = build_card(run, "runs/x")
    validate_card(card)
    g, m, d = card["guarantee"], card["mechanism"], card["dataset"]
    assert g["differentially_private"] and g["epsilon"] == run["privacy"]["epsilon"] and g["delta"] == 1e-5
    assert g["accountant"] == "pld" and g["accountant_library"].startswith("dp_accounting 0.")
    assert g["neighbouring_relation"] == "add or remove one example" and card["privacy_unit"]["unit"] == "example"
    assert m["sampling"] == "poisson" and m["sample_rate"] == pytest.approx(1 / 3)
    assert m["noise_multiplier"] == 2.0 and m["max_grad_norm"] == 1.0 and m["steps"] == 12 and m["epochs"] == 4
    assert (d["name"], d["num_examples"], d["num_train"], d["num_test"]) == ("digits", 1797, 1437, 360)
    assert card["model"]["parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    assert card["audit"]["members"] == 1437 and card["audit"]["nonmembers"] == 360
    assert not card["audit"]["violates_bound"]
    assert card["ledger"]["entry_status"] == "spent" and card["ledger"]["budget"] == "digits"
    assert {"python", "dptrain", "torch", "dp-accounting", "numpy"} <= set(card["software"])
    eps = g["epsilon"]
    statement = card["statement"]
    assert f"epsilon = {eps:.2f}" in statement and "1,437 examples" in statement
    assert f"at most {max_attack_tpr(eps, 1e-5, 0.01):.1%} of the records" in statement
    assert any("GDPR" in item for item in card["limitations"])
    markdown = card_markdown(card)
    assert markdown.startswith("# Privacy card: dp")
    assert f"**epsilon = {eps:.3f}, delta = 1e-05** per example" in markdown
    assert "| noise multiplier | 2 |" in markdown and "## Limitations" in markdown


def test_non_private_card_says_so(runs):
    _, run = runs
    card = build_card(run)
    validate_card(card)
    assert not card["guarantee"]["differentially_private"]
    assert card["guarantee"]["epsilon"] is None and card["mechanism"]["noise_multiplier"] is None
    assert card["audit"]["bound_epsilon"] is None and card["ledger"] is None
    assert "WITHOUT differential privacy" in card["statement"]
    assert "**NOT differentially private**" in card_markdown(card)


def _broken(card, path, value):
    card = copy.deepcopy(card)
    *parents, key = path
    target = card
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return card


@pytest.mark.parametrize(
    "path, value",
    [
        (["statement"], KeyError),
        (["guarantee", "epsilon"], "3"),
        (["guarantee", "epsilon"], None),  # a DP card must state epsilon
        (["guarantee", "delta"], 1.5),
        (["run", "status"], "paused"),
        (["mechanism", "sampling"], KeyError),
        (["mechanism", "steps"], -1),
        (["dataset", "num_train"], 12.5),
        (["model", "colour"], "blue"),  # unknown fields are refused
        (["software", "torch"], KeyError),
        (["limitations"], []),
        (["card_version"], "0.9"),
    ],
)
def test_schema_rejects_broken_cards(runs, path, value):
    card = build_card(runs[0])
    validate_card(card)
    with pytest.raises(jsonschema.ValidationError):
        validate_card(_broken(card, path, value))


def test_non_private_card_cannot_claim_an_epsilon(runs):
    card = build_card(runs[1])
    with pytest.raises(jsonschema.ValidationError):
        validate_card(_broken(card, ["guarantee", "epsilon"], 3.0))


def test_attack_bound_of_the_statement():
    assert max_attack_tpr(3.0, 1e-5, 0.01) == pytest.approx(math.exp(3) * 0.01 + 1e-5)
    assert max_attack_tpr(1.0, 1e-5, 0.01) == pytest.approx(math.e * 0.01 + 1e-5)
    assert max_attack_tpr(8.0, 1e-5, 0.01) == pytest.approx(1 - math.exp(-8) * (1 - 1e-5 - 0.01))  # the second side
    assert max_attack_tpr(math.inf, 1e-5, 0.01) == 1.0


def test_card_records_owner_purpose_declared_ranges_a_keyed_fingerprint_and_the_budget_then_and_now(tmp_path):
    """For a compliance reviewer: who and why ([card]), the data's declared ranges and a fingerprint of the
    training data keyed with a secret of the private run.json (a plain hash would let anyone who knows all records
    but one test guesses of the last), the ledger's absolute location and the budget's total then and now."""
    import hashlib

    from dptrain.app import CardConfig, load_dataset
    from dptrain.app.data import fingerprint
    from dptrain.budget import BudgetLedger
    from dptrain.report import write_report

    ledger_path = tmp_path / "l.db"
    config = RunConfig(
        name="carded", dataset=DatasetConfig(), model=ModelConfig(hidden=(8,)),
        training=TrainingConfig(epochs=1, batch_size=700), privacy=PrivacyConfig(delta=1e-5, noise_multiplier=2.0),
        ledger=LedgerConfig(str(ledger_path), "digits", cap=20.0),
        card=CardConfig(owner="Data Protection Office, St Elsewhere", purpose="triage model, ward 7"),
    )  # fmt: skip
    run_dir = tmp_path / "run"
    result = run_training(config, output_dir=run_dir, handle_signals=False)
    card = json.loads((run_dir / "privacy_card.json").read_text())
    validate_card(card)
    assert card["responsibility"] == {"owner": "Data Protection Office, St Elsewhere", "purpose": "triage model, ward 7"}
    assert card["dataset"]["declared_ranges"] == {"every pixel": [0.0, 16.0]}
    key = bytes.fromhex(result.summary["dataset"]["fingerprint_key"])
    train = load_dataset(config.dataset).train
    assert card["dataset"]["fingerprint"] == fingerprint(train, key)  # the owner, with the key, can check it
    unkeyed = hashlib.sha256(b"".join(t.numpy().tobytes() for t in train.tensors)).hexdigest()
    assert unkeyed not in json.dumps(card) and "fingerprint_key" not in json.dumps(card)  # the key stays private
    ledger = card["ledger"]
    assert Path(ledger["path"]).is_absolute() and Path(ledger["path"]) == ledger_path.resolve()
    assert ledger["budget_spent_epsilon_now"] == pytest.approx(ledger["budget_spent_epsilon"])
    BudgetLedger(ledger_path).spend("digits", 0.5, 1.0, 10, note="a later run")
    write_report(run_dir)  # the card rebuilt later: the budget's total now includes the later spend
    later = json.loads((run_dir / "privacy_card.json").read_text())
    assert later["ledger"]["budget_spent_epsilon_now"] > later["ledger"]["budget_spent_epsilon"]
    markdown = (run_dir / "privacy_card.md").read_text()
    assert "| owner | Data Protection Office, St Elsewhere |" in markdown and "every pixel [0, 16]" in markdown
