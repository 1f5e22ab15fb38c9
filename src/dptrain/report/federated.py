"""The privacy card and HTML report of a federated run with client-level DP (``dptrain.federated.DPFedAvg``).

Input is a federated run record (``dptrain.federated.report.federated_run_record``: plain JSON-ready data); the
card follows ``schemas/federated_privacy_card.schema.json``, the page is self-contained like the central report
(``dptrain.report.html``): the statement in words, the settings, epsilon after every round, the canary audit.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from html import escape
from importlib import resources
from typing import Any

from dptrain.report import plots
from dptrain.report.card import FPR_EXAMPLE, max_attack_tpr
from dptrain.report.html import CSS, SCRIPT, img, table

CARD_VERSION = "1.0"
SCHEMA_RESOURCE = ("schemas", "federated_privacy_card.schema.json")
NEIGHBOURS = {"poisson": "add or remove one client", "fixed": "replace one client"}


def federated_card_schema() -> dict[str, Any]:
    path = resources.files("dptrain").joinpath(*SCHEMA_RESOURCE)
    return json.loads(path.read_text(encoding="utf-8"))


def validate_federated_card(card: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``card`` does not match its schema (needs ``jsonschema``)."""
    import jsonschema  # optional (the dev extra): only to validate a card

    jsonschema.validate(card, federated_card_schema(), cls=jsonschema.Draft202012Validator)


def _statement(record: dict[str, Any]) -> str:
    privacy, federation = record["privacy"], record["federation"]
    eps, delta, k = privacy["epsilon"], privacy["delta"], federation["num_clients"]
    factor = math.exp(eps)
    factor_text = f"{factor:,.0f}" if factor >= 100 else f"{factor:.3g}"
    tpr = max_attack_tpr(eps, delta, FPR_EXAMPLE)
    relation = NEIGHBOURS[federation["sampling"]]
    text = (
        f"This model was trained by federated learning across {k:,} clients of '{federation['data']}' with "
        f"client-level differential privacy (DP-FedAvg), epsilon = {eps:.2f} and delta = {delta:.0e} per client: "
        "the protected unit is one client with all of its data. In plain words: the global models, and anything "
        f"computed from them, would have come out almost the same had any one client ({relation}) not taken "
        f"part. That changes the probability of any result of training by at most a factor of e^epsilon = "
        f"{factor_text}, apart from a probability of at most delta = {delta:.0e}. An attacker who sees the models "
        f"and tries to tell whether a given client took part, wrongly accusing at most {FPR_EXAMPLE:.0%} of the "
        f"clients that did not, can identify at most {tpr:.1%} of those that did (guessing identifies "
        f"{FPR_EXAMPLE:.0%})."
    )
    if record["status"] == "budget_exhausted":
        text += (
            f" Training stopped after {privacy['rounds']} of {privacy['planned_rounds']} planned rounds because "
            "the client-level privacy budget was spent."
        )
    return text


def _limitations(record: dict[str, Any]) -> list[str]:
    federation, privacy = record["federation"], record["privacy"]
    items = [
        "Central DP: the server adds the noise, so it sees every sampled client's update before noise ("
        + ("clipped by the client" if federation["clipping"] == "client" else "unclipped: clipping is on the server")
        + "). The guarantee holds against everyone who sees the global models, not against the server.",
        f"With {federation['num_clients']:,} clients, delta = {privacy['delta']:g} must stay well below "
        f"1/K = {1 / federation['num_clients']:.2g} to mean anything; client-level DP is strongest with many "
        "clients.",
        "The guarantee assumes a correct implementation and the recorded settings (the sampling, clipping norm and "
        "noise below). The canary audit, when present, can detect gross errors; it cannot prove the guarantee.",
        "Held-out accuracy is measured on the server without noise: it is not covered by the guarantee.",
        "This card documents a technical guarantee, not by itself a legal determination of anonymity.",
    ]
    if federation["sampling"] == "fixed":
        items.insert(1, "Clients were drawn in fixed numbers without replacement: epsilon is a replace-one bound "
                        "(RDP), not comparable with add/remove epsilons.")  # fmt: skip
    if not privacy["secure_mode"]:
        items.insert(1, "Client sampling and noise came from seeded pseudo-random generators: keep the seed as "
                        "private as the updates (secure_mode=True draws from the OS for a release).")  # fmt: skip
    return items


