"""The ``dptrain`` command line: privacy accounting and budget ledgers without writing Python.

Each command is one ``_add_<command>`` function that registers its parser (with an example in its ``--help``) and
a handler ``(args) -> exit code``; adding a command means adding such a function to ``_COMMANDS``. ``--json`` makes
a command print exactly one JSON object on stdout. Exit codes: 0 success, 1 refused or failed (e.g. a budget
would be exceeded; the reason goes to stderr), 2 invalid usage or parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from dptrain.accounting import ACCOUNTANTS, calibrate_noise, compute_epsilon
from dptrain.budget import PRIVACY_UNITS, BudgetError, BudgetLedger, BudgetSummary

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

def _subcommand(subparsers: Any, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` ends with a worked example."""
    return subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_step_arguments(parser: argparse.ArgumentParser, steps: bool = True) -> None:
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


# -- epsilon ---------------------------------------------------------------------------------------------------------


def _add_epsilon(subparsers: Any) -> None:
    p = _subcommand(
        subparsers,
        "epsilon",
        "epsilon of a DP-SGD run (Poisson-sampled Gaussian steps) at a given delta",
        "dptrain epsilon --sample-rate 0.01 --noise-multiplier 1.0 --steps 10000 --delta 1e-5 --json",
    )
    _add_step_arguments(p)
    p.add_argument("--delta", type=float, required=True, metavar="D")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="pld", help="pld (tight, default) or rdp")
    _add_json_flag(p)
    p.set_defaults(handler=_run_epsilon)


def _run_epsilon(args: argparse.Namespace) -> int:
    if args.noise_multiplier == 0:
        raise ValueError("--noise-multiplier 0 adds no noise: the run is not private (epsilon is infinite)")
    eps = compute_epsilon(
        args.sample_rate, args.noise_multiplier, args.steps, args.delta, args.accountant, args.group_size
    )
    group = f", groups of up to {args.group_size} examples" if args.group_size > 1 else ""
    _emit(
        args,
        {
            "epsilon": eps,
            "delta": args.delta,
            "accountant": args.accountant,
            "sample_rate": args.sample_rate,
            "noise_multiplier": args.noise_multiplier,
            "steps": args.steps,
            "group_size": args.group_size,
        },
        f"epsilon = {eps:.6g} at delta = {args.delta:g} ({args.accountant} accountant; sample rate "
        f"{args.sample_rate:g}, noise multiplier {args.noise_multiplier:g}, {args.steps} steps{group})",
    )
    return EXIT_OK


# -- calibrate -------------------------------------------------------------------------------------------------------


