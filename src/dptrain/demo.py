"""The demo: a small MLP on scikit-learn's handwritten digits (real data, shipped with scikit-learn), eps = 3.

Pixels are scaled by their known range (0..16), never by statistics of the private data, so preprocessing spends
no privacy. Run with ``make demo`` or ``python -m dptrain.demo``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine

DIGITS_PIXEL_MAX = 16.0


def load_digits_split(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """80/20 stratified split of the 1797 digits, pixels scaled to [0, 1] by the known range."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)

    def to_dataset(features, labels) -> TensorDataset:
        return TensorDataset(
            torch.tensor(features / DIGITS_PIXEL_MAX, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)
        )

    return to_dataset(x_train, y_train), to_dataset(x_test, y_test)


def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = dataset.tensors
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train_digits(
    target_epsilon: float = 3.0,
    delta: float = 1e-5,
    epochs: int = 50,
    batch_size: int = 700,
    lr: float = 0.01,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Train an MLP 64-128-10 with DP-Adam at ``target_epsilon``; return accuracy and epsilon spent."""
    torch.manual_seed(seed)
    train, test = load_digits_split()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DataLoader(train, batch_size=batch_size)
    engine = PrivacyEngine(accountant="pld")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        target_epsilon=target_epsilon,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=max_grad_norm,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    return {
        "test_accuracy": accuracy(model, test),
        "epsilon": engine.get_epsilon(delta),
        "delta": delta,
        "noise_multiplier": optimizer.noise_multiplier,
        "steps": optimizer.steps_taken,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dptrain demo: DP training on scikit-learn's digits")
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = train_digits(target_epsilon=args.epsilon, delta=args.delta, epochs=args.epochs)
    print(
        f"digits MLP, DP-Adam: test accuracy {result['test_accuracy']:.1%} at epsilon {result['epsilon']:.3f} "
        f"(delta {result['delta']:g}, noise multiplier {result['noise_multiplier']:.3f}, {result['steps']} steps, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
