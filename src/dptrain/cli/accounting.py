"""``dptrain epsilon`` and ``dptrain calibrate``: accounting only (no torch; dp_accounting only to compute)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from dptrain.cli.common import ACCOUNTANTS, EXIT_OK, add_json_flag, add_step_arguments, emit, subcommand


def add_epsilon(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "epsilon",
        "epsilon of a DP-SGD run (Poisson-sampled Gaussian steps) at a given delta",
        "dptrain epsilon --sample-rate 0.01 --noise-multiplier 1.0 --steps 10000 --delta 1e-5 --json",
    )
    add_step_arguments(p)
    p.add_argument("--delta", type=float, required=True, metavar="D")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="pld", help="pld (tight, default) or rdp")
    add_json_flag(p)
    p.set_defaults(handler=_run_epsilon)


def _run_epsilon(args: argparse.Namespace) -> int:
    from dptrain.accounting import compute_epsilon  # dp_accounting: loaded to compute, not to parse options

    if args.noise_multiplier == 0:
        raise ValueError("--noise-multiplier 0 adds no noise: the run is not private (epsilon is infinite)")
    eps = compute_epsilon(
        args.sample_rate, args.noise_multiplier, args.steps, args.delta, args.accountant, args.group_size
    )
    group = f", groups of up to {args.group_size} examples" if args.group_size > 1 else ""
    emit(
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


def add_calibrate(subparsers: Any) -> None:
    p = subcommand(
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
    add_json_flag(p)
    p.set_defaults(handler=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from dptrain.accounting import calibrate_noise, compute_epsilon  # dp_accounting: loaded to compute

    steps = args.steps
    if args.epochs is not None:
        if not (0 < args.sample_rate <= 1 and 0 < args.epochs < math.inf):
            raise ValueError("--epochs needs a finite number of epochs > 0 and a sample rate in (0, 1]")
        # round() first so that e.g. 3 epochs at rate 0.1 are 30 steps, not 31 from 30.000000000000004
        steps = math.ceil(round(args.epochs / args.sample_rate, 6))
    started = time.monotonic()

    def progress(sigma: float, epsilon: float) -> None:  # after a second, each evaluation on stderr
        if time.monotonic() - started > 1.0:
            print(f"  calibrating: noise multiplier {sigma:.5g} gives epsilon {epsilon:.5g} (target "
                  f"{args.target_epsilon:g})", file=sys.stderr, flush=True)

    sigma = calibrate_noise(args.target_epsilon, args.delta, args.sample_rate, steps, args.accountant,
                            progress=progress)
    eps = compute_epsilon(args.sample_rate, sigma, steps, args.delta, args.accountant)
    emit(
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
