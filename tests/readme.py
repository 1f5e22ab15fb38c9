"""Read a section of README.md, so that its examples are tested as written."""

from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def readme_section(title: str) -> str:
    """The text of the '## title' section of README.md, up to the next '## ' heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]
