"""Privacy-utility benchmark on scikit-learn's digits: test accuracy by epsilon, dptrain's recipe against Opacus.

Not a test: a measuring tool. It prints test accuracy (mean +- std over seeds) at each epsilon (delta = 1e-5) and
without privacy, for

* ``dptrain recipe``   -- the recipe below, chosen by experiment (see "How the recipe was chosen");
* ``dptrain demo``     -- dptrain with the hand-tuned settings that Opacus gets (the pre-existing demo recipe), to
                          separate what the engine/accountant gives from what the recipe gives;
* optional (``--engines``): ``opacus-recipe`` (Opacus with this recipe) and ``opacus-probe`` (Opacus with the
  settings of shared/anchors/utility_probe_fixedscale.py, which produced the anchor's 90.1 / 93.6 / 95.7);
* ``opacus hand-tuned`` -- Opacus 1.6 ``make_private_with_epsilon`` (PRV accountant, Poisson sampling) with the
                          hand-tuned settings of GUIDE.md section 2: MLP 64-128-10 (ReLU), pixels / 16, Adam lr 0.01,
                          batch 700, 50 epochs, max_grad_norm 1.

All three use the same split: ``load_digits``, ``train_test_split(test_size=0.2, stratify=y, random_state=0)``
(1437 train / 360 test). The test set is only used for this report.

The recipe (one setting for every epsilon; nothing is tuned per epsilon)
-------------------------------------------------------------------------
* Preprocessing: pixels scaled by their known range (0..16) and centred: ``x = 2 * pixel / 16 - 1`` in [-1, 1].
  Data-independent: no statistic of the private data is computed, so it costs no privacy.
* Model: MLP 64-32-10 with tanh (2,410 parameters). A small model: the noise norm grows with the number of
  parameters, and a 32-unit hidden layer already fits digits well.
* Loss: cross-entropy (mean reduction).
* Optimizer: DP-Adam, lr 0.02 (betas 0.9/0.999), max_grad_norm C = 1, constant learning rate, no weight decay.
* Sampling: Poisson with sample rate 1/2 (DataLoader batch size ceil(N/2) = 719, i.e. 2 steps per epoch, expected
  batch 718.5), 100 epochs = 200 noisy steps. Larger batches with more steps: the noise on the averaged gradient
  is sigma * C / (q N), and sigma grows only like sqrt(steps) at fixed epsilon.
* Accountant: dptrain's PLD (noise calibrated by ``make_private_with_epsilon``).
* The final iterate is evaluated (an exponential moving average of the iterates, which is free post-processing,
  was measured and did not help on this problem; see below).

How the recipe was chosen
-------------------------
Every candidate was trained on 80% of the training set (1149 examples, ``train_test_split(x_train, y_train,
test_size=0.2, stratify=y_train, random_state=0)``) and scored on the remaining 20% (288 examples), mean of seeds
0, 1, 2 at eps 1, 3 and 8; the recipe with the best mean validation accuracy over the three epsilons was kept. The
test set was not looked at during the search. The search itself (about 50 configurations x 3 eps x 3 seeds on the
training data) is NOT charged to the privacy budget: it is excluded, as the issue allows, and is documented here.
To charge it, run the search on public data or pay for it with a DP selection mechanism. Rerun the recipe on
that validation split with ``--validation``.

What was measured (validation accuracy, eps 1 / 3 / 8, mean of 3 seeds, N = 1149):

    demo recipe (MLP 64-128-10 ReLU, pixels/16, Adam 0.01, q = 1/2, 50 epochs)     82.8 / 91.1 / 93.4
      same, 100 epochs (200 steps)                                                  84.1 / 92.6 / 94.8
      same, full batch (q = 1), 200 steps                                           84.6 / 92.7 / 94.8
      pixels centred to [-1, 1]                                                     87.5 / 92.7 / 94.3
      tanh, 100 epochs, centred                                                     87.5 / 93.5 / 95.8
      width 64 / 256 (tanh, centred, 100 epochs)                             88.1 / 94.3 / 95.8, 87.3 / 93.2 / 95.4
      2 hidden layers of 32                                                         86.6 / 92.8 / 94.2
    linear softmax, centred, full batch, Adam 0.05, 100 steps                       89.2 / 94.0 / 95.5
      Adam 0.1 / 0.2                                                         87.3 / 93.2 / 95.1, 82.3 / 90.2 / 93.6
      DP-SGD momentum 0.9, lr 1 / 3 (C = 1)                                  78.7 / 92.4 / 95.7, 75.2 / 87.6 / 94.3
      image + its x/y differences (192 features), Adam 0.1                          86.6 / 92.9 / 94.9
      label smoothing 0.1                                                           86.8 / 92.7 / 94.4
      cosine learning-rate schedule                                                 89.4 / 92.7 / 95.0
    ** MLP 64-32-10 tanh, centred, Adam 0.02, q = 1/2, 100 epochs (chosen) **       91.0 / 94.4 / 96.1
      width 16 / 48                                                          88.5 / 92.7 / 95.1, 89.9 / 94.6 / 95.8
      lr 0.01                                                                       89.4 / 94.6 / 95.3
      q = 1 (150 steps) / q = 1/4 (50 epochs, 200 steps)                     89.4 / 94.6 / 96.2, 90.3 / 94.6 / 96.0
      C = 0.3 / C = 3                                                        89.6 / 94.8 / 96.1, 90.5 / 94.3 / 95.6
      EMA of the iterates (decay 0.9)                                               89.7 / 94.2 / 96.1
      pixels / 16 without centring                                                  89.9 / 94.4 / 95.6
      DP-SGD momentum lr 2                                                          34.1 / 63.3 / 79.3
      400 steps: 200 epochs lr 0.01 / 0.02; q = 1/4, 100 epochs, lr 0.01     89.5 / 94.1 / 96.2, 86.8 / 93.5 / 96.2,
                                                                                    89.4 / 93.9 / 96.1
    non-private (validation): demo MLP 96.5, centred 97.0, linear 96.4

Many variants around the chosen one are within the noise of a 288-example validation set (one example = 0.35%);
the chosen recipe had the best mean. Augmentation multiplicity with whole-pixel shifts (K = 4 copies, log-probs
averaged per example before clipping) lowered even non-private validation accuracy to 88%: 1-pixel shifts of an
8x8 digit are too large, so it was dropped.

Result on the test split (3 seeds, 1 thread, one run = 3-10 s): eps 0.5 / 1 / 3 / 8 / non-private
    dptrain recipe                 84.5 / 89.6 / 94.3 / 95.8 / 97.2
    dptrain, hand-tuned settings   76.3 / 85.2 / 92.5 / 94.4 / 96.6
    opacus, hand-tuned settings    78.2 / 84.4 / 91.9 / 94.2 / 96.6
    opacus, dptrain recipe         84.1 / 90.1 / 94.2 / 95.3
    opacus, anchor probe           80.8 / 90.1 / 93.6 / 95.6        (reproduces the anchor 90.1 / 93.6 / 95.7)
The issue's targets (92 / 95 / 96.5 at eps 1 / 3 / 8) are NOT met: -2.4 / -0.7 / -0.7 points. Against the anchor
probe the recipe is within seed noise at eps 1 and 8 (std 0.4-2.3 points), +0.7 at eps 3, +3.7 at eps 0.5.

Usage:
    python benchmarks/utility.py                  # 3 seeds, eps 0.5 1 3 8 and non-private (a few minutes)
    python benchmarks/utility.py --quick          # 1 seed, eps 1 and 8
    python benchmarks/utility.py --seeds 5 --eps 1 3
    python benchmarks/utility.py --validation     # the recipe on the validation split used to choose it
    python benchmarks/utility.py --engines dptrain-recipe,opacus
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DELTA = 1e-5
PIXEL_MAX = 16.0  # known range of the digits' pixels (0..16): scaling by it looks at no data
TARGETS = {1.0: 0.92, 3.0: 0.95, 8.0: 0.965}  # dptrain recipe, test accuracy (issue)
ENGINES = ("dptrain-recipe", "dptrain-demo", "opacus", "opacus-recipe", "opacus-probe")
DEFAULT_ENGINES = ENGINES[:3]


@dataclass(frozen=True)
class Recipe:
    """One training recipe. ``sample_rate`` sets the data loader's batch size to ceil(N * sample_rate)."""

    name: str
    hidden: int
    activation: type[nn.Module]
    centre: float  # 0: features pixel / 16; c > 0: c * (pixel / 16 - 0.5)
    lr: float
    sample_rate: float
    epochs: int
    max_grad_norm: float

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), self.activation(), nn.Linear(self.hidden, 10))

    def features(self, pixels: np.ndarray) -> torch.Tensor:
        x = pixels / PIXEL_MAX
        if self.centre:
            x = self.centre * (x - 0.5)
        return torch.tensor(x, dtype=torch.float32)

    def batch_size(self, n: int) -> int:
        return math.ceil(n * self.sample_rate)


