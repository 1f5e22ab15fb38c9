"""``dptrain audit``: audit a digits MLP (64-128-10 ReLU) trained non-privately and at the given epsilons.

For every run it holds ``--canaries`` examples of the training split out as mislabelled canaries, includes each in
training with probability 1/2, trains once (non-private, then DP-Adam at each ``--epsilon`` with dptrain's engine),
and reports the train/test loss-threshold membership attack, the same attack on the canaries, the one-run
empirical epsilon lower bound of the canaries (black-box) and, for the private runs, of 2000 gradient canaries in
the same run (white-box, ``dptrain.audit.gradient_canaries``); ``--lira N`` adds LiRA with N models per run. ``--load PATH`` audits a model
that ``dptrain train`` or the demo wrote instead (a run directory, or its model.pt or checkpoint.pt: the run's own
data, split and claimed epsilon), or a state dict of the audit's MLP (train/test attack only: canaries must be in
training to be audited).

Exit status: 0, or 3 when some run is suspicious (it leaks more than its claimed epsilon allows: a probable bug).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dptrain.cli.common import EXIT_SUSPICIOUS, fmt, format_table

if TYPE_CHECKING:  # torch and the audits load when the command runs, not for its --help
    from dptrain.audit.mia import LiRAAuditResult, MembershipAuditResult
    from dptrain.audit.training import TrainingAuditReport

QUICK = {"epochs": 15, "canaries": 200, "epsilon": [1.0]}


def add_audit_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``dptrain audit`` to ``parser`` (a subcommand parser or a fresh one)."""
    parser.add_argument("--epsilon", type=float, nargs="+", default=None, help="claimed epsilons to train at (default 1 8)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of every run (default 100)")
    parser.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--canaries", type=int, default=None, help="number of canaries m (default 400)")
    parser.add_argument("--guesses", type=int, default=None, help="guesses per side k+ = k- (default m/10)")
    parser.add_argument("--lira", type=int, default=0, metavar="N", help="also run LiRA with N models per run")
    parser.add_argument("--significance", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this MLP)")
    parser.add_argument("--no-nonprivate", action="store_true", help="skip the non-private reference run")
    parser.add_argument("--load", metavar="PATH", help="audit a trained model instead: a run directory of dptrain "
                        "train or the demo (or its model.pt or checkpoint.pt), or a state dict of the audit's MLP")
    parser.add_argument("--claimed-epsilon", type=float, default=None,
                        help="with --load: the epsilon to test against (default: the run's own; inf without DP)")
    parser.add_argument("--quick", action="store_true", help="small settings (15 epochs, 200 canaries, eps 1): seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--curves", action="store_true", help="with --json: include the ROC and bound curves")
    return parser


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    epsilons = args.epsilon if args.epsilon is not None else (QUICK["epsilon"] if quick else [1.0, 8.0])
    config = {
        "epsilons": [float(e) for e in epsilons],
        "delta": args.delta,
        "epochs": args.epochs if args.epochs is not None else (QUICK["epochs"] if quick else 100),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_grad_norm": args.max_grad_norm,
        "canaries": args.canaries if args.canaries is not None else (QUICK["canaries"] if quick else 400),
        "guesses": args.guesses,
        "lira_models": args.lira,
        "significance": args.significance,
        "seed": args.seed,
        "nonprivate": not args.no_nonprivate,
    }
    for e in config["epsilons"]:
        if not (e > 0 and math.isfinite(e)):
            raise ValueError(f"--epsilon values must be finite and > 0, got {e}")
    if config["epochs"] <= 0 or config["canaries"] < 10:
        raise ValueError("--epochs must be > 0 and --canaries >= 10")
    if config["lira_models"] and config["lira_models"] < 3:
        raise ValueError("--lira needs at least 3 models")
    return config


def _mia_cells(result: MembershipAuditResult | None) -> list[str]:
    if result is None:
        return ["-"] * 4
    return [
        fmt(result.auc),
        fmt(result.tpr_at_fpr.get(0.001)),
        fmt(result.tpr_at_fpr.get(0.01)),
        fmt(result.epsilon_lower_bound, ".2f"),
    ]


