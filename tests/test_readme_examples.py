"""README is a contract: every code block is run by a test as written (here, or by the test named beside it), or
is marked ``# excerpt``; shown outputs are compared where they do not depend on the run."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _blocks() -> list[tuple[str, str, str]]:
    """(heading the block is under, language, text) of every fenced block."""
    blocks, heading, fence, language, lines = [], "", False, "", []
    for line in README.splitlines():
        if line.startswith("```"):
            if fence:
                blocks.append((heading, language, "\n".join(lines) + "\n"))
            fence, language, lines = not fence, line[3:].strip(), []
        elif fence:
            lines.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


BLOCKS = _blocks()

#: Blocks run by a test, by (heading, ordinal among that heading's blocks): where.
TESTED = {
    ("Quick start", 0): "test_quick_start_trains_to_its_epsilon",
    ("Accounting: `dptrain.accounting`", 0): "test_accounting_example_prints_its_comments",
    ("Privacy budgets", 0): "tests/test_budget.py::test_readme_section_example_runs_and_prints_what_it_shows",
    ("Privacy budgets", 1): "(its shown output, compared by the same test)",
    ("Privacy budgets", 2): "tests/test_cli.py::test_readme_section_commands_run_and_print_what_they_show",
    ("Privacy budgets", 3): "tests/test_engine_budget.py::test_readme_training_example_stops_within_the_budget",
    ("From Python, alongside your own training run", 0): "tests/test_audit_readme.py::test_example_runs_and_prints_what_it_shows",
    ("White-box audit: gradient canaries", 0): "tests/test_audit_readme.py::test_example_runs_and_prints_what_it_shows",
    ("Command line", 0): "test_command_line_block_runs_as_written",
    ("`dptrain train CONFIG.toml`", 0): "test_the_config_block_is_the_example_config",
    ("`dptrain train CONFIG.toml`", 1): "test_the_invalid_config_output_is_what_dptrain_prints",
    ("Fine-tuning with LoRA, per user", 0): "tests/test_lm_readme.py::test_lora_example_runs",
    ("Federated learning", 0): "tests/test_federated.py::test_readme_example_stops_at_the_budget_and_prints_what_it_shows",
}


def _block(start: str) -> str:
    (found,) = [text for _, _, text in BLOCKS if text.startswith(start)]
    return found


def _run_python(code: str, tmp_path: Path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    return out.getvalue()


def test_every_code_block_is_run_by_a_test_or_marked_an_excerpt():
    """Every block is run by a test named in TESTED or starts with ``# excerpt``; blocks without a language are
    outputs of a run (their headings say when and on what they were measured)."""
    seen: dict[str, int] = {}
    unaccounted = []
    for heading, language, text in BLOCKS:
        ordinal = seen[heading] = seen.get(heading, -1) + 1
        if (heading, ordinal) in TESTED or text.startswith("# excerpt") or not language:
            continue
        unaccounted.append(f"{heading} #{ordinal}: {text.splitlines()[0]}")
    assert not unaccounted, unaccounted
    headings = {heading for heading, _, _ in BLOCKS}
    assert all(heading in headings for heading, _ in TESTED)  # a renamed section fails here, not silently


def test_quick_start_trains_to_its_epsilon(tmp_path, monkeypatch):
    out = _run_python(_block("import torch\nfrom torch import nn\nfrom torch.utils.data import DataLoader, "
                             "TensorDataset\nfrom dptrain import PrivacyEngine"), tmp_path, monkeypatch)
    epsilons = [float(e) for e in re.findall(r"^epoch \d: eps = ([\d.]+)$", out, flags=re.M)]
    assert len(epsilons) == 5 and epsilons == sorted(epsilons) and 2.9 <= epsilons[-1] <= 3.0, out


def test_accounting_example_prints_its_comments(tmp_path, monkeypatch):
    code = _block("from dptrain.accounting import compute_epsilon, calibrate_noise")
    scope: dict = {}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), scope)
    assert "~6.19" in code and round(scope["eps"], 2) == 6.19
    from dptrain.accounting import compute_epsilon

    assert "[2.97, 3]" in code and 2.97 <= compute_epsilon(0.01, scope["sigma"], 10_000, 1e-5) <= 3.0


def test_the_config_block_is_the_example_config():
    assert _block("# dptrain train examples/digits.toml") == (ROOT / "examples" / "digits.toml").read_text()


def test_the_invalid_config_output_is_what_dptrain_prints(tmp_path, capsys, monkeypatch):
    from dptrain.cli import main

    shown = _block("dptrain train: error: invalid config bad.toml:")
    bad = tmp_path / "bad.toml"
    bad.write_text('[dataset]\nname = "digits"\n[training]\nepochs = 2\nbatch_size = 100\nepoch = 3\n'
                   '[privacy]\ntarget_epsilon = 0.0\ndelta = "tiny"\n')
    monkeypatch.chdir(tmp_path)
    assert main(["train", "bad.toml"]) == 2
    assert capsys.readouterr().err == shown


def test_command_line_block_runs_as_written(tmp_path):
    """Each line of the Command line section's block, in an empty directory holding a copy of examples/: every
    command exits 0 (the ledger's budget holds both training runs)."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT / "src")}
    outputs = {}
    for line in _block("dptrain demo                                  #").splitlines():
        command = line.split("  #")[0].strip()
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        outputs[command] = done.stdout
    assert (tmp_path / "runs" / "eps1" / "privacy_card.json").is_file() and (tmp_path / "my-ledger.db").is_file()
    # The demo's output shown under `dptrain demo` (seed 0): the same epsilons, accuracies within 1.5 points
    # (float rounding differs across machines and thread counts), the same runs in the same order.
    shown, printed = _demo_rows(_block("dptrain demo: scikit-learn digits")), _demo_rows(outputs["dptrain demo"])
    assert [r[0] for r in printed] == [r[0] for r in shown] == ["non-private", "eps=1", "eps=3", "eps=8"]
    for (name, eps, acc), (_, shown_eps, shown_acc) in zip(printed, shown):
        assert eps == shown_eps and abs(acc - shown_acc) <= 1.5, (name, eps, acc, shown_eps, shown_acc)


def _demo_rows(text: str) -> list[tuple[str, str, float]]:
    """(run, epsilon as printed, test accuracy in %) of the demo's summary table."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 10 and cells[1] == "completed":
            rows.append((cells[0], cells[3], float(cells[5].rstrip("%"))))
    return rows


def test_the_audit_output_shown_is_what_dptrain_audit_prints(tmp_path):
    """`dptrain audit` (seeded) prints the table README shows: the same rows and verdicts, claimed epsilons, test
    accuracy within 0.02 and the MIA AUC within 0.03 (float rounding differs across machines)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(["dptrain", "audit"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    def rows(text: str) -> list[list[str]]:
        return [line.split() for line in text.splitlines() if line.split()[:1] in (["non-private"], ["eps=1"],
                                                                                      ["eps=8"])]

    shown, printed = rows(_block("run          claimed eps")), rows(done.stdout)
    assert [r[0] for r in printed] == [r[0] for r in shown] and len(shown) == 3
    for got, want in zip(printed, shown):
        assert got[1] == want[1] and got[-1] == want[-1]  # claimed eps, verdict
        assert abs(float(got[2]) - float(want[2])) <= 0.02 and abs(float(got[3]) - float(want[3])) <= 0.03, got


def test_the_demo_time_is_stated_one_way():
    """make demo and dptrain demo: the same run, the same claimed time (measured: 18 s wall on 2 cores)."""
    assert README.count("report (~") == README.count("report (~20 s)") == 2
