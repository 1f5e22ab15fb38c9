"""The HTML report: one self-contained page (CSS inline, figures embedded as base64 PNG, no external requests).

A small inline script records on the ``<html>`` element, as ``data-images-loaded="k/n"``, how many of the page's
``n`` images decoded; tests read it from a headless browser's DOM.
"""

from __future__ import annotations

import base64
import math
from datetime import datetime, timezone
from html import escape
from typing import Any

from dptrain.report import plots

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1100px; margin: 0 auto; padding: 24px; background: #ffffff; }
h1 { font-size: 26px; margin: 0 0 4px 0; } h2 { font-size: 20px; margin-top: 34px; border-bottom: 1px solid #ccc; }
h3 { font-size: 17px; margin-top: 26px; }
.meta { color: #555; margin: 0 0 12px 0; }
table { border-collapse: collapse; margin: 10px 0; font-size: 14px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 9px; text-align: right; vertical-align: top; }
th { background: #f0f0f3; }
td:first-child, th:first-child { text-align: left; white-space: nowrap; }
table.summary td { white-space: nowrap; } table.settings td, table.settings th { text-align: left; }
table.settings td:first-child { color: #444; white-space: nowrap; }
img { max-width: 100%; border: 1px solid #e2e2e2; margin: 8px 0; }
.caption { color: #444; font-size: 13.5px; max-width: 900px; }
.statement { background: #f4f8f4; border-left: 4px solid #2b8a3e; padding: 10px 14px; max-width: 950px; }
.statement.nodp { background: #fbf1f1; border-left-color: #b02a2a; }
.banner { background: #fff4d6; border: 1px solid #e0b84b; padding: 10px 14px; font-weight: 600; }
.bad { color: #b02a2a; font-weight: 600; } .ok { color: #2b7a3e; }
footer { margin-top: 40px; color: #666; font-size: 13px; }
code { background: #f2f2f2; padding: 1px 4px; }
"""

SCRIPT = """
(function () {
  function done() {
    var images = document.images, ok = 0;
    for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) ok++; }
    document.documentElement.setAttribute('data-images-loaded', ok + '/' + images.length);
  }
  if (document.readyState === 'complete') { done(); } else { window.addEventListener('load', done); }
})();
"""


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _num(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _verdict(run: dict[str, Any]) -> str:
    audit = run.get("audit")
    if not audit:
        return "-"
    if audit["violates_bound"]:
        return '<span class="bad">SUSPICIOUS</span>'
    if not run["privacy"]["differentially_private"]:
        return '<span class="bad">no guarantee</span>'
    return '<span class="ok">ok</span>'


def _cumulative(ledger: dict[str, Any] | None) -> str:
    """The budget's composed spend after the run, of its cap: every run charged to it so far, not just this one."""
    if not ledger:
        return "-"
    return f"{ledger['spent_epsilon']:.2f} of {ledger['cap_epsilon']:g} ({escape(ledger['budget'])})"


def summary_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for run in runs:
        p, a = run["privacy"], run.get("audit") or {}
        dp = p["differentially_private"]
        rows.append([
            escape(run["name"]),
            "yes" if dp else '<span class="bad">no</span>',
            _num(p["epsilon"], ".2f") if dp else "∞",
            _num(p["target_epsilon"], "g"),
            _num(p["delta"], "g"),
            _cumulative(run.get("ledger")),
            f"{p['steps']}/{p['planned_steps']}",
            _pct(run["results"]["test_accuracy"]),
            _num(a.get("auc")),
            _pct(a.get("tpr_at_fpr", {}).get("0.01")),
            _num(a.get("epsilon_lower_bound"), ".2f"),
            _verdict(run),
            escape(run["status"]),
        ])
    return rows


SUMMARY_HEADER = ["run", "DP", "ε", "target ε", "δ", "budget ε (cumulative)", "steps", "held-out accuracy", "MIA AUC",
                  "MIA TPR @ 1% FPR", "MIA ε lower bound", "verdict", "status"]


def _settings(run: dict[str, Any]) -> list[list[str]]:
    p, d, m, c = run["privacy"], run["dataset"], run["model"], run["config"]
    rows = [
        ("dataset", f"{d['name']}: {d['source']}"),
        ("examples", f"{d['num_train']} training{' (protected)' if p['differentially_private'] else ''}, "
                     f"{d['num_test']} held out (split seed {d.get('split_seed', 0)})"),
        ("preprocessing", d["preprocessing"]),
        ("privacy unit", "one example (add/remove-one neighbouring datasets)" if p["differentially_private"] else "-"),
        ("model", f"{m['architecture']}, {m['parameters']:,} parameters"),
        ("optimizer", f"{m['optimizer']}, learning rate {m['learning_rate']:g}"),
        ("epochs", f"{p['epochs_completed']:g} of {p['epochs_planned']}"),
        ("batch size", f"{c['training']['batch_size']} configured"
                       + (f"; Poisson sampling rate q = {p['sample_rate']:.4g}, expected batch "
                          f"{p['expected_batch_size']:.0f}" if p["sample_rate"] else "; shuffled, no DP")),
        ("steps", f"{p['steps']} of {p['planned_steps']} planned"),
    ]
    if p["differentially_private"]:
        rows += [
            ("noise multiplier σ", f"{p['noise_multiplier']:.4g} (noise std = σ × clipping norm)"),
            ("clipping norm C", f"{p['max_grad_norm']:g} (per-example gradient L2 norm)"),
            ("accountant", f"{p['accountant']} (dp_accounting {run['software'].get('dp-accounting', '?')}), "
                           "Poisson-subsampled Gaussian"),
            ("ε, δ", f"{_num(p['epsilon'], '.4f')} at δ = {p['delta']:g}"
                     + (f" (target {p['target_epsilon']:g})" if p["target_epsilon"] else "")),
            ("randomness", "OS cryptographic generator (secure mode)" if p["secure_mode"]
             else "torch generator, seeded (reproducible; not cryptographically secure)"),
        ]
    ledger = run.get("ledger")
    if ledger:
        rows.append(("ledger", f"budget '{ledger['budget']}' in {ledger['path']}: entry {ledger['entry_id']} "
                               f"({ledger['entry_status']}); budget spent ε {ledger['spent_epsilon']:.3f} of "
                               f"{ledger['cap_epsilon']:g}"))
    rows += [("seed", str(c["seed"])), ("status", run["status"]), ("duration", f"{run['seconds']:.1f} s"),
             ("started", run["started_at"])]
    return [[escape(k), escape(str(v))] for k, v in rows]


def _ledger_section(runs: list[dict[str, Any]]) -> str:
    ledgers = [r["ledger"] for r in runs if r.get("ledger")]
    if not ledgers:
        return ""
    latest = max(ledgers, key=lambda lg: lg["entries"])
    entries = [[str(e["id"]), escape(e["status"]), f"{e['sample_rate']:.4g}", f"{e['noise_multiplier']:.4g}",
                f"{e['steps']}/{e['planned_steps']}", escape(e["created_at"][:19]), escape(e["note"])]
               for e in latest["history"]]
    return (
        "<h2>Privacy budget ledger</h2>"
        f"<p>Budget <b>{escape(latest['budget'])}</b> in <code>{escape(latest['path'])}</code>: spent "
        f"<b>ε = {latest['spent_epsilon']:.3f}</b> of a cap of {latest['cap_epsilon']:g} at δ = {latest['delta']:g} "
        f"(per {escape(latest['privacy_unit'])}), {latest['entries']} "
        f"entr{'y' if latest['entries'] == 1 else 'ies'}, {latest['reserved_entries']} still reserved. The total "
        "composes every entry of the budget in one PLD accountant"
        + (": releasing all these models costs this much together, less than the sum of their epsilons but more "
           "than any one of them.</p>" if latest["entries"] > 1 else ".</p>")
        + table(["entry", "status", "sample rate", "noise σ", "steps / reserved", "created (UTC)", "note"], entries)
    )


def render(title: str, runs: list[dict[str, Any]], cards: list[dict[str, Any]], links: list[dict[str, str]],
           status: str) -> str:
    """The report page for ``runs`` (run.json contents), their privacy ``cards`` and per-run file ``links``."""
    version = runs[0]["software"].get("dptrain", "?") if runs else "?"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">Generated {generated} by dptrain {escape(version)}. Status: {escape(status)}.</p>',
    ]
    if status != "completed":
        parts.append(f'<p class="banner">This run was {escape(status.replace("_", " "))}: the results below are '
                     "partial and describe the steps actually taken.</p>")
    parts += [
        "<h2>Summary</h2>",
        table(SUMMARY_HEADER, summary_rows(runs), "summary"),
        '<p class="caption">ε: privacy loss at δ for the training steps taken (smaller is more private); budget '
        "ε: everything charged to the run's ledger budget up to that run, composed (the runs of one budget add up "
        "there, not in the ε column). Accuracy "
        "is measured on held-out examples. MIA: loss-threshold membership-inference attack, training vs held-out "
        "examples; its ε lower bound is what the attack proves at 95% confidence and must stay below the model's "
        "guarantee (for a fixed train/held-out split that is the replace-one guarantee, 2ε).</p>",
        "<h2>Privacy-utility curve</h2>",
        img(plots.privacy_utility(runs), "held-out accuracy against epsilon"),
        '<p class="caption">Each dot is a final model; thin lines follow a run during training (accuracy against ε '
        "spent so far). The dashed line is the non-private reference, when there is one.</p>",
        "<h2>Privacy spent during training</h2>",
        img(plots.epsilon_vs_step(runs), "epsilon against training step"),
        '<p class="caption">ε after each epoch, composed by the accountant (per-epoch values use a coarser, '
        "pessimistic PLD discretisation; the final value is the exact one). Noise is calibrated so that the last "
        "step lands just below the target.</p>",
        "<h2>Membership-inference audit</h2>",
        img(plots.membership_roc(runs), "membership attack ROC curves with DP bounds"),
        '<p class="caption">Solid: the attack\'s ROC (fraction of training examples it finds against the fraction '
        "of held-out examples it wrongly accuses). Dashed: the most that any attack can achieve against a model "
        "with that guarantee. A curve above its dashed bound beyond sampling error would reveal an implementation "
        "bug; a curve near the diagonal means the attack learns almost nothing. The audit compares losses on the "
        "training examples with held-out ones, without noise: its figures are outside the guarantee, for "
        "reviewers, not for publication ([audit] membership = true turns it on).</p>",
        _ledger_section(runs),
        "<h2>Runs and privacy cards</h2>",
    ]
    for run, card, link in zip(runs, cards, links):
        dp = run["privacy"]["differentially_private"]
        files = " · ".join(f'<a href="{escape(href)}">{escape(label)}</a>' for label, href in link.items())
        parts += [
            f"<h3>{escape(run['name'])}</h3>",
            f'<p class="statement{"" if dp else " nodp"}">{escape(card["statement"])}</p>',
            f"<p>{files}</p>" if files else "",
            table(["setting", "value"], _settings(run), "settings"),
        ]
    software = runs[0]["software"] if runs else {}
    parts += [
        "<footer>Software: " + escape(", ".join(f"{k} {v}" for k, v in software.items())) + ". ",
        "Limitations and the full list of fields are in each run's privacy card.</footer>",
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(p for p in parts if p)