HEADER = [
    "run", "claimed eps", "test acc", "MIA AUC", "TPR@0.1%", "TPR@1%", "MIA eps LB",
    "canary AUC", "canary eps LB", "one-run correct", "one-run eps LB", "white-box eps LB", "verdict",
]


def _report_row(report: TrainingAuditReport) -> list[str]:
    one = report.one_run
    return [
        report.name,
        fmt(report.claimed_epsilon, ".2f"),
        fmt(report.test_accuracy),
        *_mia_cells(report.membership),
        fmt(report.canary_membership.auc),
        fmt(report.canary_membership.epsilon_lower_bound, ".2f"),
        f"{one.num_correct}/{one.num_guesses}",
        fmt(one.empirical_epsilon_lower_bound, ".2f"),
        "-" if report.white_box is None else fmt(report.white_box.empirical_epsilon_lower_bound, ".2f"),
        "SUSPICIOUS" if report.suspicious else "ok",
    ]


def _lira_rows(name: str, lira: LiRAAuditResult) -> list[list[str]]:
    return [
        [f"{name} / {r.attack}", fmt(lira.claimed_epsilon, ".2f"), fmt(r.auc), fmt(r.tpr_at_fpr.get(0.001)),
         fmt(r.tpr_at_fpr.get(0.01)), fmt(r.epsilon_lower_bound, ".2f"), "SUSPICIOUS" if r.violates_bound else "ok"]
        for r in (lira.online, lira.offline)
    ]


LIRA_HEADER = ["run / attack", "claimed eps", "AUC", "TPR@0.1%", "TPR@1%", "eps LB", "verdict"]


def _audit_mlp_weights(path: Path) -> dict[str, Any] | None:
    """The state dict in ``path`` if it is one of the audit's own digits MLP 64-128-10 (its ``--load`` format
    before runs wrote model.pt), else None."""
    # torch and the audits load when the command runs, never for --help (here and below)
    import torch

    from dptrain.audit.digits import digits_mlp

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    expected = {k: v.shape for k, v in digits_mlp().state_dict().items()}
    if isinstance(state, dict) and {k: getattr(v, "shape", None) for k, v in state.items()} == expected:
        return state
    return None


def _audit_loaded(args: argparse.Namespace, config: dict[str, Any], out: TextIO) -> int:
    """The train/held-out membership attack on a saved model: a run directory of dptrain train or the demo (its
    model.pt or checkpoint.pt; the run's own split and claimed epsilon), or a state dict of the audit's MLP."""
    # the app layer, torch and the audits: loaded to run
    from dptrain.app.saved import load_trained
    from dptrain.audit.digits import digits_mlp
    from dptrain.audit.mia import loss_threshold_attack
    from dptrain.audit.training import classification_accuracy
    from dptrain.datasets import load_digits_split

    path = Path(args.load)
    weights = _audit_mlp_weights(path) if path.is_file() else None
    if weights is not None:
        (train, test), model = load_digits_split(), digits_mlp()
        model.load_state_dict(weights)
        claimed, delta = math.inf, config["delta"]
    else:
        trained = load_trained(path)
        train, test, model = trained.data.train, trained.data.test, trained.model
        claimed, delta = trained.claimed_epsilon, trained.delta or config["delta"]
    if args.claimed_epsilon is not None:
        claimed = args.claimed_epsilon
    result = loss_threshold_attack(
        model, train, test, claimed_epsilon=claimed, delta=delta, significance=config["significance"]
    )
    accuracy = classification_accuracy(model, test)
    if args.json:
        payload = {"model": args.load, "claimed_epsilon": None if math.isinf(claimed) else claimed,
                   "test_accuracy": accuracy, "membership": result.to_dict(args.curves),
                   "suspicious": result.violates_bound}
        print(json.dumps(payload), file=out)
    else:
        header = ["model", "claimed eps", "test acc", "MIA AUC", "TPR@0.1%", "TPR@1%", "MIA eps LB", "verdict"]
        row = [args.load, fmt(claimed, ".2f"), fmt(accuracy), *_mia_cells(result),
               "SUSPICIOUS" if result.violates_bound else "ok"]
        print(format_table([row], header), file=out)
        print("\n" + result.message(), file=out)
    return EXIT_SUSPICIOUS if result.violates_bound else 0


