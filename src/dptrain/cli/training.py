"""``dptrain demo``, ``dptrain train`` and ``dptrain report``: the commands that train or render (torch, matplotlib
and the app layer are imported when they run, not to parse their options)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dptrain.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SUSPICIOUS,
    add_json_flag,
    add_threads,
    emit,
    set_threads,
    subcommand,
)


def add_demo(subparsers: Any) -> None:
    p = subcommand(
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
    add_threads(p, 1)
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from dptrain.app.demo import DEMO_DELTA, run_demo  # the app layer and torch: loaded to run, not for --help

    set_threads(args.threads)
    result = run_demo(
        args.output_dir,
        epsilons=tuple(args.epsilons) if args.epsilons else None,
        delta=DEMO_DELTA if args.delta is None else args.delta,
        quick=args.quick,
        seed=args.seed,
    )
    if result["interrupted"]:
        return EXIT_INTERRUPTED
    return EXIT_SUSPICIOUS if any((s.get("audit") or {}).get("violates_bound") for s in result["summaries"]) else EXIT_OK



# -- train ----------------------------------------------------------------------------------------------------

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
  [privacy]   target_epsilon or noise_multiplier; delta (required); accountant = "pld" | "rdp"; secure_mode = false;
              allow_weak_delta = false (delta >= 1/N is refused without it)
  [ledger]    path, budget (optional section); cap = E creates the budget if missing
  [audit]     membership = false (true: the loss-threshold attack, outside the guarantee, for reviewers)
  [card]      owner, purpose (optional; shown on the privacy card)

writes OUTPUT_DIR/run.json, metrics.jsonl, model.pt, checkpoint.pt, report.html, privacy_card.json,
privacy_card.md. Share model.pt (the weights) and the card; checkpoint.pt and run.json can regenerate the noise.
Ctrl-C: finishes the current step, writes the checkpoint, settles the ledger, writes a partial report; exit 130."""


def add_train(subparsers: Any) -> None:
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
    p.add_argument("--check", action="store_true",
                   help="validate the config, the data and the ledger without training, and exit")
    p.add_argument("--json", action="store_true", help="print the run summary (run.json) as one JSON object")
    add_threads(p, None)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from dptrain.app import load_config  # the app layer and torch: loaded to run, not for --help

    config = load_config(args.config, args.overrides)
    if args.check:  # the data and the ledger too, as the run would check them, without training or writing
        from dptrain.app.train import check_run  # torch: loads the data

        data = check_run(config)
        if args.json:
            print(json.dumps({"config": config.to_dict(), "num_train": len(data.train), "num_test": len(data.test)}))
        else:
            print(f"{args.config}: valid ({len(data.train)} training and {len(data.test)} held-out examples"
                  + (f"; ledger {config.ledger.path}, budget '{config.ledger.budget}'" if config.ledger else "")
                  + ")")
        return EXIT_OK
    set_threads(args.threads)
    from dptrain.app import run_training  # (loaded above)
    from dptrain.report.console import RichDisplay, make_console, print_run_table  # rich: loaded to run

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


def add_report(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "report",
        "(re)build report.html, privacy_card.json and privacy_card.md of a run or demo directory",
        "dptrain report runs/digits-eps3",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by dptrain train or dptrain demo")
    add_json_flag(p)
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from dptrain.report import write_report  # matplotlib: loaded to run, not for --help

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
    emit(args, paths, text)
    return EXIT_OK
