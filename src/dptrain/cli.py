"""The ``dptrain`` command line: the demo, config-driven training, reports, accounting and budget ledgers.

Each command is one ``_add_<command>`` function that registers its parser (with an example in its ``--help``) and
a handler ``(args) -> exit code``; adding a command means adding such a function to ``_COMMANDS``. ``--json`` makes
a command print exactly one JSON object on stdout. Exit codes: 0 success, 1 refused or failed (e.g. a budget
would be exceeded; the reason goes to stderr), 2 invalid usage or parameters (e.g. an invalid config), 3 an audit
found more leakage than the claimed epsilon allows, 130 interrupted by Ctrl-C (143 by SIGTERM) after a clean stop.
Commands that train (demo, train, report) import torch only when they run.
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
EXIT_INTERRUPTED = 130

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
        epilog="examples:\n  dptrain budget create patients --epsilon 3 --delta 1e-5 --ledger privacy.db\n"
        "  dptrain budget show --ledger privacy.db\n  dptrain budget history patients --ledger privacy.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        f"steps={e.steps}/{e.planned_steps} group={e.group_size} {e.sampling}"
        f"{'' if e.seed is None else f' seed={e.seed}'}  {e.note}"
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


# -- demo --------------------------------------------------------------------------------------------------------------


def _add_threads(parser: argparse.ArgumentParser, default: int | None) -> None:
    parser.add_argument(
        "--threads", type=int, default=default, metavar="N",
        help="torch CPU threads" + (f" (default {default}: fastest for these small models)" if default else
                                    " (default: torch's choice)"),
    )


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def _add_demo(subparsers: Any) -> None:
    p = _subcommand(
        subparsers,
        "demo",
        "train on scikit-learn's digits without DP and with DP at eps 1, 3, 8; audit each; write a report",
        "dptrain demo --output-dir runs/demo",
    )
    p.description += (
        ". Every DP run is charged to budget 'digits' in OUTPUT_DIR/privacy.db; each model gets a privacy card "
        "(OUTPUT_DIR/<run>/privacy_card.md). Ctrl-C stops after a clean shutdown of the current run."
    )
    p.add_argument("--output-dir", metavar="DIR", help="where to write (default runs/demo-<timestamp>; must be empty)")
    p.add_argument(
        "--epsilons", type=float, nargs="+", default=None, metavar="E", help="DP runs (default 1 3 8; with --quick 3)"
    )
    p.add_argument("--delta", type=float, default=None, metavar="D", help="delta of every DP run (default 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="non-private and eps 3 only (a smoke test)")
    _add_threads(p, 1)
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from dptrain.demo import DEMO_DELTA, run_demo

    _set_threads(args.threads)
    result = run_demo(
        args.output_dir,
        epsilons=tuple(args.epsilons) if args.epsilons else None,
        delta=DEMO_DELTA if args.delta is None else args.delta,
        quick=args.quick,
        seed=args.seed,
    )
    if result["interrupted"]:
        return EXIT_INTERRUPTED
    return 3 if any((s.get("audit") or {}).get("violates_bound") for s in result["summaries"]) else EXIT_OK


# -- train -------------------------------------------------------------------------------------------------------------

CONFIG_HELP = """config (TOML; unknown keys, wrong types and missing sections are errors):
  name = "digits-eps3"          # optional; default: the file name
  output_dir = "runs/digits"    # optional; default runs/<name>-<timestamp>; relative paths: to the current dir
  seed = 0
  [dataset]   name = "digits" | "csv"; test_fraction = 0.2; split_seed = 0; scale_to = [0, 1] (e.g. [-1, 1])
              csv: path, label_column, classes = [..], features = [..] (default: all other columns),
                   feature_ranges = {col = [low, high]} or feature_range = [low, high] (known ranges, required)
  [model]     hidden = [128]; activation = "relu" | "tanh" | "gelu" | "elu" | "silu"
  [training]  epochs, batch_size (required); max_grad_norm = 1.0; optimizer = "adam" | "sgd"; lr = 0.01;
              momentum (sgd)
  [privacy]   target_epsilon or noise_multiplier; delta (required); accountant = "pld" | "rdp"; secure_mode = false
  [ledger]    path, budget (optional section); cap = E creates the budget if missing
  [audit]     membership = false (true: the loss-threshold attack, outside the guarantee, for reviewers)

