"""``dptrain experiment memorization|federated``.

``memorization``: does fine-tuning make a small GPT-2 repeat customers' secrets, with and without user-level DP?

Generates the synthetic support-chat corpus with canary pins (each repeated 1, 4 and 16 times by its user),
pre-trains a small GPT-2 on public conversations, fine-tunes copies non-privately and with user-level DP-SGD at
each ``--epsilon``, and reports validation perplexity, canary exposure and greedy extraction per run, with each DP
run's privacy ledger (fine-tuning vs evaluation). See ``dptrain.lm.memorization``.

``federated``: FedAvg on digits among 50 non-IID clients on Flower's simulation runtime, without DP, with
client-level DP at each ``--epsilon`` and with sample-level DP inside the clients. See
``dptrain.federated.experiment``.

Exit status 0 (the result, separated or not, is in the output); 2 for invalid options.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from typing import Any, TextIO

from dptrain.cli.common import fmt, format_table

EXPERIMENTS = ("memorization", "federated")
#: Options only the memorization experiment takes (refused for the federated one rather than ignored).
MEMORIZATION_ONLY = ("epochs", "users", "lora_rank", "exposure_samples", "ledger")
FEDERATED_ONLY = ("rounds", "clients")


def add_experiment_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``dptrain experiment`` to ``parser``: the experiment's name and its options."""
    parser.add_argument("experiment", choices=EXPERIMENTS, help="which experiment to run")
    parser.add_argument(
        "--quick", action="store_true", help="smaller corpus or fewer rounds: about 2 minutes on 2 CPU cores"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--epsilon", type=float, nargs="+", default=None,
        help="DP targets: user-level (memorization, default 8 3) or client-level (federated, default 1 3 8)",
    )  # fmt: skip
    parser.add_argument("--delta", type=float, default=None, help="delta of every DP run (default 1e-5)")
    parser.add_argument("--rounds", type=int, default=None, help="federated: rounds per setting (default 40, --quick 10)")
    parser.add_argument("--clients", type=int, default=None, help="federated: clients K (default 50)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 12)")
    parser.add_argument("--users", type=int, default=None, help="training users (default 1000, --quick 400)")
    parser.add_argument(
        "--lora-rank", type=int, default=None, help="fine-tune LoRA adapters of this rank (default 0: all weights)"
    )
    parser.add_argument("--exposure-samples", type=int, default=None, help="sampled candidates per canary exposure")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--ledger", metavar="PATH", default=None, help="record the DP runs in this ledger file (default: temporary)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser


def _check_targets(epsilons: tuple[float, ...], delta: float) -> None:
    if any(not (e > 0 and math.isfinite(e)) for e in epsilons):
        raise ValueError(f"--epsilon values must be finite and > 0, got {list(epsilons)}")
    if not 0 < delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {delta}")


def _config(args: argparse.Namespace) -> Any:
    from dptrain.lm.memorization import QUICK, MemorizationConfig  # torch and the LM stack: loaded to run

    config = QUICK if args.quick else MemorizationConfig()
    overrides: dict[str, Any] = {}
    if args.epsilon is not None:
        overrides["epsilons"] = tuple(float(e) for e in args.epsilon)
    options = {"delta": "delta", "epochs": "epochs", "users": "num_users", "lora_rank": "lora_rank",
               "exposure_samples": "exposure_samples", "seed": "seed"}  # fmt: skip
    for option, field_name in options.items():
        value = getattr(args, option, None)
        if value is not None:
            overrides[field_name] = value
    config = replace(config, **overrides)
    _check_targets(config.epsilons, config.delta)
    if config.epochs <= 0 or config.num_users <= len(config.canary_repeats) * config.canaries_per_level:
        raise ValueError("--epochs must be > 0 and --users larger than the number of canary users")
    if config.lora_rank < 0 or config.exposure_samples <= 0:
        raise ValueError("--lora-rank must be >= 0 and --exposure-samples > 0")
    return config


