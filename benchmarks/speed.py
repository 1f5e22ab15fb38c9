"""Step time and peak memory of DP-SGD steps, side by side: non-private, dptrain (auto, vmap), every Opacus mode.

Not a test: a measuring tool (issue #4). Each configuration (model x engine) runs in a fresh subprocess, so that
memory figures do not bleed into each other and a crash or a hang of one engine cannot take the others down.

A step is ``zero_grad + forward + loss + backward + optimizer.step()``; for DP engines the step is the full DP step
(per-example clipping, Gaussian noise with noise_multiplier 1.0, averaging). Every step sees the same fixed batch
(no Poisson sampling: dptrain gets ``poisson_sampling=False``), so the timings compare engines, not batch sizes.
Reported: the median step time over ``--steps`` steps after ``--warmup`` warm-up steps; its ratio to the non-private
step of the same model, measured paired (the two alternate step by step in one process, so that both see the same
machine load); and the peak memory growth of a steady-state step (see benchmarks/README.md for the method).

Usage:
    python benchmarks/speed.py                       # all models, CPU
    python benchmarks/speed.py --models mlp,lm --steps 20
    python benchmarks/speed.py --quick               # fewer steps, shorter time box
    python benchmarks/speed.py --device cuda         # larger sizes (GPT-2 small config, batch 64)
    python benchmarks/speed.py --profile lm          # where dptrain auto's time goes on one model
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

MODELS = ("mlp", "cnn", "lm", "gpt2", "gpt2-mid", "nanogpt-style")
ENGINES = (
    "non-private",
    "dptrain-auto",
    "dptrain-vmap",
    "opacus-hooks",
    "opacus-functorch",
    "opacus-ew",
    "opacus-ghost",
)
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 0.01


# --------------------------------------------------------------------------------------------------------------------
# Models (the same architectures and batch sizes as the Opacus anchors in GUIDE.md section 2)
# --------------------------------------------------------------------------------------------------------------------


def build(model_name: str, device: str):
    """(model, inputs, targets, loss_fn) for one fixed batch. loss_fn(model, inputs, targets) -> scalar (mean)."""
    torch.manual_seed(0)
    large = device == "cuda"

    def classification(model, x, y):
        return F.cross_entropy(model(x), y)

    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(100, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2))
        batch = 256
        x, y = torch.randn(batch, 100), torch.randint(0, 2, (batch,))
        loss_fn = classification
    elif model_name == "cnn":
        # Opacus' MNIST example: conv16 8x8/2 pad 3, maxpool 2/1, conv32 4x4/2, maxpool 2/1, fc 512->32, fc 32->10.
        model = nn.Sequential(
            nn.Conv2d(1, 16, 8, 2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), nn.Tanh(), nn.MaxPool2d(2, 1), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
        )  # fmt: skip
        batch = 256
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        loss_fn = classification
    elif model_name == "lm":
        vocab, steps, batch = 256, 64, 32
        model = TransformerLM(vocab=vocab, dim=128, layers=2, max_len=steps)
        x, y = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))

        def loss_fn(model, x, y):
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    elif model_name in ("gpt2", "gpt2-mid"):
        from transformers import GPT2Config, GPT2LMHeadModel

        if model_name == "gpt2-mid":  # between tiny and small (any device): per-layer fixed costs stop dominating
            config = GPT2Config(
                n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=64, bos_token_id=0, eos_token_id=0
            )
            batch, steps = 16, 64
        elif large:  # GPT-2 small (124M)
            config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
            batch, steps = 64, 128
        else:  # the tiny config of the tests
            config = GPT2Config(
                n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0
            )
            batch, steps = 16, 16
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        model = GPT2LMHeadModel(config)
        x = torch.randint(0, config.vocab_size, (batch, steps))
        y = torch.randint(0, config.vocab_size, (batch, steps))

        def loss_fn(model, x, y):
            return F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())

    elif model_name == "nanogpt-style":
        # The GPT of tests/nanogpt.py (issue #10): its own F.layer_norm LayerNorm, unbatched position ids, SDPA,
        # tied head, the loss computed inside forward. 2 layers, d=128, T=64, batch 16 (the same on CUDA).
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from nanogpt import GPT, GPTConfig

        vocab, steps, batch = 256, 64, 16
        model = GPT(GPTConfig(block_size=steps, vocab_size=vocab, n_layer=2, n_head=4, n_embd=128))
        x, y = torch.randint(0, vocab, (batch, steps)), torch.randint(0, vocab, (batch, steps))

        def loss_fn(model, x, y):
            return model(x, y)[1]

    else:
        raise ValueError(f"unknown model {model_name!r}; choose from {MODELS}")
    if large and model_name in ("mlp", "cnn"):
        batch = 1024
        x, y = torch.cat([x] * 4), torch.cat([y] * 4)
    if large and model_name == "lm":
        x, y = torch.cat([x] * 4), torch.cat([y] * 4)
    model.train()
    return model.to(device), x.to(device), y.to(device), loss_fn


class TransformerLM(nn.Module):
    """Token + position embeddings (position ids expanded to the batch), nn.TransformerEncoder, linear head."""

    def __init__(self, vocab: int, dim: int, layers: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return self.head(self.encoder(self.embed(tokens) + self.position(positions)))


# --------------------------------------------------------------------------------------------------------------------
# One configuration, in a child process
# --------------------------------------------------------------------------------------------------------------------


class _HeapPeak(TorchDispatchMode):
    """Samples the C heap's bytes in use (glibc mallinfo2: small chunks plus mmapped blocks, where torch's CPU
    allocator gets its memory) after every torch op, forward and backward, and keeps the maximum."""

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )]  # fmt: skip

    @classmethod
    def in_use(cls) -> int:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = cls._MallInfo2
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        self.baseline = self.peak = self.in_use()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def make_step(engine: str, model, x, y, loss_fn):
    """(step, optimizer, compute_loss): ``step()`` does one full training step of ``engine`` on the fixed batch."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    criterion = None
    fresh_batch = lambda: None  # noqa: E731
    if engine.startswith("dptrain-"):
        from dptrain import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # poisson_sampling=False warns that the accounting is not proven
            model, optimizer, private_loader = PrivacyEngine().make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
                poisson_sampling=False,
                grad_sample_mode=engine.split("-", 1)[1],
            )
            # Every step must consume a fresh batch of the private loader. The benchmark reuses its one fixed batch
            # (as the other engines do) and announces it as the private loader does, without collating it again.
            fresh_batch = functools.partial(private_loader.signal.begin_chunk, len(x), True)
    elif engine.startswith("opacus-"):
        from opacus import PrivacyEngine as OpacusEngine
        from opacus.validators import ModuleValidator

        mode = engine.split("-", 1)[1]
        model = ModuleValidator.fix(model)  # as Opacus users must (e.g. nn.MultiheadAttention -> DPMultiheadAttention)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        kwargs = dict(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        if mode == "ghost":
            model, optimizer, criterion, _ = OpacusEngine().make_private(
                criterion=torch.nn.CrossEntropyLoss(), **kwargs
            )
        else:
            model, optimizer, _ = OpacusEngine().make_private(**kwargs)
    elif engine != "non-private":
        raise ValueError(f"unknown engine {engine!r}")

    if criterion is not None:
        # Opacus' ghost clipping needs its own loss wrapper (it runs the second backward inside loss.backward()).
        def compute_loss():
            out = model(x)
            out = out.logits if hasattr(out, "logits") else out
            return criterion(out.flatten(0, 1) if out.dim() == 3 else out, y.flatten() if out.dim() == 3 else y)

    else:

        def compute_loss():
            return loss_fn(model, x, y)

    def step():
        fresh_batch()
        optimizer.zero_grad()
        loss = compute_loss()
        loss.backward()
        optimizer.step()

    return step, optimizer, compute_loss


