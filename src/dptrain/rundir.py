"""The files of a run directory and how they are written: names, format tags, atomic writes, JSON numbers.

A run directory (``dptrain train``, each model of the demo) holds ``run.json`` (the record everything else is
derived from), ``metrics.jsonl``, ``model.pt`` (the release), ``checkpoint.pt`` (for resuming), the report and the
privacy card; a suite directory (the demo's) holds ``suite.json`` listing its runs. The trainer that writes these
files and the reports that read them share the names and format tags here. Every file is written atomically (a
temporary file renamed over it), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RUN_FORMAT, SUITE_FORMAT, MODEL_FORMAT = "dptrain-run/1", "dptrain-suite/1", "dptrain-model/1"
RUN_FILE, SUITE_FILE, METRICS_FILE = "run.json", "suite.json", "metrics.jsonl"
MODEL_FILE, CHECKPOINT_FILE = "model.pt", "checkpoint.pt"
REPORT_FILE, CARD_JSON, CARD_MD = "report.html", "privacy_card.json", "privacy_card.md"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` next to ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (no NaN or infinity: use :func:`json_number`), atomically."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def json_number(value: float | None) -> float | None:
    """``value`` for JSON: None for None, infinity and NaN (an epsilon without DP is infinite)."""
    return None if value is None or not math.isfinite(value) else float(value)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    """Python, the platform and the installed versions of the libraries a run depends on."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("dptrain", "torch", "dp-accounting", "numpy", "scipy", "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