def format_report(result: dict[str, Any]) -> str:
    """The experiment's result as text: one row per model, the ledgers, the separation verdict."""
    levels = [g["repeats"] for g in result["runs"][0]["by_repeats"]]
    header = ["run", "eps (per user)", "val ppl", "released ppl", *[f"exposure x{r}" for r in levels], "extracted"]
    rows = []
    for run in result["runs"]:
        released = run.get("released_validation_perplexity")
        eps = run.get("epsilon_total")
        rows.append([
            run["name"],
            "-" if run["name"].startswith("public") else ("inf" if eps is None else fmt(eps, ".2f")),
            fmt(run["validation_perplexity"]),
            "-" if released is None else f"{released['perplexity']:.3f}",
            *[f"{g['mean_exposure']:.1f}" for g in run["by_repeats"]],
            " ".join(f"x{g['repeats']}:{g['extracted']}/{g['canaries']}" for g in run["by_repeats"]),
        ])  # fmt: skip
    corpus = result["corpus"]
    lines = [
        f"dptrain experiment memorization: {corpus['train_conversations']} conversations of {corpus['train_users']} "
        f"users (up to {corpus['max_conversations_per_user']} per user), {corpus['validation_users']} validation "
        f"users; {len(corpus['canaries'])} canary pins (6 digits, 10^6 candidates); GPT-2 with "
        f"{result['model']['total']} parameters"
        + (f", LoRA rank {rank}" if (rank := result["model"]["lora_rank"]) else ", all weights fine-tuned"),
        format_table(rows, header),
        "exposure: mean over the canaries repeated that often, in bits (max "
        f"{result['runs'][0]['canaries'][0]['max_exposure']:.1f}; ~1.4 for a model that knows nothing); extracted: "
        "greedy decoding from the canary's prompt writes its pin; released ppl: the validation perplexity released "
        "with user-level DP (charged to the run's budget); val ppl: the exact one, computed without noise, outside "
        "the guarantee (shown to judge the release; a deployment publishes released ppl only).",
        "",
        "privacy ledger (one user-level budget per DP run; entries composed with PLD):",
    ]
    for view in result["ledger"]["budgets"]:
        parts = [f"{e['phase']} {e['steps']} step(s) at q={e['sample_rate']:.3g}, sigma={e['noise_multiplier']:.3g} "
                 f"(eps {e['epsilon_alone']:.2f} alone)" for e in view["entries"]]  # fmt: skip
        lines.append(f"  {view['budget']}: spent {view['spent']:.3f} of {view['cap']:g} at delta {view['delta']:g} "
                     f"per {view['privacy_unit']}: " + "; ".join(parts))  # fmt: skip
    sep = result["separation"]
    if sep:
        verdict = "as expected" if sep["separated"] else "NOT as expected"
        lines.append(
            f"\nseparation ({verdict}): canaries repeated x{sep['repeats']}: mean exposure "
            f"{sep['nonprivate_mean_exposure']:.1f} bits without DP, at most {sep['max_dp_mean_exposure']:.1f} with "
            "DP; "
            f"extracted without DP: {', '.join(sep['nonprivate_extracted']) or 'none'}; with DP: "
            f"{', '.join(sep['dp_extracted']) or 'none'}"
        )
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)


def _federated_config(args: argparse.Namespace) -> Any:
    from dptrain.federated.experiment import QUICK, FederatedConfig  # Flower and torch: loaded to run

    config = QUICK if args.quick else FederatedConfig()
    options = {"epsilon": "epsilons", "delta": "delta", "rounds": "rounds", "clients": "num_clients", "seed": "seed"}
    overrides = {name: getattr(args, option) for option, name in options.items() if getattr(args, option) is not None}
    if "epsilons" in overrides:
        overrides["epsilons"] = tuple(float(e) for e in overrides["epsilons"])
    config = replace(config, **overrides)
    _check_targets(config.epsilons, config.delta)
    if config.rounds <= 0 or config.num_clients < 2:
        raise ValueError("--rounds must be > 0 and --clients >= 2")
    return config


def format_federated_report(result: dict[str, Any]) -> str:
    """The federated experiment's rows as a table, with what each privacy unit means."""
    config = result["config"]
    header = ["setting", "privacy unit", "eps", "delta", "rounds", "clients/round", "accuracy", "seconds"]
    rows = [
        [r["setting"], r["privacy_unit"], "inf" if r["epsilon"] is None else fmt(r["epsilon"], ".2f"),
         "-" if r["delta"] is None else f"{r['delta']:g}", str(r["rounds"]), f"{r['clients_per_round']:.1f}",
         f"{r['accuracy']:.3f}", f"{r['seconds']:.0f}"]
        for r in result["rows"]
    ]  # fmt: skip
    return "\n".join([
        f"dptrain experiment federated: digits among K={config['num_clients']} clients (Dirichlet alpha "
        f"{config['alpha']:g} over labels), Poisson client sampling q={config['sample_rate']:g}, {config['rounds']} "
        f"rounds, {config['local_epochs']} local epochs; Flower simulation runtime; accuracy on the held-out 20%",
        format_table(rows, header),
        "client: epsilon over clients (a client with all its data), DP-FedAvg with updates clipped to "
        f"{config['max_norm']:g}; example: each client's DP-SGD, the largest client's epsilon over its own rounds. "
        f"delta {config['delta']:g} is far below 1/K = {1 / config['num_clients']:.2g}: no replication needed.",
        f"({result['seconds']:.0f} s)",
    ])  # fmt: skip


def run_experiment_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``dptrain experiment <name>`` with parsed ``args``; print a report (or one JSON object with ``--json``)
    to ``out`` and progress to ``err`` (stderr) unless ``--json``. Raises ValueError for invalid options."""
    import torch  # loaded to run, not for --help

    out = out or sys.stdout
    err = err or sys.stderr
    experiment = getattr(args, "experiment", "memorization")
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; choose from {EXPERIMENTS}")
    foreign = MEMORIZATION_ONLY if experiment == "federated" else FEDERATED_ONLY
    misplaced = [f"--{o.replace('_', '-')}" for o in foreign if getattr(args, o, None) is not None]
    if misplaced:
        raise ValueError(f"{', '.join(misplaced)}: not an option of the {experiment} experiment")
    config = _federated_config(args) if experiment == "federated" else _config(args)
    if args.threads <= 0:
        raise ValueError("--threads must be >= 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        log = None if args.json else (lambda line: print(line, file=err, flush=True))
        if experiment == "federated":
            from dptrain.federated.experiment import run_federated_experiment  # Flower: loaded to run

            result = run_federated_experiment(config, log=log)
        else:
            from dptrain.lm.memorization import run_memorization_experiment  # the LM stack: loaded to run

            result = run_memorization_experiment(config, ledger_path=args.ledger, log=log)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        print(json.dumps(result), file=out)
    else:
        print((format_federated_report if experiment == "federated" else format_report)(result), file=out)
    return 0
