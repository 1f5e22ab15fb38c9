"""Privacy cards: what a model's differential-privacy guarantee is, in numbers and in plain language.

A card is built from a run's ``run.json`` (:func:`build_card`) and written as ``privacy_card.json`` (validated by
``dptrain/schemas/privacy_card.schema.json``, :func:`card_schema`) and ``privacy_card.md``. It lists what a data
protection review (GDPR DPIA, HIPAA expert determination) asks about a model trained on personal data: the data
and its size, the privacy unit, epsilon and delta, the accountant and its assumptions (sampling scheme and rate,
noise multiplier, clipping norm, steps), the model, the membership-inference audit, library versions and date, and
a statement of what the guarantee means and does not mean.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from dptrain.audit.roc import dp_tpr_bound
from dptrain.budget import BudgetError, BudgetLedger

CARD_VERSION = "1.0"
SCHEMA_RESOURCE = ("schemas", "privacy_card.schema.json")
FPR_EXAMPLE = 0.01  # the false-positive rate used in the plain-language attack bound


def card_schema() -> dict[str, Any]:
    """The JSON schema of a privacy card (draft 2020-12), shipped as package data."""
    path = resources.files("dptrain").joinpath(*SCHEMA_RESOURCE)
    return json.loads(path.read_text(encoding="utf-8"))


def validate_card(card: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``card`` does not match the schema (needs ``jsonschema``)."""
    import jsonschema  # optional (the dev extra): only to validate a card

    jsonschema.validate(card, card_schema(), cls=jsonschema.Draft202012Validator)


def max_attack_tpr(epsilon: float, delta: float, fpr: float) -> float:
    """The largest true-positive rate any membership test can reach at false-positive rate ``fpr`` under
    (epsilon, delta)-DP (Kairouz, Oh, Viswanath 2015; ``dptrain.audit.roc.dp_tpr_bound``)."""
    return float(dp_tpr_bound(fpr, epsilon, delta))


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _statement(run: dict[str, Any]) -> str:
    privacy, dataset, status = run["privacy"], run["dataset"], run["status"]
    n = _fmt_int(dataset["num_train"])
    if not privacy["differentially_private"]:
        return (
            f"This model was trained WITHOUT differential privacy on {n} examples of '{dataset['name']}'. There is "
            "no bound on what it reveals about any one training example: it may memorise and expose individual "
            "records. It is a reference for comparison only and should not be released or shared as a protected "
            "model."
        )
    eps, delta = privacy["epsilon"], privacy["delta"]
    factor = math.exp(eps)
    factor_text = f"{factor:,.0f}" if factor >= 100 else f"{factor:.3g}"
    tpr = max_attack_tpr(eps, delta, FPR_EXAMPLE)
    text = (
        f"This model was trained with differential privacy on {n} examples of '{dataset['name']}', with "
        f"epsilon = {eps:.2f} and delta = {delta:.0e}, per example (one row of the training data). In plain "
        "words: the model, and anything computed from it, would have come out almost the same whether or not any "
        "single example had been used. Adding or removing one example changes the probability of any result of "
        f"training by at most a factor of e^epsilon = {factor_text}, apart from a probability of at most "
        f"delta = {delta:.0e} that this fails. For instance, an attacker trying to tell whether a given record was "
        "used, "
        f"who may wrongly accuse at most {FPR_EXAMPLE:.0%} of records that were not used, can correctly identify at "
        f"most {tpr:.1%} of the records that were (guessing identifies {FPR_EXAMPLE:.0%})."
    )
    if tpr >= 0.5:
        text += (
            f" At epsilon = {eps:.2f} that worst-case bound is weak; the guarantee still limits what can be "
            "learned about any one example, but less strongly than at a smaller epsilon."
        )
    text += (
        " The guarantee holds whatever else an attacker knows, and it covers the final model and every "
        "intermediate model of the training run. It does not hide patterns that many examples share (that is what "
        "the model is meant to learn), and it protects a person who contributed several examples less: roughly "
        "epsilon times the number of their examples."
    )
    if status == "interrupted":
        text += (
            f" Training was interrupted after {privacy['steps']} of {privacy['planned_steps']} planned steps; the "
            "numbers above are for the steps actually taken."
        )
    elif status == "budget_exhausted":
        text += (
            f" Training stopped after {privacy['steps']} of {privacy['planned_steps']} planned steps because the "
            "privacy budget was spent."
        )
    return text


