"""What every ``dptrain`` command shares: exit codes, subcommand parsers with an example, ``--json`` output,
accounting step options, torch threads, plain-text tables."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_SUSPICIOUS = 0, 1, 2, 3
EXIT_INTERRUPTED = 130

#: ``dptrain.accounting.ACCOUNTANTS`` and ``dptrain.budget.PRIVACY_UNITS``, spelled out so that building the parser
#: (``--help``) does not load dp_accounting (about a second); tests/test_cli.py checks they are the same.
ACCOUNTANTS = ("pld", "rdp")
PRIVACY_UNITS = ("example", "user", "client")


def subcommand(subparsers: Any, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` ends with a worked example."""
    return subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def add_step_arguments(parser: argparse.ArgumentParser, steps: bool = True) -> None:
    parser.add_argument("--sample-rate", type=float, required=True, metavar="Q", help="Poisson sampling rate")
    parser.add_argument("--noise-multiplier", type=float, required=True, metavar="S", help="noise std / clip norm")
    if steps:
        parser.add_argument("--steps", type=int, required=True, metavar="T", help="number of steps")
    parser.add_argument(
        "--group-size",
        type=int,
        default=1,
        metavar="K",
        help="a privacy unit contributes up to K examples, each sampled independently (default 1)",
    )


def add_threads(parser: argparse.ArgumentParser, default: int | None) -> None:
    parser.add_argument(
        "--threads", type=int, default=default, metavar="N",
        help="torch CPU threads" + (f" (default {default}: fastest for these small models)" if default else
                                    " (default: torch's choice)"),
    )


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch  # only for a command that trains, when it runs

        torch.set_num_threads(threads)


def fmt(value: float | None, spec: str = ".3f") -> str:
    """A number for a table: "-" for None, "inf" for infinity."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain fixed-width table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # First column left-aligned (names), the others right-aligned (numbers).
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
