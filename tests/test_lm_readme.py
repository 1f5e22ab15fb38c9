"""Issue #6: the README's "Language models" section runs as written (its LoRA example)."""

from __future__ import annotations

import re

from readme import readme_section


def language_models_section() -> str:
    """The '## Language models' section of README.md."""
    return readme_section("Language models")


def test_lora_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", language_models_section(), flags=re.S)
    assert blocks, "no python example in the Language models section"
    exec(compile(blocks[0], "README: Language models", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    eps = float(re.search(r"eps = ([0-9.]+) per user", out).group(1))
    assert 2.9 <= eps <= 3.0
