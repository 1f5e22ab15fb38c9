"""Reports of training runs: ``report.html`` (self-contained, figures embedded) and the privacy card.

Everything is derived from the run directory's ``run.json`` (written by :func:`dptrain.app.run_training`; file names and formats: :mod:`dptrain.rundir`), so
``dptrain report RUN_DIR`` can rebuild it at any time. A directory with a ``suite.json`` (the demo's) groups several
run directories into one report.

- :func:`write_run_report` (``RUN_DIR/report.html``, ``privacy_card.json``, ``privacy_card.md``),
- :func:`write_suite_report` (``DIR/report.html`` over the suite's runs),
- :func:`write_report` (either, by what the directory holds; the suite's runs are rebuilt too).

Modules: ``card`` (privacy card and its JSON schema), ``plots`` (matplotlib figures), ``html`` (the page),
``console`` (live progress and summary tables in the terminal, with rich).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dptrain.report import html
from dptrain.report.card import build_card, card_markdown
from dptrain.rundir import CARD_JSON, CARD_MD, REPORT_FILE, RUN_FILE, RUN_FORMAT, SUITE_FILE, SUITE_FORMAT, write_json, write_text


class ReportError(ValueError):
    """The directory holds no run (``run.json``) or suite (``suite.json``), or a file is unreadable."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"no {path.name} in {path.parent}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not valid JSON: {e}") from None


def load_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of ``RUN_DIR/run.json``."""
    run = _read_json(Path(run_dir) / RUN_FILE)
    if run.get("format") != RUN_FORMAT:
        raise ReportError(f"{Path(run_dir) / RUN_FILE} is not a dptrain run record (format {run.get('format')!r})")
    return run


def write_run_report(run_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``report.html``, ``privacy_card.json`` and ``privacy_card.md`` of one run; returns their paths."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    card = build_card(run, str(run_dir))
    write_json(run_dir / CARD_JSON, card)
    write_text(run_dir / CARD_MD, card_markdown(card))
    links = {
        "privacy card (Markdown)": CARD_MD, "privacy card (JSON)": CARD_JSON, "metrics (JSON lines)": "metrics.jsonl"
    }
    page = html.render(f"dptrain run report: {run['name']}", [run], [card], [links], run["status"])
    write_text(run_dir / REPORT_FILE, page)
    return {"report": run_dir / REPORT_FILE, "card_json": run_dir / CARD_JSON, "card_md": run_dir / CARD_MD}


def write_suite_report(directory: str | os.PathLike[str]) -> Path:
    """Write ``DIRECTORY/report.html`` over the runs listed in ``DIRECTORY/suite.json``; returns its path."""
    directory = Path(directory)
    suite = _read_json(directory / SUITE_FILE)
    if suite.get("format") != SUITE_FORMAT:
        raise ReportError(f"{directory / SUITE_FILE} is not a dptrain suite record")
    runs = [load_run(directory / name) for name in suite["runs"]]
    cards = [build_card(run, str(directory / name)) for run, name in zip(runs, suite["runs"])]
    links = [{"run report": f"{name}/{REPORT_FILE}", "privacy card (Markdown)": f"{name}/{CARD_MD}",
              "privacy card (JSON)": f"{name}/{CARD_JSON}"} for name in suite["runs"]]
    page = html.render(suite["title"], runs, cards, links, suite.get("status", "completed"))
    write_text(directory / REPORT_FILE, page)
    return directory / REPORT_FILE


def write_report(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Rebuild the report of a run directory, or of a suite directory and each of its runs."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory")
    if (directory / RUN_FILE).exists():
        return {"kind": "run", **write_run_report(directory)}
    if (directory / SUITE_FILE).exists():
        suite = _read_json(directory / SUITE_FILE)
        runs = [write_run_report(directory / name) for name in suite.get("runs", [])]
        return {"kind": "suite", "report": write_suite_report(directory), "runs": runs}
    raise ReportError(f"{directory} holds no run.json or suite.json: pass a directory written by dptrain train or "
                      "dptrain demo")


__all__ = ["ReportError", "load_run", "write_report", "write_run_report", "write_suite_report"]