RECIPE = Recipe("dptrain recipe", hidden=32, activation=nn.Tanh, centre=2.0, lr=0.02, sample_rate=0.5,
                epochs=100, max_grad_norm=1.0)
# The hand-tuned settings of GUIDE.md section 2 (and dptrain's demo): batch 700 of 1437 -> 3 steps per epoch, so
# Poisson sampling (both engines use q = 1 / len(loader)) draws q = 1/3, an expected batch of 479.
HAND_TUNED = Recipe("hand-tuned", hidden=128, activation=nn.ReLU, centre=0.0, lr=0.01, sample_rate=700 / 1437,
                    epochs=50, max_grad_norm=1.0)
# shared/anchors/utility_probe_fixedscale.py, where the anchor's 90.1 / 93.6 / 95.7 came from: inputs
# 3 * (pixel / 16 - 0.5), MLP 64-64-10 tanh, Adam lr 0.01, batch 700, 50 epochs (the probe shuffles; here Poisson).
PROBE = Recipe("probe", hidden=64, activation=nn.Tanh, centre=3.0, lr=0.01, sample_rate=700 / 1437, epochs=50,
               max_grad_norm=1.0)


def load_split(validation: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed 80/20 stratified split; with ``validation``, the training part split again 80/20 (same seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    if validation:
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=0.2, stratify=y_train, random_state=0
        )
    return x_train, y_train, x_test, y_test


def train(engine: str, recipe: Recipe, data, eps: float | None, seed: int) -> tuple[float, float | None]:
    """Train once; return (test accuracy, epsilon spent as reported by the engine's own accountant)."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    xtr, xte = recipe.features(x_train), recipe.features(x_test)
    ytr, yte = torch.tensor(y_train, dtype=torch.long), torch.tensor(y_test, dtype=torch.long)
    model = recipe.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    dataset = TensorDataset(xtr, ytr)
    batch_size = recipe.batch_size(len(dataset))
    spent = None
    if eps is None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
    elif engine.startswith("dptrain"):
        from dptrain import PrivacyEngine

        private = PrivacyEngine(accountant="pld")
        model, optimizer, loader = private.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=batch_size),
            target_epsilon=eps, target_delta=DELTA, epochs=recipe.epochs, max_grad_norm=recipe.max_grad_norm,
            noise_generator=torch.Generator().manual_seed(seed),
        )
    else:
        from opacus import PrivacyEngine as OpacusEngine

        private = OpacusEngine(accountant="prv")
        model, optimizer, loader = private.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=batch_size),
            target_epsilon=eps, target_delta=DELTA, epochs=recipe.epochs, max_grad_norm=recipe.max_grad_norm,
        )  # poisson_sampling=True is Opacus' default
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(recipe.epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            if len(xb) > 0:  # a Poisson batch may be empty: the step then releases noise only
                loss_fn(model(xb), yb).backward()
            elif engine == "opacus" and eps is not None:
                continue  # Opacus needs a backward pass before step(); skipping an empty batch releases nothing
            optimizer.step()
    if eps is not None:
        spent = private.get_epsilon(DELTA)
    model.eval()
    with torch.no_grad():
        accuracy = (model(xte).argmax(dim=1) == yte).float().mean().item()
    return accuracy, spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="digits: test accuracy by epsilon, dptrain recipe vs Opacus")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. n-1), default 3")
    parser.add_argument("--eps", type=float, nargs="+", default=None, help="epsilons (default 0.5 1 3 8)")
    parser.add_argument("--quick", action="store_true", help="1 seed, eps 1 and 8 (unless given)")
    parser.add_argument("--no-nonprivate", action="store_true", help="skip the non-private column")
    parser.add_argument("--validation", action="store_true",
                        help="train on 80%% of the training set, report on the other 20%% (the recipe search split)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                        help=f"comma-separated subset of {ENGINES} (default: the first three)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG and hook warnings
    seeds = list(range(1 if args.quick and args.seeds == 3 else args.seeds))
    eps_list = args.eps or ([1.0, 8.0] if args.quick else [0.5, 1.0, 3.0, 8.0])
    columns: list[float | None] = list(eps_list) + ([] if args.no_nonprivate else [None])
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            parser.error(f"unknown engine {e!r}; choose from {ENGINES}")
    rows = {
        "dptrain-recipe": ("dptrain recipe", "dptrain", RECIPE),
        "dptrain-demo": ("dptrain demo (hand-tuned)", "dptrain", HAND_TUNED),
        "opacus": ("opacus hand-tuned (PRV)", "opacus", HAND_TUNED),
        "opacus-recipe": ("opacus, dptrain recipe (PRV)", "opacus", RECIPE),
        "opacus-probe": ("opacus, anchor probe (PRV)", "opacus", PROBE),
    }
    data = load_split(args.validation)
    split = "validation (1149 train / 288 val)" if args.validation else "test (1437 train / 360 test)"
    print(f"digits, {split}, delta={DELTA:g}, seeds {seeds}, accuracy mean +- std; one recipe for every eps")
    for name, r in (("dptrain recipe", RECIPE), ("hand-tuned", HAND_TUNED), ("anchor probe", PROBE)):
        print(f"  {name}: MLP 64-{r.hidden}-10 {r.activation.__name__.lower()}, "
              f"{f'{r.centre:g}*(pixel/16-0.5)' if r.centre else 'pixel/16'}, Adam lr {r.lr}, batch {r.batch_size(len(data[0]))} "
              f"(Poisson q = 1/len(loader) = {1 / math.ceil(len(data[0]) / r.batch_size(len(data[0]))):.3f}), "
              f"{r.epochs} epochs, C={r.max_grad_norm}")
    header = f"{'engine':28s}" + "".join(f"{('eps=' + format(e, 'g')) if e else 'non-private':>16s}" for e in columns)
    print(header + f"{'s/run':>8s}")
    print("-" * len(header + " " * 8))
    results: dict[str, dict[float | None, float]] = {}
    for key in engines:
        label, engine, recipe = rows[key]
        cells, means, times = [], {}, []
        for eps in columns:
            accs = []
            for seed in seeds:
                start = time.perf_counter()
                acc, spent = train(engine, recipe, data, eps, seed)
                times.append(time.perf_counter() - start)
                if spent is not None and spent > eps * 1.001:
                    raise RuntimeError(f"{label}: spent epsilon {spent:.4f} > target {eps}")
                accs.append(acc)
            means[eps] = statistics.mean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{100 * means[eps]:6.1f} +- {100 * std:3.1f}")
        results[key] = means
        print(f"{label:28s}" + "".join(f"{c:>16s}" for c in cells) + f"{statistics.mean(times):8.1f}", flush=True)
    if "dptrain-recipe" in results and not args.validation:
        checks = [(e, t) for e, t in TARGETS.items() if e in results["dptrain-recipe"]]
        if checks:
            print("targets (dptrain recipe, test): " + ", ".join(
                f"eps={e:g} {100 * results['dptrain-recipe'][e]:.1f}% vs >= {100 * t:.1f}% "
                f"{'met' if results['dptrain-recipe'][e] >= t else 'MISSED'}" for e, t in checks))
    print("s/run: mean wall time of one training run, noise calibration included (1 thread)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
