"""report.html: self-contained, rendered by headless Chromium with every image loaded and plots visible;
``dptrain report`` rebuilds it.

Chromium is Debian's ``chromium`` package; ``.ci/run`` installs it when missing.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dptrain.cli import main
from dptrain.report import write_report
from dptrain.app import (
    DatasetConfig,
    LedgerConfig,
    PrivacyConfig,
    RunConfig,
    TrainingConfig,
    run_training,
    write_suite,
)

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]
C0_BLUE, NONPRIVATE_RED = (31, 119, 180), (214, 39, 40)  # matplotlib's first colour; the non-private run's


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A suite directory with a non-private and a DP run of the digits MLP (short, seeded), like the demo's."""
    root = tmp_path_factory.mktemp("suite")
    common = dict(dataset=DatasetConfig(), training=TrainingConfig(epochs=6, batch_size=700))
    run_training(RunConfig(name="non-private", privacy=None, **common), output_dir=root / "nonprivate",
                 handle_signals=False)
    run_training(
        RunConfig(name="eps-test", privacy=PrivacyConfig(delta=1e-5, noise_multiplier=3.0),
                  ledger=LedgerConfig(str(root / "privacy.db"), "digits", cap=10.0), **common),
        output_dir=root / "dp", handle_signals=False,
    )
    write_suite(root, "test suite", ["nonprivate", "dp"], {"status": "completed"})
    return root


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "the report test needs Debian's chromium: apt-get install -y chromium (.ci/run installs it)"
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120,
        check=True,
    )


def test_report_renders_in_headless_chromium_with_all_images_loaded(suite, tmp_path):
    from PIL import Image

    page = (suite / "report.html").resolve().as_uri()
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", page, profile=tmp_path / "p1").stdout
    assert re.search(r'data-images-loaded="3/3"', dom), dom[:500]

    screenshot = tmp_path / "report.png"
    _chromium(f"--screenshot={screenshot}", "--window-size=1200,3000", page, profile=tmp_path / "p2")
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(int)
    assert pixels.shape == (3000, 1200, 3)
    assert (pixels.min(axis=2) < 235).mean() > 0.04, "the page looks blank"
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    assert len(np.unique(packed)) > 500  # anti-aliased plots, not flat text

    def count_near(colour, tolerance=40):
        return int((np.abs(pixels - np.array(colour)).max(axis=2) <= tolerance).sum())

    # The plot lines themselves: the DP run's blue and the non-private run's red appear only inside the images.
    assert count_near(C0_BLUE) > 1000
    assert count_near(NONPRIVATE_RED) > 300


def test_report_is_self_contained_and_shows_settings_and_cards(suite):
    page = (suite / "report.html").read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    dp = json.loads((suite / "dp" / "run.json").read_text())
    card = json.loads((suite / "dp" / "privacy_card.json").read_text())
    assert card["statement"].replace("'", "&#x27;") in page
    assert "WITHOUT differential privacy" in page
    assert f"{dp['privacy']['epsilon']:.4f} at δ = 1e-05" in page and "3 (noise std = σ × clipping norm)" in page
    assert "Poisson sampling rate q = 0.3333, expected batch 479" in page
    assert 'href="dp/privacy_card.md"' in page and "Privacy budget ledger" in page
    # the summary's cumulative column: the budget's total after the run (every run charged to it so far)
    assert "<th>budget ε (cumulative)</th>" in page
    assert f"<td>{dp['ledger']['spent_epsilon']:.2f} of 10 (digits)</td>" in page
    # each run directory has its own report too
    own = (suite / "dp" / "report.html").read_text()
    assert own.count("data:image/png;base64,") == 3 and "dptrain run report: eps-test" in own


def test_dptrain_report_rebuilds_a_suite_and_a_run(suite, capsys):
    for path in (suite / "report.html", suite / "dp" / "report.html", suite / "dp" / "privacy_card.json",
                 suite / "nonprivate" / "privacy_card.md"):
        path.unlink()
    assert main(["report", str(suite), "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["report"] == str(suite / "report.html") and len(written["runs"]) == 2
    for path in (suite / "report.html", suite / "dp" / "report.html", suite / "dp" / "privacy_card.json",
                 suite / "nonprivate" / "privacy_card.md"):
        assert path.is_file()
    assert main(["report", str(suite / "dp")]) == 0
    out = capsys.readouterr().out
    assert f"report: {suite / 'dp' / 'report.html'}" in out and "privacy card:" in out
    assert write_report(suite / "dp")["kind"] == "run"


def test_dptrain_report_on_a_directory_without_a_run_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no run.json or suite.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