def build_federated_card(record: dict[str, Any], run_dir: str | None = None) -> dict[str, Any]:
    """The privacy card of a federated run, from its record."""
    privacy, federation = record["privacy"], record["federation"]
    return {
        "card_version": CARD_VERSION,
        "kind": "federated",
        "title": f"Privacy card: {record['name']}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {k: record[k] for k in ("name", "status", "started_at", "finished_at")} | {"run_dir": run_dir},
        "federation": dict(federation),
        "privacy_unit": {"unit": "client", "description": "one client with all of its data"},
        "guarantee": {
            "differentially_private": True,
            "epsilon": privacy["epsilon"],
            "delta": privacy["delta"],
            "neighbouring_relation": NEIGHBOURS[federation["sampling"]],
            "accountant": privacy["accountant"],
            "accountant_library": f"dp_accounting {record['software'].get('dp-accounting', '?')}",
        },
        "mechanism": {
            "algorithm": "DP-FedAvg: client updates clipped to max_norm over all arrays, Gaussian noise of std "
                         "noise_multiplier * max_norm on their sum, divided by the expected number of clients",
            "noise_multiplier": privacy["noise_multiplier"],
            "max_norm": privacy["max_norm"],
            "rounds": privacy["rounds"],
            "planned_rounds": privacy["planned_rounds"],
            "secure_randomness": privacy["secure_mode"],
        },  # fmt: skip
        "epsilon_by_round": list(privacy["epsilon_by_round"]),
        "model": dict(record["model"]),
        "utility": {"test_accuracy": record["results"].get("test_accuracy")},
        "audit": record.get("audit"),
        "ledger": record.get("ledger"),
        "software": dict(record["software"]),
        "statement": _statement(record),
        "limitations": _limitations(record),
    }


def render_federated(record: dict[str, Any], card: dict[str, Any]) -> str:
    """The report page of a federated run."""
    privacy, federation = record["privacy"], record["federation"]
    ledger = record.get("ledger")
    rows = [
        ["clients K", f"{federation['num_clients']:,}"],
        ["client sampling", (f"Poisson, q = {federation['sample_rate']:g}" if federation["sampling"] == "poisson"
                             else f"{federation['clients_per_round']} per round, without replacement")],
        ["clients per round (mean)", f"{federation['mean_clients_per_round']:.1f}"],
        ["clipping", f"C = {privacy['max_norm']:g}, on the {federation['clipping']}"],
        ["noise multiplier", f"{privacy['noise_multiplier']:.4g}"],
        ["rounds", f"{privacy['rounds']} of {privacy['planned_rounds']} planned"],
        ["ε (per client)", f"{privacy['epsilon']:.3f} at δ = {privacy['delta']:g} ({privacy['accountant']})"],
        ["held-out accuracy", "-" if record["results"].get("test_accuracy") is None
                              else f"{record['results']['test_accuracy']:.3f}"],
    ]  # fmt: skip
    if ledger:
        rows.append(["budget", f"{escape(ledger['budget'])}: ε {ledger['spent_epsilon']:.3f} spent of {ledger['cap_epsilon']:.4g}"])
    audit = record.get("audit")
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(card['title'])}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(card['title'])}</h1>",
        f'<p class="meta">Federated run, generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by dptrain '
        f"{escape(record['software'].get('dptrain', '?'))}. Status: {escape(record['status'])}.</p>",
        f'<p class="statement">{escape(card["statement"])}</p>',
        "<h2>Settings</h2>", table(["setting", "value"], rows, "settings"),
        "<h2>Privacy spent, round by round</h2>",
        img(plots.epsilon_vs_round(privacy["epsilon_by_round"], privacy["delta"],
                                   ledger["cap_epsilon"] if ledger else None), "epsilon against round"),
        '<p class="caption">Client-level ε after each round, composed by the accountant over the rounds run.</p>',
    ]  # fmt: skip
    if audit:
        verdict = "bad" if audit["suspicious"] else "ok"
        parts += [
            "<h2>Canary-client audit</h2>",
            f'<p class="{verdict}">{audit["num_correct"]}/{audit["num_guesses"]} correct guesses on '
            f"{audit['num_canaries']} canary clients: empirical ε lower bound "
            f"{audit['empirical_epsilon_lower_bound']:.3f} against the claimed {audit['claimed_epsilon']:.3f}"
            f"{' (EXCEEDS the claim)' if audit['suspicious'] else ''}.</p>",
        ]
    parts += [
        "<h2>Limitations</h2>", "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in card["limitations"]) + "</ul>",
        "<footer>Software: " + escape(", ".join(f"{k} {v}" for k, v in record["software"].items())) + ".</footer>",
        f"<script>{SCRIPT}</script></body></html>",
    ]  # fmt: skip
    return "\n".join(parts)