def run_one(model_name: str, engine: str, device: str, steps: int, warmup: int, threads: int) -> dict:
    """Peak memory of ``engine``'s steps, then its median step time paired with a non-private copy of the model.

    Pairing: the two steps alternate, so both see the same machine load, and the ratio is of the two medians.
    """
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step, optimizer, _ = make_step(engine, *build(model_name, device))
    reference = make_step("non-private", *build(model_name, device))[0] if engine != "non-private" else None
    sync()
    # Memory: the peak growth of one steady-state step (after the engine's warm-up steps) over the memory in use
    # before it: on CPU the C heap in use sampled after every torch op, on CUDA torch's peak allocation.
    for _ in range(max(warmup, 1)):
        step()
    # Every engine starts the measured step from the same state: no gradients (nor Opacus' per-sample ones) held.
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
        step()
        sync()
        peak_mb = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        with _HeapPeak() as heap:
            step()
        peak_mb = (heap.peak - heap.baseline) / 2**20
    if reference is not None:
        for _ in range(max(warmup, 1)):
            reference()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    times, reference_times = [], []
    for _ in range(steps):
        if reference is not None:
            reference_times.append(timed(reference))
        times.append(timed(step))
    result = {"median_s": statistics.median(times), "min_s": min(times), "peak_mb": peak_mb}
    if reference is not None:
        result["reference_median_s"] = statistics.median(reference_times)
        result["reference_min_s"] = min(reference_times)
        result["ratio"] = result["median_s"] / result["reference_median_s"]
        result["ratio_min"] = result["min_s"] / result["reference_min_s"]
    return result