def _limitations(run: dict[str, Any]) -> list[str]:
    privacy, dataset = run["privacy"], run["dataset"]
    items = []
    if privacy.get("weak_delta"):
        items.append(
            f"WEAK DELTA: delta = {privacy['delta']:g} is at least 1/N for the {dataset['num_train']} training examples "
            "(allowed by allow_weak_delta): a mechanism that publishes one random example in full satisfies this "
            "delta, so the (epsilon, delta) statement protects little on its own."
        )
    if privacy["differentially_private"]:
        items.append(
            "The privacy unit is one example (one row). If a person can appear in several rows, their protection is "
            "weaker (group privacy: about k x epsilon for k rows); use a user-level budget in that case."
        )
        items.append(
            "The guarantee assumes that the implementation is correct and that training used exactly the recorded "
            "settings (Poisson sampling at the stated rate, clipping, noise). The membership-inference audit "
            "can detect gross implementation errors; it cannot prove the guarantee."
        )
        if not privacy.get("secure_mode"):
            items.append(
                "Sampling and noise came from torch's pseudo-random generator seeded with the run's seed "
                "(reproducible, not cryptographically secure): anyone who has the seed (run.json, report.html) or "
                "the generator's state (checkpoint.pt) can regenerate the noise and remove it, so keep those files "
                "as private as the data and share model.pt and this card only. For a production release set "
                "secure_mode = true."
            )
        items.append(
            "Choices made by looking at the same data outside this run (e.g. hyperparameter tuning, feature "
            "selection) are not covered unless they were charged to the privacy ledger."
        )
    items.append(
        f"The {dataset['num_test']} held-out examples were used, without noise, to measure accuracy and loss and "
        "as non-members in the audit: those metrics are not covered by the guarantee."
    )
    if run.get("audit") is not None:
        items.append(
            "The membership audit on this card ([audit] membership = true) is computed from the training data "
            "without noise, outside the guarantee: share it with reviewers, not publicly."
        )
    items.append(
        "This card documents a technical guarantee. It is not by itself a determination that the model is "
        "anonymous under the GDPR or de-identified under HIPAA; that assessment also depends on the context of "
        "release."
    )
    return items


def _audit_section(audit: dict[str, Any] | None) -> dict[str, Any] | None:
    if audit is None:
        return None
    tprs = audit["tpr_at_fpr"]
    return {
        "attack": audit["attack"],
        "covered_by_the_guarantee": False,
        "description": "loss-threshold membership inference (Yeom et al. 2018): training examples (members) vs "
        "held-out examples (non-members), guessing 'member' when the model's loss is low. Members and non-members "
        "form a fixed split, so the attack is compared with the replace-one guarantee (2 epsilon, (1 + e^epsilon) "
        "delta): bound_epsilon, bound_delta. empirical_epsilon_lower_bound is the epsilon the attack proves at the "
        "given confidence; it must not exceed bound_epsilon",
        "members": audit["num_members"],
        "nonmembers": audit["num_nonmembers"],
        "auc": audit["auc"],
        "tpr_at_fpr_0_1_percent": tprs.get("0.001"),
        "tpr_at_fpr_1_percent": tprs.get("0.01"),
        "empirical_epsilon_lower_bound": audit["epsilon_lower_bound"],
        "bound_epsilon": audit["bound_epsilon"],
        "bound_delta": audit["bound_delta"],
        "confidence": 1.0 - audit["significance"],
        "violates_bound": audit["violates_bound"],
        "verdict": "SUSPICIOUS: the model leaks more than its epsilon allows (probable implementation bug)"
        if audit["violates_bound"]
        else "consistent with the claimed guarantee",
    }


def _budget_now(ledger: dict[str, Any]) -> dict[str, Any]:
    """The budget's composed spend as the ledger holds it when the card is written (later runs included), or None
    with the reason when the ledger cannot be read from here."""
    try:
        spent, note = BudgetLedger(ledger["path"], create=False).spent(ledger["budget"]), None
    except BudgetError as e:
        spent, note = None, str(e)
    return {"budget_spent_epsilon_now": spent, "budget_checked_at": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "budget_unreadable": note}


