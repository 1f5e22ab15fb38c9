"""The README's "Auditing" section runs as written: each Python example, its printed lines checked in form.

The engine's noise comes from a fresh OS-seeded stream, so the numbers of one run are not reproducible; the test
checks every shown line word for word with each number replaced by "a number", and that no run is flagged (each
example asserts it). Blocks that begin with ``# excerpt`` need the reader's own model and are not run.
"""

from __future__ import annotations

import re

import pytest

from readme import readme_section

NUMBER = r"[0-9][0-9.e+-]*%?"


def _examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", readme_section("Auditing"), flags=re.S)
    return [block for block in blocks if not block.startswith("# excerpt")]


def _shown_pattern(block: str) -> re.Pattern[str]:
    """The output the block shows (the comment lines after its print), as a regex with numbers left free."""
    shown = block.split("print(", 1)[1].split("\n", 1)[1]
    lines = [line[2:] for line in shown.splitlines() if line.startswith("# ")]
    words = " ".join(lines).split()
    return re.compile(r"\s+".join(re.sub(NUMBER, lambda _: "\0", re.escape(w)).replace("\0", NUMBER) for w in words))


def test_the_section_has_the_input_and_gradient_canary_examples():
    examples = _examples()
    assert len(examples) == 2
    assert "audit_training_run" in examples[0] and "GradientCanaries" in examples[1]


@pytest.mark.parametrize("index", [0, 1], ids=["audit_training_run", "gradient_canaries"])
def test_example_runs_and_prints_what_it_shows(index, capsys):
    block = _examples()[index]
    exec(compile(block, f"README: Auditing example {index}", "exec"), {"__name__": "readme_example"})
    out = " ".join(capsys.readouterr().out.split())
    assert _shown_pattern(block).fullmatch(out), out