def _short(err: BaseException | str) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    name = type(err).__name__ if isinstance(err, BaseException) else ""
    return (f"{name}: {first}" if name else first)[:90]


def child_main(args: argparse.Namespace) -> None:
    try:
        result = run_one(args.child_model, args.child_engine, args.device, args.steps, args.warmup, args.threads)
    except Exception as err:  # report any engine failure as a table cell, never abort the benchmark
        result = {"crash": _short(err)}
    print("RESULT " + json.dumps(result), flush=True)


def run_in_subprocess(model_name: str, engine: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__),
        "--child-model", model_name, "--child-engine", engine,
        "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--threads", str(args.threads),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_box)
    except subprocess.TimeoutExpired:
        return {"crash": f"timeout after {args.time_box:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"crash": tail[:90]}


# --------------------------------------------------------------------------------------------------------------------
# Profile of dptrain auto on one model
# --------------------------------------------------------------------------------------------------------------------


def profile(model_name: str, args: argparse.Namespace) -> None:
    """cProfile (which dptrain functions take the time) and torch.profiler (which ops) of dptrain auto steps."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    baseline = make_step("non-private", *build(model_name, args.device))[0]
    step, optimizer, compute_loss = make_step("dptrain-auto", *build(model_name, args.device))
    for _ in range(args.warmup):
        step()
        baseline()
    timings = {"non-private": [], "dptrain-auto": []}
    for _ in range(args.steps):
        for name, fn in (("non-private", baseline), ("dptrain-auto", step)):
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    base, auto = (statistics.median(timings[k]) for k in ("non-private", "dptrain-auto"))
    print(f"{model_name}: non-private {base * 1e3:.1f} ms, dptrain auto {auto * 1e3:.1f} ms ({auto / base:.2f}x)\n")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(r"dptrain|speed\.py|autograd/__init__|_tensor\.py:.*backward", 25)
    print(f"== cProfile: dptrain auto, {model_name}, {args.steps} steps (cumulative seconds per function) ==")
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    print("\n".join(lines[start:]))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(args.steps):
            optimizer.signal.begin_chunk(optimizer.signal.chunk_size, True)  # a fresh batch, as the loader announces it
            with record_function("1.zero_grad"):
                optimizer.zero_grad()
            with record_function("2.forward+loss"):
                loss = compute_loss()
            with record_function("3.backward (with hooks)"):
                loss.backward()
            with record_function("4.dp_optimizer.step (norms, clipped sum, noise)"):
                optimizer.step()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=50)
    print(f"\n== torch.profiler: dptrain auto, {model_name}: phases and top ops by total CPU time ==")
    print(table)


# --------------------------------------------------------------------------------------------------------------------
# Main: run every configuration, print the tables
# --------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES))
    parser.add_argument("--steps", type=int, default=10, help="measured steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the anchors used 2)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every configuration; each figure keeps its best round")
    parser.add_argument("--time-box", type=float, default=None, help="seconds per configuration (default 150)")
    parser.add_argument("--quick", action="store_true", help="6 steps, 2 warm-up, 60 s per configuration")
    parser.add_argument("--profile", metavar="MODEL", help="profile dptrain auto on MODEL instead of the table")
    parser.add_argument("--json", metavar="PATH", help="also write all results to PATH")
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = min(args.steps, 6), min(args.warmup, 2)
    if args.time_box is None:
        args.time_box = 60.0 if args.quick else 150.0
    if args.child_model:
        child_main(args)
        return
    if args.profile:
        profile(args.profile, args)
        return

    models = [m for m in args.models.split(",") if m]
    engines = [e for e in args.engines.split(",") if e]
    if "non-private" not in engines:
        engines.insert(0, "non-private")
    results: dict[str, dict[str, dict]] = {m: {} for m in models}
    started = time.time()
    print(
        f"device={args.device} threads={args.threads} steps={args.steps} warmup={args.warmup} rounds={args.rounds} "
        f"time_box={args.time_box:.0f}s",
        flush=True,
    )
    for r in range(args.rounds):
        for model_name in models:
            for engine in engines:
                load = _load_average()
                res = run_in_subprocess(model_name, engine, args)
                res["load_before"] = load
                results[model_name][engine] = _best_of(results[model_name].get(engine), res)
                cell = res.get("crash") or (
                    f"{res['median_s'] * 1e3:.1f} ms, +{res['peak_mb']:.1f} MB"
                    + (f", non-private {res['reference_median_s'] * 1e3:.1f} ms -> {res['ratio']:.2f}x" if "ratio" in res else "")
                )
                print(f"  [round {r + 1}] {model_name:8s} {engine:17s} {cell} (load {load:.1f})", flush=True)
    print(f"(total {time.time() - started:.0f} s)\n")
    print_tables(results, models, engines)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _load_average() -> float:
    """1-minute load average: other processes on the machine distort CPU timings, so it is printed with each."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _best_of(kept: dict | None, new: dict) -> dict:
    """Merge rounds: each figure keeps its lowest value over the rounds that ran (load only ever adds time)."""
    if kept is None or "crash" in kept:
        return new
    if "crash" in new:
        return kept
    return {key: min(kept[key], new[key]) if isinstance(new.get(key), float) else new[key] for key in new}


def print_tables(results: dict, models: list[str], engines: list[str]) -> None:
    width = max(17, *(len(e) for e in engines))
    header = "model".ljust(9) + "".join(e.rjust(width) for e in engines)

    def cell_of(model_name: str, engine: str, kind: str) -> str:
        res = results[model_name].get(engine, {"crash": "not run"})
        if "crash" in res:
            return "crash"
        if kind == "ms":
            return f"{res['median_s'] * 1e3:.1f}"
        if kind in ("ratio", "ratio_min"):
            return f"{res[kind]:.2f}x" if kind in res else "1.00x"
        return f"{res['peak_mb']:.1f}"

    titles = (
        ("median step time (ms)", "ms"),
        ("ratio to non-private (paired: medians of alternating steps in the same process)", "ratio"),
        ("ratio to non-private, fastest steps (paired minima: least disturbed by other processes)", "ratio_min"),
        ("peak memory growth of a steady-state step (MB)", "mb"),
    )
    for title, kind in titles:
        print(f"{title}\n{header}")
        for model_name in models:
            print(model_name.ljust(9) + "".join(cell_of(model_name, e, kind).rjust(width) for e in engines))
        print()
    crashes = [
        (m, e, results[m][e]["crash"]) for m in models for e in engines if "crash" in results[m].get(e, {})
    ]
    if crashes:
        print("crashes:")
        for m, e, reason in crashes:
            print(f"  {m} {e}: crash: {reason}")
        print()
    print(
        "targets (dptrain-auto / non-private <= 1.25x; dptrain-auto faster than every Opacus mode that runs; "
        "peak step memory <= 1.3x non-private):"
    )
    for model_name in models:
        res = results[model_name]
        auto = res.get("dptrain-auto", {})
        if "ratio" not in auto:
            print(f"  {model_name}: dptrain-auto did not run")
            continue
        verdicts = []
        for kind, label in (("ratio", "medians"), ("ratio_min", "minima")):
            ratio = auto[kind]
            opacus = {e: r[kind] for e, r in res.items() if e.startswith("opacus-") and kind in r}
            beaten = all(ratio < r for r in opacus.values())
            fastest = min(opacus, key=opacus.get) if opacus else None
            verdicts.append(
                f"{label}: {ratio:.2f}x {'PASS' if ratio <= 1.25 else 'FAIL'}, vs Opacus {'PASS' if beaten else 'FAIL'}"
                + (f" (best Opacus {fastest.split('-')[1]} {opacus[fastest]:.2f}x)" if fastest else " (none ran)")
            )
        base_mb = res.get("non-private", {}).get("peak_mb")
        if base_mb:
            memory = auto["peak_mb"] / base_mb
            verdicts.append(f"memory: {memory:.2f}x {'PASS' if memory <= 1.3 else 'FAIL'}")
        print(f"  {model_name}: " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