def build_card(run: dict[str, Any], run_dir: str | None = None) -> dict[str, Any]:
    """The privacy card of a run, from its ``run.json`` content."""
    privacy, dataset, model = run["privacy"], run["dataset"], run["model"]
    dp = bool(privacy["differentially_private"])
    optimizer = model["optimizer"]
    ledger = run.get("ledger")
    return {
        "card_version": CARD_VERSION,
        "title": f"Privacy card: {run['name']}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {
            "name": run["name"],
            "status": run["status"],
            "started_at": run["started_at"],
            "finished_at": run["finished_at"],
            "run_dir": run_dir,
        },
        "dataset": {
            "name": dataset["name"],
            "source": dataset["source"],
            "num_examples": dataset["num_examples"],
            "num_train": dataset["num_train"],
            "num_test": dataset["num_test"],
            "num_features": dataset["num_features"],
            "num_classes": dataset["num_classes"],
            "preprocessing": dataset["preprocessing"],
            "declared_ranges": dataset.get("declared_ranges"),
            "fingerprint": dataset.get("fingerprint"),
        },
        "responsibility": {
            "owner": (run["config"].get("card") or {}).get("owner"),
            "purpose": (run["config"].get("card") or {}).get("purpose"),
        },
        "privacy_unit": {
            "unit": privacy["privacy_unit"],
            "description": "one example: one row of the training data",
        },
        "guarantee": {
            "differentially_private": dp,
            "epsilon": privacy["epsilon"] if dp else None,
            "delta": privacy["delta"] if dp else None,
            "weak_delta": bool(privacy.get("weak_delta")),
            "target_epsilon": privacy["target_epsilon"],
            "neighbouring_relation": privacy["neighbouring_relation"],
            "accountant": privacy["accountant"],
            "accountant_library": f"dp_accounting {run['software'].get('dp-accounting', '?')}" if dp else None,
        },
        "mechanism": {
            "algorithm": (f"DP-SGD with {optimizer} updates (per-example clipping, Gaussian noise)" if dp
                          else f"{optimizer}, non-private"),
            "sampling": privacy["sampling"],
            "sample_rate": privacy["sample_rate"],
            "expected_batch_size": privacy["expected_batch_size"],
            "noise_multiplier": privacy["noise_multiplier"],
            "max_grad_norm": privacy["max_grad_norm"],
            "steps": privacy["steps"],
            "planned_steps": privacy["planned_steps"],
            "epochs": privacy["epochs_completed"],
            "planned_epochs": privacy["epochs_planned"],
            "secure_randomness": bool(privacy.get("secure_mode")),
        },
        "model": {
            "architecture": model["architecture"],
            "parameters": model["parameters"],
            "optimizer": optimizer,
            "learning_rate": model["learning_rate"],
        },
        "utility": {
            "test_accuracy": run["results"]["test_accuracy"],
            "test_loss": run["results"]["test_loss"],
        },
        "audit": _audit_section(run.get("audit")),
        "ledger": None if not ledger else {
            "path": ledger["path"],
            "budget": ledger["budget"],
            "cap_epsilon": ledger["cap_epsilon"],
            "delta": ledger["delta"],
            "entry_id": ledger["entry_id"],
            "entry_status": ledger["entry_status"],
            "budget_spent_epsilon": ledger["spent_epsilon"],
            **_budget_now(ledger),
            "entries": ledger["entries"],
        },
        "software": {k: v for k, v in run["software"].items()},
        "statement": _statement(run),
        "limitations": _limitations(run),
    }


def _ranges(ranges: dict[str, list[float]] | None) -> str | None:
    if not ranges:
        return None
    return ", ".join(f"{name} [{low:g}, {high:g}]" for name, (low, high) in ranges.items())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown, for people: statement first, then every field."""
    g, m, d = card["guarantee"], card["mechanism"], card["dataset"]
    lines = [f"# {card['title']}", ""]
    if card["run"]["status"] != "completed":
        lines += [f"**Status: {card['run']['status'].upper()}** (partial run)", ""]
    headline = (
        f"**epsilon = {g['epsilon']:.3f}, delta = {g['delta']:.0e}** per {card['privacy_unit']['unit']}"
        if g["differentially_private"] else "**NOT differentially private**"
    )
    lines += [headline, "", "## What this means", "", card["statement"], ""]
    sections = [
        ("Data", [("dataset", d["name"]), ("source", d["source"]), ("examples", d["num_examples"]),
                  ("training examples (protected)", d["num_train"]), ("held-out examples", d["num_test"]),
                  ("features", d["num_features"]), ("classes", d["num_classes"]),
                  ("preprocessing", d["preprocessing"]),
                  ("declared feature ranges", _ranges(d["declared_ranges"])),
                  ("fingerprint (keyed: the key is in the run's private run.json)", d["fingerprint"]),
                  ("privacy unit", card["privacy_unit"]["description"])]),
        ("Responsibility", [("owner", card["responsibility"]["owner"] or "not given ([card] owner)"),
                            ("purpose", card["responsibility"]["purpose"] or "not given ([card] purpose)")]),
        ("Guarantee", [("differentially private", g["differentially_private"]), ("epsilon", g["epsilon"]),
                       ("delta", g["delta"]), ("weak delta (>= 1/N)", g["weak_delta"]),
                       ("target epsilon", g["target_epsilon"]),
                       ("neighbouring datasets", g["neighbouring_relation"]), ("accountant", g["accountant"]),
                       ("accounting library", g["accountant_library"])]),
        ("Mechanism", [(k.replace("_", " "), v) for k, v in m.items()]),
        ("Model", [(k.replace("_", " "), v) for k, v in card["model"].items()]
         + [("test accuracy", card["utility"]["test_accuracy"]), ("test loss", card["utility"]["test_loss"])]),
    ]
    if card["audit"]:
        labels = {"tpr_at_fpr_0_1_percent": "TPR at 0.1% FPR", "tpr_at_fpr_1_percent": "TPR at 1% FPR",
                  "auc": "AUC", "bound_epsilon": "bound epsilon (replace-one)", "bound_delta": "bound delta"}
        sections.append(("Membership-inference audit",
                         [(labels.get(k, k.replace("_", " ")), v) for k, v in card["audit"].items()]))
    if card["ledger"]:
        sections.append(("Privacy budget ledger", [(k.replace("_", " "), v) for k, v in card["ledger"].items()]))
    sections.append(("Software", list(card["software"].items())))
    sections.append(("Run", [(k.replace("_", " "), v) for k, v in card["run"].items()]
                     + [("card created", card["created_at"]), ("card version", card["card_version"])]))
    for title, rows in sections:
        lines += [f"## {title}", "", "| field | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
        lines.append("")
    lines += ["## Limitations", ""] + [f"- {item}" for item in card["limitations"]] + [""]
    return "\n".join(lines)
