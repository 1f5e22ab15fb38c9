"""``dptrain budget create|show|spend|history|close``: privacy budget ledgers (no torch; dp_accounting only to
run)."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dptrain.cli.common import EXIT_OK, PRIVACY_UNITS, add_json_flag, add_step_arguments, emit, subcommand

if TYPE_CHECKING:
    from dptrain.budget import BudgetLedger, BudgetSummary


def _ledger(path: str, create: bool = False) -> "BudgetLedger":
    from dptrain.budget import BudgetLedger  # dp_accounting (composition): loaded to run, not to parse options

    return BudgetLedger(path, create=create)


def add_budget(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "budget",
        help="privacy budget ledgers: create, show, spend, history, close",
        description="A ledger file holds one budget per dataset; every release is recorded and composed (PLD).",
        epilog="examples:\n  dptrain budget create patients --epsilon 3 --delta 1e-5 --ledger privacy.db\n"
        "  dptrain budget show --ledger privacy.db\n  dptrain budget history patients --ledger privacy.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        sub = subcommand(actions, name, summary, example)
        sub.add_argument("--ledger", required=True, metavar="PATH", help="the ledger's SQLite file")
        add_json_flag(sub)
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
    add_step_arguments(spend)
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


def _summary_dict(summary: "BudgetSummary") -> dict[str, Any]:
    return {
        **asdict(summary.budget),
        "spent": summary.spent,
        "remaining": summary.remaining,
        "entries": summary.entries,
        "reserved": summary.reserved,
    }


def _summary_text(summary: "BudgetSummary") -> str:
    b = summary.budget
    state = f"closed {b.closed_at}" if b.closed else "open"
    return (
        f"{b.name}: spent epsilon {summary.spent:.6g} of {b.epsilon:g} (remaining {summary.remaining:.6g}) at "
        f"delta {b.delta:g}, per {b.privacy_unit}; entries: {summary.entries} ({summary.reserved} reserved); {state}"
    )


def _run_budget_create(args: argparse.Namespace) -> int:
    path = Path(args.ledger)
    existed = path.exists()
    try:
        budget = _ledger(args.ledger, create=True).create(args.name, args.epsilon, args.delta, args.privacy_unit)
    except Exception:
        if not existed:  # a refused create leaves no ledger file behind
            for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                leftover.unlink(missing_ok=True)
        raise
    emit(
        args,
        asdict(budget),
        f"created budget {budget.name!r}: epsilon <= {budget.epsilon:g} at delta {budget.delta:g} per "
        f"{budget.privacy_unit}, in {args.ledger}",
    )
    return EXIT_OK


def _run_budget_show(args: argparse.Namespace) -> int:
    ledger = _ledger(args.ledger)
    if args.name is not None:
        summary = ledger.summary(args.name)
        emit(args, _summary_dict(summary), _summary_text(summary))
        return EXIT_OK
    summaries = [ledger.summary(b.name) for b in ledger.budgets()]
    text = "\n".join(_summary_text(s) for s in summaries) or f"no budgets in {args.ledger}"
    emit(args, {"budgets": [_summary_dict(s) for s in summaries]}, text)
    return EXIT_OK


def _run_budget_spend(args: argparse.Namespace) -> int:
    ledger = _ledger(args.ledger)
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
    emit(
        args,
        {"entry": entry_id, **_summary_dict(summary)},
        f"recorded entry {entry_id}. {_summary_text(summary)}",
    )
    return EXIT_OK


def _run_budget_history(args: argparse.Namespace) -> int:
    entries = _ledger(args.ledger).history(args.name)
    lines = [
        f"{e.id:>5}  {e.created_at}  {e.status:<8}  q={e.sample_rate:g} sigma={e.noise_multiplier:g} "
        f"steps={e.steps}/{e.planned_steps} group={e.group_size} {e.sampling}"
        f"{'' if e.seed is None else f' seed={e.seed}'}  {e.note}"
        for e in entries
    ]
    emit(
        args,
        {"budget": args.name, "entries": [asdict(e) for e in entries]},
        "\n".join(lines) or f"budget {args.name!r} has no entries",
    )
    return EXIT_OK


def _run_budget_close(args: argparse.Namespace) -> int:
    ledger = _ledger(args.ledger)
    ledger.close_budget(args.name)
    budget = ledger.budget(args.name)
    emit(args, asdict(budget), f"closed budget {budget.name!r} at {budget.closed_at}")
    return EXIT_OK