def run_audit_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``dptrain audit`` with parsed ``args``; print a table (or one JSON object with ``--json``) to ``out``."""
    import torch  # loaded to run, not for --help

    out = out or sys.stdout
    config = _resolve(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, getattr(args, "threads", 1)))
    try:
        if args.load:
            return _audit_loaded(args, config, out)
        return _audit_demo(args, config, out)
    finally:
        torch.set_num_threads(threads)


def _audit_demo(args: argparse.Namespace, config: dict[str, Any], out: TextIO) -> int:
    # the audits and torch: loaded to run
    from dptrain.audit.digits import digits_audit_data, make_digits_train_fn
    from dptrain.audit.gradient_canaries import GradientCanaries
    from dptrain.audit.mia import run_lira
    from dptrain.audit.one_run import PrivacyViolationWarning
    from dptrain.audit.training import audit_training_run

    train_set, test_set, canaries = digits_audit_data(config["canaries"], seed=config["seed"])
    runs: list[tuple[str, float | None]] = [("non-private", None)] if config["nonprivate"] else []
    runs += [(f"eps={e:g}", e) for e in config["epsilons"]]
    reports: list[TrainingAuditReport] = []
    liras: dict[str, LiRAAuditResult] = {}
    start = time.perf_counter()
    for name, epsilon in runs:
        train_fn = make_digits_train_fn(
            epsilon,
            delta=config["delta"],
            epochs=config["epochs"],
            batch_size=config["batch_size"],
            lr=config["lr"],
            max_grad_norm=config["max_grad_norm"],
            seed=config["seed"],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrivacyViolationWarning)  # reported in the table and the verdict below
            _, report = audit_training_run(
                train_fn,
                train_set,
                canaries,
                delta=config["delta"],
                test_set=test_set,
                num_positive_guesses=config["guesses"],
                num_negative_guesses=config["guesses"],
                significance=config["significance"],
                name=name,
                gradient_canaries=None if epsilon is None else GradientCanaries(seed=config["seed"]),
            )
        reports.append(report)
        if config["lira_models"]:
            liras[name] = run_lira(
                train_fn, train_set, num_models=config["lira_models"], delta=config["delta"], seed=config["seed"],
                significance=config["significance"],
            )
    suspicious = any(r.suspicious for r in reports) or any(l.suspicious for l in liras.values())
    if args.json:
        payload = {
            "config": config,
            "runs": [r.to_dict(args.curves) for r in reports],
            "lira": {name: l.to_dict(args.curves) for name, l in liras.items()},
            "suspicious": suspicious,
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps(payload), file=out)
    else:
        print(
            f"dptrain audit: digits MLP, {len(train_set)} training examples + {canaries.num_canaries} mislabelled "
            f"canaries (each included with prob. 1/2), {len(test_set)} held out; delta {config['delta']:g}, "
            f"{config['epochs']} epochs, confidence {1 - config['significance']:.0%}",
            file=out,
        )
        print(format_table([_report_row(r) for r in reports], HEADER), file=out)
        if liras:
            rows = [row for name, l in liras.items() for row in _lira_rows(name, l)]
            print("\nLiRA (" + str(config["lira_models"]) + " models per run, each the target in turn):", file=out)
            print(format_table(rows, LIRA_HEADER), file=out)
        for r in reports:
            if r.suspicious:
                print("\n" + r.message(), file=out)
        print(
            "\nMIA: loss-threshold attack, training set vs held-out set; canary: the same attack on the canaries; "
            "one-run: black-box input canaries; white-box: gradient canaries in the released noisy sums; "
            "eps LB: lower confidence bounds on epsilon (a correct run stays <= its claimed eps); "
            f"{'SUSPICIOUS runs leak more than they claim: probable implementation bug' if suspicious else 'no run exceeds its claimed epsilon'}. "
            f"({time.perf_counter() - start:.0f} s)",
            file=out,
        )
    return EXIT_SUSPICIOUS if suspicious else 0