def _add_calibrate(subparsers: Any) -> None:
    p = _subcommand(
        subparsers,
        "calibrate",
        "smallest noise multiplier that keeps a run within a target epsilon",
        "dptrain calibrate --target-epsilon 3 --delta 1e-5 --sample-rate 0.004 --epochs 60",
    )
    p.add_argument("--target-epsilon", type=float, required=True, metavar="E")
    p.add_argument("--delta", type=float, required=True, metavar="D")
    p.add_argument("--sample-rate", type=float, required=True, metavar="Q", help="Poisson sampling rate")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, metavar="T", help="number of steps")
    length.add_argument("--epochs", type=float, metavar="K", help="epochs; one epoch is 1/Q steps (rounded up)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="pld", help="pld (tight, default) or rdp")
    _add_json_flag(p)
    p.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    steps = args.steps
    if args.epochs is not None:
        if not (0 < args.sample_rate <= 1 and 0 < args.epochs < math.inf):
            raise ValueError("--epochs needs a finite number of epochs > 0 and a sample rate in (0, 1]")
        # round() first so that e.g. 3 epochs at rate 0.1 are 30 steps, not 31 from 30.000000000000004
        steps = math.ceil(round(args.epochs / args.sample_rate, 6))
    sigma = calibrate_noise(args.target_epsilon, args.delta, args.sample_rate, steps, args.accountant)
    eps = compute_epsilon(args.sample_rate, sigma, steps, args.delta, args.accountant)
    _emit(
        args,
        {
            "noise_multiplier": sigma,
            "epsilon": eps,
            "target_epsilon": args.target_epsilon,
            "delta": args.delta,
            "accountant": args.accountant,
            "sample_rate": args.sample_rate,
            "steps": steps,
        },
        f"noise multiplier = {sigma:.6g} gives epsilon = {eps:.6g} <= {args.target_epsilon:g} at delta = "
        f"{args.delta:g} ({args.accountant} accountant; sample rate {args.sample_rate:g}, {steps} steps)",
    )
    return EXIT_OK


# -- budget ----------------------------------------------------------------------------------------------------------


def _add_budget(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "budget",
        help="privacy budget ledgers: create, show, spend, history, close",
        description="A ledger file holds one budget per dataset; every release is recorded and composed (PLD).",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        sub = _subcommand(actions, name, summary, example)
        sub.add_argument("--ledger", required=True, metavar="PATH", help="the ledger's SQLite file")
        _add_json_flag(sub)
        return sub

    create = action(
        "create",
        "create a budget: a cap on everything ever released about a dataset",
        "dptrain budget create patients --epsilon 3 --delta 1e-5 --ledger privacy.db",
    )
    create.add_argument("name")
    create.add_argument("--epsilon", type=float, required=True, metavar="E", help="the cap")
    create.add_argument("--delta", type=float, required=True, metavar="D")
    create.add_argument("--privacy-unit", choices=PRIVACY_UNITS, default="example", help="default: example")
    create.set_defaults(handler=_run_budget_create)

    show = action(
        "show",
        "show a budget's cap, composed spend and remaining epsilon (all budgets without NAME)",
        "dptrain budget show patients --ledger privacy.db",
    )
    show.add_argument("name", nargs="?")
    show.set_defaults(handler=_run_budget_show)

    spend = action(
        "spend",
        "record a release; refused (exit 1, nothing recorded) if it would exceed the cap",
        "dptrain budget spend patients --sample-rate 0.01 --noise-multiplier 1 --steps 1000 "
        '--note "tuning run 1" --ledger privacy.db',
    )
    spend.add_argument("name")
    _add_step_arguments(spend)
    spend.add_argument("--delta", type=float, metavar="D", help="if given, must equal the budget's delta")
    spend.add_argument("--note", default="", help="free text kept with the entry")
    spend.set_defaults(handler=_run_budget_spend)

    history = action(
        "history", "list every entry of a budget", "dptrain budget history patients --ledger privacy.db"
    )
    history.add_argument("name")
    history.set_defaults(handler=_run_budget_history)

    close = action(
        "close",
        "close a budget: nothing more may be spent against it",
        "dptrain budget close patients --ledger privacy.db",
    )
    close.add_argument("name")
    close.set_defaults(handler=_run_budget_close)


def _summary_dict(summary: BudgetSummary) -> dict[str, Any]:
    return {
        **asdict(summary.budget),
        "spent": summary.spent,
        "remaining": summary.remaining,
        "entries": summary.entries,
        "reserved": summary.reserved,
    }


def _summary_text(summary: BudgetSummary) -> str:
    b = summary.budget
    state = f"closed {b.closed_at}" if b.closed else "open"
    return (
        f"{b.name}: spent epsilon {summary.spent:.6g} of {b.epsilon:g} (remaining {summary.remaining:.6g}) at "
        f"delta {b.delta:g}, per {b.privacy_unit}; entries: {summary.entries} ({summary.reserved} reserved); {state}"
    )


def _run_budget_create(args: argparse.Namespace) -> int:
    budget = BudgetLedger(args.ledger).create(args.name, args.epsilon, args.delta, args.privacy_unit)
    _emit(
        args,
        asdict(budget),
        f"created budget {budget.name!r}: epsilon <= {budget.epsilon:g} at delta {budget.delta:g} per "
        f"{budget.privacy_unit}, in {args.ledger}",
    )
    return EXIT_OK


def _run_budget_show(args: argparse.Namespace) -> int:
    ledger = BudgetLedger(args.ledger, create=False)
    if args.name is not None:
        summary = ledger.summary(args.name)
        _emit(args, _summary_dict(summary), _summary_text(summary))
        return EXIT_OK
    summaries = [ledger.summary(b.name) for b in ledger.budgets()]
    text = "\n".join(_summary_text(s) for s in summaries) or f"no budgets in {args.ledger}"
    _emit(args, {"budgets": [_summary_dict(s) for s in summaries]}, text)
    return EXIT_OK


def _run_budget_spend(args: argparse.Namespace) -> int:
    ledger = BudgetLedger(args.ledger, create=False)
    entry_id = ledger.spend(
        args.name,
        args.sample_rate,
        args.noise_multiplier,
        args.steps,
        args.note,
        group_size=args.group_size,
        delta=args.delta,
    )
    summary = ledger.summary(args.name)
    _emit(
        args,
        {"entry": entry_id, **_summary_dict(summary)},
        f"recorded entry {entry_id}. {_summary_text(summary)}",
    )
    return EXIT_OK


def _run_budget_history(args: argparse.Namespace) -> int:
    entries = BudgetLedger(args.ledger, create=False).history(args.name)
    lines = [
        f"{e.id:>5}  {e.created_at}  {e.status:<8}  q={e.sample_rate:g} sigma={e.noise_multiplier:g} "
        f"steps={e.steps}/{e.planned_steps} group={e.group_size}  {e.note}"
        for e in entries
    ]
    _emit(
        args,
        {"budget": args.name, "entries": [asdict(e) for e in entries]},
        "\n".join(lines) or f"budget {args.name!r} has no entries",
    )
    return EXIT_OK


def _run_budget_close(args: argparse.Namespace) -> int:
    ledger = BudgetLedger(args.ledger, create=False)
    ledger.close_budget(args.name)
    budget = ledger.budget(args.name)
    _emit(args, asdict(budget), f"closed budget {budget.name!r} at {budget.closed_at}")
    return EXIT_OK


# -- entry point -----------------------------------------------------------------------------------------------------

# -- audit ------------------------------------------------------------------------------------------------------------
# Its options live in dptrain.audit.command, which loads torch; main() hands "audit" over to it, so that the other
# commands start without torch. It is registered here only to be listed in `dptrain --help`.


def _add_audit(subparsers: Any) -> None:
    subparsers.add_parser(
        "audit",
        add_help=False,
        help="membership-inference and one-run audits of the demo digits model (dptrain audit --help)",
    )


def _run_audit(argv: list[str]) -> int:
    from dptrain.audit.command import add_audit_arguments, run_audit_command

    parser = argparse.ArgumentParser(
        prog="dptrain audit",
        description="Audit the demo digits model, non-private and at each --epsilon: membership inference and the "
        "one-run empirical epsilon lower bound. Exit status 3 flags a run that leaks more than it claims.",
        epilog="example: dptrain audit --quick --json",
    )
    add_audit_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_OK
    try:
        return run_audit_command(args)
    except ValueError as e:
        print(f"dptrain audit: error: {e}", file=sys.stderr)
        return EXIT_USAGE


_COMMANDS: tuple[Callable[[Any], None], ...] = (_add_epsilon, _add_calibrate, _add_budget, _add_audit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dptrain", description="Differentially private training for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``dptrain`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code instead of exiting."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["audit"]:
        return _run_audit(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_OK
    command = " ".join(filter(None, ["dptrain", args.command, getattr(args, "action", None)]))
    try:
        return args.handler(args)
    except BudgetError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
