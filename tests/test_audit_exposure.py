"""Issue #5: Secret Sharer exposure (Carlini et al., USENIX Security 2019).

Toy "models" (functions giving log-likelihoods) where the exact rank is known, then a tiny character-level model
trained to memorise a planted pin "my pin is 3141" among 60 other pins and 300 filler lines.
Measured (seeded, 2 cores): memorised with 1 copy of the secret, non-private: exposure 10.97 bits (of 13.29);
without the secret: 1.07; with DP (dptrain engine, eps = 1, privacy unit = one predicted character): 1.09.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.audit import ExposureResult, SecretFormat, canary_exposure

PINS = SecretFormat("0123456789", 4, prefix="my pin is ")


def value_model(fmt: SecretFormat):
    """Log-likelihood = minus the numeric value of the secret part: candidate v has exactly v more likely ones."""
    return lambda cands: -np.array([float(c[len(fmt.prefix):]) for c in cands])


def test_secret_format_indexing():
    fmt = SecretFormat("ab", 3, prefix="<", suffix=">")
    assert fmt.size == 8 and fmt.all()[:3] == ["<aaa>", "<aab>", "<aba>"]
    assert [fmt.index(c) for c in fmt.all()] == list(range(8))
    with pytest.raises(ValueError):
        fmt.index("<abc>")
    big = SecretFormat("0123456789", 12)
    assert big.candidates([123456789012])[0] == "123456789012"


def test_exact_exposure_of_a_known_rank():
    result = canary_exposure(value_model(PINS), "my pin is 0042", PINS)
    assert isinstance(result, ExposureResult) and result.method == "exact" and result.num_scored == 10_000
    assert result.rank == 43  # 0000 .. 0041 are more likely
    assert result.exposure == pytest.approx(math.log2(10_000) - math.log2(43), abs=1e-12)
    top = canary_exposure(value_model(PINS), "my pin is 0000", PINS)
    assert top.rank == 1 and top.exposure == pytest.approx(math.log2(10_000))


def test_ties_split_evenly_and_explicit_candidate_lists():
    flat = canary_exposure(lambda cands: np.zeros(len(cands)), "my pin is 1234", PINS)
    assert flat.rank == pytest.approx((10_000 + 1) / 2)
    assert flat.exposure == pytest.approx(math.log2(10_000 / 5000.5), abs=1e-12)
    listed = canary_exposure(lambda cands: np.array([len(c) for c in cands], float), "bb", ["a", "bb", "ccc", "dd"])
    assert listed.rank == pytest.approx(1 + 1 + 0.5)  # "ccc" is more likely, "dd" ties
    with pytest.raises(ValueError):
        canary_exposure(lambda c: np.zeros(len(c)), "zz", ["a", "b"])


def test_sampled_exposure_in_a_large_space():
    # |R| = 10^10, secret value 3e9: true rank 3e9 + 1. 20 000 samples: rank_std ~ 3.2e7 (1 %), 0.015 bits.
    fmt = SecretFormat("0123456789", 10)
    secret = "3000000000"
    result = canary_exposure(value_model(fmt), secret, fmt, num_samples=20_000, seed=0)
    true_exposure = math.log2(1e10) - math.log2(3e9 + 1)
    assert result.method == "sampled" and result.num_scored == 20_000
    assert abs(result.rank - (3e9 + 1)) < 4 * result.rank_std
    assert result.rank_std == pytest.approx(1e10 * math.sqrt(0.3 * 0.7 / 20_000), rel=0.05)
    low, high = result.exposure_interval
    assert low < result.exposure < high and high - low < 0.1
    assert result.exposure == pytest.approx(true_exposure, abs=0.05)
    # A top-ranked secret: estimate at the maximum, interval down to about log2(n / 3.7).
    top = canary_exposure(value_model(fmt), "0000000000", fmt, num_samples=20_000)
    assert top.exposure == pytest.approx(math.log2(1e10))
    assert top.exposure_interval[0] == pytest.approx(math.log2(20_000 / 3.69), abs=0.05)


def test_sampled_exposure_interval_covers_the_truth_95_percent_of_the_time():
    # 200 seeds x 2000 samples of the 10^10 space: coverage ~ Binomial(200, >= 0.95); P[< 180] < 1e-3.
    fmt = SecretFormat("0123456789", 10)
    truth = math.log2(1e10) - math.log2(3e9 + 1)
    covered = 0
    for seed in range(200):
        low, high = canary_exposure(value_model(fmt), "3000000000", fmt, num_samples=2000, seed=seed).exposure_interval
        covered += low <= truth <= high
    assert 180 <= covered <= 200


def test_sampled_estimate_is_unbiased_over_seeds():
    # 200 seeded estimates of rank 43 in the 10^4 pins with 500 samples: mean within 4 standard errors.
    estimates = [canary_exposure(value_model(PINS), "my pin is 0042", PINS, exact_limit=0, num_samples=500,
                                 seed=s).rank for s in range(200)]
    sd = 9999 * math.sqrt((42 / 9999) * (1 - 42 / 9999) / 500)
    assert abs(np.mean(estimates) - 43) < 4 * sd / math.sqrt(200)


# --- a tiny character-level model ---------------------------------------------------------------------------------

CONTEXT = 6


def make_text(secret_copies: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = "the a cat dog runs fast slow home blue red tree sun day night code lake".split()
    lines = [" ".join(rng.choice(words, size=5)) for _ in range(300)]
    lines += ["my pin is " + "".join(map(str, rng.integers(0, 10, 4))) for _ in range(60)]
    lines += ["my pin is 3141"] * secret_copies
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


VOCAB = sorted(set(make_text(0) + "0123456789"))
STOI = {c: i for i, c in enumerate(VOCAB)}


def char_windows(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([STOI[c] for c in text])
    return ids.unfold(0, CONTEXT, 1)[:-1], ids[CONTEXT:]


class CharLM(nn.Module):
    """Next character from the previous CONTEXT characters."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), 16)
        self.fc = nn.Linear(16 * CONTEXT, 128)
        self.out = nn.Linear(128, len(VOCAB))

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(ctx).flatten(1))))


