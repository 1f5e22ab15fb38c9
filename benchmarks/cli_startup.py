"""How fast the command line answers: wall time of a fresh process for `dptrain --help`, each subcommand's --help,
and `dptrain epsilon` next to the same dp_accounting computation run bare, median of several runs.

Not a test (timings are machine-dependent): issue #9's targets are --help under 1 s on 2 cores and accounting
commands at most 0.5 s over the bare dp_accounting computation. Usage: python benchmarks/cli_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
EPSILON = ["--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "10000", "--delta", "1e-5"]
BARE = (
    "import dp_accounting\n"
    "a = dp_accounting.pld.PLDAccountant()\n"
    "a.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.01, "
    "dp_accounting.GaussianDpEvent(1.0)), 10000))\n"
    "print(a.get_epsilon(1e-5))"
)


def wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    dptrain = [str(BIN / "dptrain")]
    rows = [("dptrain --help", wall([*dptrain, "--help"], args.runs))]
    for command in ("demo", "train", "report", "epsilon", "calibrate", "audit", "experiment"):
        rows.append((f"dptrain {command} --help", wall([*dptrain, command, "--help"], args.runs)))
    bare = wall([sys.executable, "-c", BARE], args.runs)
    epsilon = wall([*dptrain, "epsilon", *EPSILON], args.runs)
    rows += [("bare dp_accounting epsilon", bare), ("dptrain epsilon (same computation)", epsilon)]
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:6.2f} s")
    print(f"{'dptrain epsilon - bare':<{width}}  {epsilon - bare:+6.2f} s")


if __name__ == "__main__":
    main()