writes OUTPUT_DIR/run.json, metrics.jsonl, model.pt, checkpoint.pt, report.html, privacy_card.json,
privacy_card.md. Share model.pt (the weights) and the card; checkpoint.pt and run.json can regenerate the noise.
Ctrl-C: finishes the current step, writes the checkpoint, settles the ledger, writes a partial report; exit 130."""


def _add_train(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model with DP from a TOML config; live progress, checkpoint, ledger, report, privacy card",
        description="Train a model with differential privacy as described by a TOML config.",
        epilog=f"{CONFIG_HELP}\n\nexample:\n  dptrain train examples/digits.toml --set training.epochs=20 "
        "--output-dir runs/digits-20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG.toml")
    p.add_argument("--output-dir", metavar="DIR", help="overrides the config's output_dir")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override a config value, e.g. --set privacy.target_epsilon=1 (repeatable; VALUE is read as TOML)",
    )
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--json", action="store_true", help="print the run summary (run.json) as one JSON object")
    _add_threads(p, None)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from dptrain.runner import load_config

    config = load_config(args.config, args.overrides)
    if args.check:
        print(json.dumps(config.to_dict()) if args.json else f"{args.config}: valid")
        return EXIT_OK
    _set_threads(args.threads)
    from dptrain.report.console import RichDisplay, make_console, print_run_table
    from dptrain.runner import run_training

    console = make_console(sys.stderr if args.json else None)
    result = run_training(config, output_dir=args.output_dir, display=RichDisplay(console))
    if args.json:
        print(json.dumps(result.summary))
        return result.exit_code
    print_run_table(console, [result.summary])
    ledger = result.summary.get("ledger")
    if ledger:
        console.print(
            f"ledger {ledger['path']}: entry {ledger['entry_id']} {ledger['entry_status']}; budget "
            f"'{ledger['budget']}' spent eps {ledger['spent_epsilon']:.3f} of {ledger['cap_epsilon']:g}",
            markup=False,
        )
    run_dir = result.run_dir
    console.print(f"model (the release): {run_dir / 'model.pt'}", soft_wrap=True, markup=False)
    console.print(f"checkpoint (private: resumes the noise stream): {run_dir / 'checkpoint.pt'}", soft_wrap=True,
                  markup=False)
    console.print(f"privacy card: {run_dir / 'privacy_card.md'} (and .json)", soft_wrap=True, markup=False)
    console.print(f"report: {run_dir / 'report.html'}", soft_wrap=True, markup=False)
    return result.exit_code


# -- report ------------------------------------------------------------------------------------------------------------


def _add_report(subparsers: Any) -> None:
    p = _subcommand(
        subparsers,
        "report",
        "(re)build report.html, privacy_card.json and privacy_card.md of a run or demo directory",
        "dptrain report runs/digits-eps3",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by dptrain train or dptrain demo")
    _add_json_flag(p)
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from dptrain.report import write_report

    written = write_report(args.run_dir)
    paths = {"report": str(written["report"])}
    if written["kind"] == "run":
        paths.update(card_json=str(written["card_json"]), card_md=str(written["card_md"]))
    else:
        paths["runs"] = [str(r["report"]) for r in written["runs"]]
    text = f"report: {paths['report']}"
    if "card_md" in paths:
        text += f"\nprivacy card: {paths['card_md']} (and {paths['card_json']})"
    else:
        text += "".join(f"\n  run report: {r}" for r in paths["runs"])
    _emit(args, paths, text)
    return EXIT_OK


# -- audit ------------------------------------------------------------------------------------------------------------
# Its options live in dptrain.audit.command, which loads torch; main() hands "audit" over to it, so that the other
# commands start without torch. It is registered here only to be listed in `dptrain --help`.


def _add_audit(subparsers: Any) -> None:
    subparsers.add_parser(
        "audit",
        add_help=False,
        help="membership-inference and one-run audits of the demo digits model (dptrain audit --help)",
    )


def _delegate(argv: list[str], prog: str, description: str, example: str, add_arguments, run) -> int:
    """Parse ``argv`` with a command's own options (defined in its module) and run it."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=f"example: {example}")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_OK
    try:
        return run(args)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _run_audit(argv: list[str]) -> int:
    from dptrain.audit.command import add_audit_arguments, run_audit_command

    return _delegate(
        argv,
        "dptrain audit",
        "Audit the demo digits model, non-private and at each --epsilon: membership inference and the one-run "
        "empirical epsilon lower bound. Exit status 3 flags a run that leaks more than it claims.",
        "dptrain audit --quick --json",
        add_audit_arguments,
        run_audit_command,
    )


# -- experiment -------------------------------------------------------------------------------------------------------
# Language-model experiments need transformers and peft; like audit, main() hands them over to dptrain.lm.command.


def _add_experiment(subparsers: Any) -> None:
    subparsers.add_parser(
        "experiment",
        add_help=False,
        help="research experiments, e.g. memorization: do DP language models repeat planted secrets? "
        "(dptrain experiment --help)",
    )


def _run_experiment(argv: list[str]) -> int:
    from dptrain.lm.command import add_experiment_arguments, run_experiment_command

    return _delegate(
        argv,
        "dptrain experiment",
        "Fine-tune a small GPT-2 on a synthetic support-chat corpus with planted secrets, non-privately and with "
        "user-level DP, and report perplexity, canary exposure and extraction.",
        "dptrain experiment memorization --quick --json",
        add_experiment_arguments,
        run_experiment_command,
    )


# -- entry point -----------------------------------------------------------------------------------------------------

_COMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_demo, _add_train, _add_report, _add_epsilon, _add_calibrate, _add_budget, _add_audit, _add_experiment
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
    try:
        return args.handler(args)
    except BudgetError as e:
        print(f"{command}: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a second Ctrl-C: aborted without the clean shutdown
        print(f"{command}: aborted (a ledger reservation of an unfinished run stays in place)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