def train_charlm(text: str, epsilon: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    x, y = char_windows(text)
    model = CharLM()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    if epsilon is None:
        for _ in range(400):
            idx = torch.randint(0, len(y), (512,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        return model
    epochs = 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=512),
            target_epsilon=epsilon, target_delta=1e-5, epochs=epochs, max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(0),
        )
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model


def log_likelihood(model: nn.Module):
    """Sum of log p(digit | previous characters) over the 4 digits of each candidate (preceded by a newline)."""

    @torch.no_grad()
    def fn(cands):
        ids = torch.tensor([[STOI[c] for c in "\n" + cand] for cand in cands])
        ctx, target = ids.unfold(1, CONTEXT, 1)[:, :-1], ids[:, CONTEXT:]
        logp = torch.log_softmax(model(ctx.reshape(-1, CONTEXT)), -1).gather(1, target.reshape(-1, 1))
        return logp.view(len(cands), -1)[:, -4:].sum(1).numpy()

    return fn


def test_exposure_of_a_memorised_secret_and_of_dp_training():
    secret = "my pin is 3141"
    memorised = canary_exposure(log_likelihood(train_charlm(make_text(1))), secret, PINS)
    unseen = canary_exposure(log_likelihood(train_charlm(make_text(0))), secret, PINS)
    private = canary_exposure(log_likelihood(train_charlm(make_text(1), epsilon=1.0)), secret, PINS)
    assert memorised.exposure > 8.0  # measured 10.97 of a possible 13.29 bits
    assert unseen.exposure < 4.0 and private.exposure < 4.0  # measured 1.07 and 1.09
    # The sampled estimate agrees with the exact rank (500 samples; 4 standard deviations, or its 95 % interval).
    model = train_charlm(make_text(0))
    exact = canary_exposure(log_likelihood(model), secret, PINS)
    sampled = canary_exposure(log_likelihood(model), secret, PINS, exact_limit=0, num_samples=500)
    assert abs(sampled.rank - exact.rank) <= 4 * sampled.rank_std + 1
