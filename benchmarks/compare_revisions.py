"""Has a change slowed the DP step? dptrain auto's step time at two revisions, side by side, as ratios.

Not a test: a measuring tool (issue #8's "no check may slow the benchmark models' steps by more than 3%"). It checks
out ``--base`` into a temporary git worktree and runs that revision's ``benchmarks/speed.py`` child (its own engine
and its own benchmark step, through ``PYTHONPATH``) alternately with the working tree's, one fresh subprocess per
measurement. Each measurement is dptrain auto's step time over the non-private step of the same model, the two
alternating step by step in one process (``speed.py``'s paired ratio), so machine load cancels out of each figure;
the rounds alternate base and head so that slow drifts hit both. Reported per model: the median paired ratio at
each revision and head / base (1.00 = no change; 1.03 = 3 % slower).

Usage:
    python benchmarks/compare_revisions.py --base f2e473a
    python benchmarks/compare_revisions.py --base HEAD~3 --models mlp,cnn --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("mlp", "cnn", "lm", "gpt2", "gpt2-mid")


def paired_ratio(tree: Path, model: str, args: argparse.Namespace) -> float | None:
    """dptrain auto / non-private median step time of ``model``, with the engine and benchmark of ``tree``."""
    cmd = [
        sys.executable, str(tree / "benchmarks" / "speed.py"),
        "--child-model", model, "--child-engine", "dptrain-auto", "--device", args.device,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
    ]  # fmt: skip
    env = {"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=args.time_box)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            return result.get("ratio")
    print(f"    {tree.name} {model}: no result ({(proc.stderr.strip().splitlines() or ['?'])[-1][:90]})", flush=True)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare the working tree with")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated speed.py models")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per model and revision (median kept)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--time-box", type=float, default=300.0, help="seconds per measurement")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]

    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base],
                       check=True, capture_output=True)  # fmt: skip
        try:
            ratios: dict[str, dict[str, list[float]]] = {m: {"base": [], "head": []} for m in models}
            for r in range(args.rounds):
                order = (("base", base_tree), ("head", REPO)) if r % 2 == 0 else (("head", REPO), ("base", base_tree))
                for model in models:
                    for name, tree in order:
                        ratio = paired_ratio(tree, model, args)
                        if ratio is not None:
                            ratios[model][name].append(ratio)
                            print(f"  [round {r + 1}] {model:8s} {name}: {ratio:.3f}x non-private", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)

    print(f"\ndptrain auto step / non-private step (median of {args.rounds} paired measurements), base {args.base}")
    print(f"{'model':8s}  {'base':>6s}  {'head':>6s}  {'head/base':>9s}")
    for model in models:
        base, head = ratios[model]["base"], ratios[model]["head"]
        if not base or not head:
            print(f"{model:8s}  {'-':>6s}  {'-':>6s}  {'-':>9s}")
            continue
        b, h = statistics.median(base), statistics.median(head)
        print(f"{model:8s}  {b:6.3f}  {h:6.3f}  {h / b:9.3f}")


if __name__ == "__main__":
    main()
