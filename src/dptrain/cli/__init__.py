"""The ``dptrain`` command line: the demo, config-driven training, reports, accounting and budget ledgers.

Each command is one ``add_<command>`` function (in the module of its group: ``accounting``, ``budget``,
``training``, ``audit``, ``experiment``; shared helpers in ``common``) that registers its parser (with an example in
its ``--help``) and a handler ``(args) -> exit code``; adding a command means adding such a function to
``_COMMANDS``. ``--json`` makes
a command print exactly one JSON object on stdout. Exit codes: 0 success, 1 refused or failed (e.g. a budget
would be exceeded; the reason goes to stderr), 2 invalid usage or parameters (e.g. an invalid config), 3 an audit
found more leakage than the claimed epsilon allows, 130 interrupted by Ctrl-C (143 by SIGTERM) after a clean stop.
Commands that train (demo, train, report) import torch only when they run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from dptrain.cli.accounting import add_calibrate, add_epsilon
from dptrain.cli.budget import add_budget
from dptrain.cli.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from dptrain.cli.training import add_demo, add_report, add_train

EXAMPLES = """examples:
  dptrain demo                                  digits: non-private vs DP at eps 1, 3, 8, audits, report (~1 min)
  dptrain train examples/digits.toml            a DP training run described by a TOML config
  dptrain train examples/digits.toml --set privacy.target_epsilon=1 --output-dir runs/eps1
  dptrain report runs/eps1                      rebuild a run's report.html and privacy card
  dptrain epsilon --sample-rate 0.01 --noise-multiplier 1 --steps 10000 --delta 1e-5
  dptrain calibrate --target-epsilon 3 --delta 1e-5 --sample-rate 0.004 --epochs 60
  dptrain budget create patients --epsilon 3 --delta 1e-5 --ledger privacy.db
  dptrain audit --quick

Run 'dptrain COMMAND --help' for a command's options."""

# -- audit and experiment ----------------------------------------------------------------------------------------------
# Their options live in dptrain.cli.audit and dptrain.cli.experiment (which load torch, transformers, only when the
# command runs); main() hands the arguments over to them. They are registered here only to be listed in --help.


def _add_audit(subparsers: Any) -> None:
    subparsers.add_parser(
        "audit",
        add_help=False,
        help="membership-inference and one-run audits of a digits MLP, or of a model dptrain wrote (dptrain audit --help)",
    )


def _delegate(argv: list[str], prog: str, description: str, example: str, add_arguments, run) -> int:
    """Parse ``argv`` with a command's own options (defined in its module) and run it."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=f"example: {example}")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_OK
    return _run(prog, run, args)


def _run_audit(argv: list[str]) -> int:
    # the audit's module is torch-free to import; it loads torch when it runs
    from dptrain.cli.audit import add_audit_arguments, run_audit_command

    return _delegate(
        argv,
        "dptrain audit",
        "Audit a digits MLP trained non-privately and at each --epsilon (or, with --load, a model dptrain wrote): "
        "membership inference and the one-run empirical epsilon lower bound. Exit status 3 flags a run that leaks "
        "more than it claims.",
        "dptrain audit --quick --json",
        add_audit_arguments,
        run_audit_command,
    )


def _add_experiment(subparsers: Any) -> None:
    subparsers.add_parser(
        "experiment",
        add_help=False,
        help="research experiments: memorization (do DP language models repeat planted secrets?) and federated "
        "(FedAvg with client- and sample-level DP on Flower) (dptrain experiment --help)",
    )


def _run_experiment(argv: list[str]) -> int:
    # the experiment's module is torch-free to import; it loads the LM stack when it runs
    from dptrain.cli.experiment import add_experiment_arguments, run_experiment_command

    return _delegate(
        argv,
        "dptrain experiment",
        "Fine-tune a small GPT-2 on a synthetic support-chat corpus with planted secrets, non-privately and with "
        "user-level DP, and report perplexity, canary exposure and extraction.",
        "dptrain experiment memorization --quick --json",
        add_experiment_arguments,
        run_experiment_command,
    )


# -- entry point ----------------------------------------------------------------------------------------------------

_COMMANDS: tuple[Callable[[Any], None], ...] = (
    add_demo, add_train, add_report, add_epsilon, add_calibrate, add_budget, _add_audit, _add_experiment
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dptrain",
        description="Differentially private training for PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dptrain`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code instead of exiting."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["audit"]:
        return _run_audit(argv[1:])
    if argv[:1] == ["experiment"]:
        return _run_experiment(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_OK
    command = " ".join(filter(None, ["dptrain", args.command, getattr(args, "action", None)]))
    return _run(command, args.handler, args)


def _run(command: str, handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``handler(args)``, with the one map from errors to exit codes and messages of every command: a refusal of
    the budget ledger 1, invalid input 2, Ctrl-C 130; anything else is a bug and raises."""
    try:
        return handler(args)
    except Exception as e:
        from dptrain.budget import BudgetError  # dp_accounting: loaded when needed, not for --help

        if isinstance(e, BudgetError):
            print(f"{command}: {e}", file=sys.stderr)
            return EXIT_REFUSED
        if isinstance(e, ValueError):
            print(f"{command}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    except KeyboardInterrupt as e:  # Ctrl-C outside a run's clean shutdown (or a second one during it)
        notes = "; ".join(getattr(e, "__notes__", ()))  # a run with a ledger says what its reservation keeps
        print(f"{command}: interrupted" + (f": {notes}" if notes else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
