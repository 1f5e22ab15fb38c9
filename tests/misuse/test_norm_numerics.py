"""Per-example norms are never under-estimated beyond NORM_RTOL, even on inputs crafted to cancel them.

The fast engine's ghost norm sum_{t,s} (a_t . a_s)(g_t . g_s), an embedding's token-equality Gram and the cross
terms of a shared parameter are signed sums. Two nearly equal inputs of magnitude 3e4 with opposite output
gradients make the float32 sum 0 (the example is then released unclipped, ||G|| = 26 C here) or negative (NaN
from sqrt, a crash that is itself a membership signal). Every reference here is a float64 autograd gradient of a
double copy of the model, one example at a time.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.grad import make_grad_sampler
from dptrain.grad.layers import (
    NORM_RTOL,
    LayerCall,
    recheck_uncertain,
    rule_for,
    shared_squared_norms,
    uncertain,
)
from dptrain.grad.layers.gram import certified_gram_sum
from dptrain.grad.layers.linear import ghost_is_cheaper

C = 1.0
FEATURES = 8
BIG = 3e4


def _near_pair(width: int, step: float) -> torch.Tensor:
    """Two float32 rows of magnitude 3e4 differing by ``step`` in every entry."""
    base = torch.full((width,), BIG) + torch.arange(width, dtype=torch.float32)
    return torch.stack([base, base + step])


def _opposite(width: int) -> torch.Tensor:
    v = torch.linspace(-1, 1, width) * 10
    return torch.stack([v, -v])


def crafted_linear(step: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Linear(8, 8) on a sequence of two nearly equal inputs with opposite output gradients (the ghost path).
    ``step`` 0.5 makes the float32 ghost norm exactly 0, 0.75 negative (with CPU float32 matmuls)."""
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, FEATURES)
    assert ghost_is_cheaper(2, FEATURES, FEATURES)
    return model, _near_pair(FEATURES, step)[None], _opposite(FEATURES)[None]


def crafted_conv() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Conv2d(1, 8, 3, stride 3) over two nearly equal 3x3 patches with opposite output gradients (its ghost path:
    2 positions); the float32 ghost norm is negative."""
    torch.manual_seed(0)
    model = nn.Conv2d(1, 8, 3, stride=3)
    patches = _near_pair(9, 0.25).view(2, 3, 3)
    x = torch.cat([patches[0], patches[1]], dim=1)[None, None]  # (1, 1, 3, 6)
    target = _opposite(8).T.reshape(1, 8, 1, 2)
    return model, x, target


class Lookup(nn.Module):
    """An embedding whose output is the model's output: its output gradient is the target."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, FEATURES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)


def crafted_embedding() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """One token twice with output gradients g and -(g + 3): the float32 token-equality Gram is exactly 0."""
    torch.manual_seed(0)
    rows = _near_pair(FEATURES, 3.0)
    return Lookup(), torch.tensor([[1, 1]]), torch.stack([rows[0], -rows[1]])[None]


class Twice(nn.Module):
    """One Linear applied to two inputs, the second call's output subtracted: its output gradients are opposite."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x[:, 0]) - self.lin(x[:, 1])


def crafted_shared() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Two nearly equal inputs of magnitude 3e4, one per call: each call's own norm is about 1e11, the example's
    gradient (the difference of the two outer products) is 0.5 * ||target|| * sqrt(8) for the weight, 0 for the
    bias, so the float32 total of own terms and cross terms is pure rounding."""
    torch.manual_seed(0)
    return Twice(), _near_pair(FEATURES, 0.5)[None], _opposite(FEATURES)[:1]


CASES = {
    "linear-zero": lambda: crafted_linear(0.5),
    "linear-negative": lambda: crafted_linear(0.75),
    "conv-negative": crafted_conv,
    "embedding-zero": crafted_embedding,
}
#: Whole-model cases: a parameter shared by two calls whose gradients cancel only in the total.
MODEL_CASES = {**CASES, "shared-linear": crafted_shared}


def _loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (model(x) * target).sum()


def _exact_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """The example's gradient in float64 by plain autograd on a double copy (float32 inputs are exact in it)."""
    double = copy.deepcopy(model).double()
    x = x if not x.is_floating_point() else x.double()
    _loss(double, x, target.double()).backward()
    return [p.grad for p in double.parameters()]


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_crafted_cancellation_norm_matches_float64_brute_force(case):
    model, x, target = MODEL_CASES[case]()
    exact = _norm(_exact_gradient(model, x, target))
    sampler = make_grad_sampler("auto", model, batch_first=True, loss_reduction="sum")
    _loss(model, x, target).backward()
    norms = sampler.collect([p for p in model.parameters()]).squared_norms()
    assert torch.isfinite(norms).all() and float(norms.min()) >= 0, f"{case}: squared norms {norms}"
    # Flagged examples are recomputed in float64: far inside the certified NORM_RTOL.
    assert math.sqrt(float(norms[0])) == pytest.approx(exact, rel=1e-6), case
    assert exact > 5 * C, "the case must need clipping"


def _noiseless_one_per_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, lr: float):
    """The fast engine on ``model`` with SGD(lr), no noise and one example per step (shuffled batches: the
    accounting is not the point here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=lr),
            data_loader=DataLoader(TensorDataset(x, target), batch_size=1),
            noise_multiplier=0.0,
            max_grad_norm=C,
            poisson_sampling=False,
            grad_sample_mode="auto",
        )


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_crafted_cancellation_dp_step_releases_at_most_the_clipped_gradient(case):
    """A full noiseless DP step on the one crafted example: update = -clip(G) (SGD lr=1), norm <= C (1 + 1e-4)."""
    model, x, target = MODEL_CASES[case]()
    exact = _exact_gradient(model, x, target)
    factor = min(1.0, C / _norm(exact))
    before = [p.detach().clone() for p in model.parameters()]
    model, optimizer, loader = _noiseless_one_per_step(model, x, target, lr=1.0)
    for xb, tb in loader:
        optimizer.zero_grad()
        _loss(model, xb, tb).backward()
        optimizer.step()
    updates = [(p.detach() - b).double() for p, b in zip(model.parameters(), before)]
    assert _norm(updates) <= C * (1 + 1e-4), f"{case}: released {_norm(updates) / C:.4g} C"
    error = _norm([u + factor * g for u, g in zip(updates, exact)])
    assert error <= 1e-4 * C, f"{case}: update differs from -clip(G) by {error / C:.3g} C"


# --------------------------------------------------------------------------------------------------------------------
# The rule functions directly
# --------------------------------------------------------------------------------------------------------------------


def _call(module: nn.Module, activation: torch.Tensor, output_grad: torch.Tensor) -> LayerCall:
    return LayerCall(module, activation, output_grad)


def _checked_norms(rule, call: LayerCall) -> dict[str, torch.Tensor]:
    """A rule's squared norms as the engine takes them: computed with their bounds, then every example the bounds
    do not certify rechecked."""
    norms = rule.squared_norms(call)
    return dict(zip(norms, recheck_uncertain([(rule, call, name, sq) for name, sq in norms.items()])))


def _brute_force_norms(module: nn.Module, activation: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
    """Per-example squared gradient norms of ``module``'s parameters: a float64 autograd loop over examples."""
    double = copy.deepcopy(module).double()
    out = []
    for i in range(len(activation)):
        double.zero_grad()
        x = activation[i : i + 1]
        (double(x if not x.is_floating_point() else x.double()) * output_grad[i : i + 1].double()).sum().backward()
        out.append(sum(p.grad.square().sum() for p in double.parameters() if p.grad is not None))
    return torch.stack(out)


def test_certified_bound_covers_the_float32_error_of_ghost_sums():
    """On random and on crafted inputs, |float32-based ghost sum - exact| <= its bound."""
    generator = torch.Generator().manual_seed(0)
    crafted_a, crafted_g = _near_pair(FEATURES, 0.5), _opposite(FEATURES)
    cases = [
        (torch.randn(6, 40, 24, generator=generator), torch.randn(6, 40, 16, generator=generator)),
        (torch.randn(6, 5, 24, generator=generator).relu() + 3, torch.randn(6, 5, 16, generator=generator)),
        (crafted_a[None], crafted_g[None]),
    ]
    for a, g in cases:
        value, bound = certified_gram_sum((a, g), (a, g), same=True)
        a64, g64 = a.double(), g.double()
        exact = torch.einsum("btp,btd->bpd", g64, a64).flatten(1).square().sum(1)
        assert ((value - exact).abs() <= bound).all(), (value, exact, bound)


def test_uncertain_flags_cancelled_values_and_overflowed_bounds_and_leaves_non_finite_values_to_the_optimizer():
    values = torch.tensor([1.0, 1.0, 0.0, -1.0, 0.0, 1.0, math.inf, math.nan])
    bounds = torch.tensor([0.0, 1.0, 0.0, 0.5, 1e-30, math.inf, 0.0, 0.0])
    assert uncertain(values, bounds).tolist() == [False, True, False, True, True, True, False, False]
    assert uncertain(torch.tensor([1.0]), torch.tensor([NORM_RTOL])).tolist() == [False]


@pytest.mark.parametrize("case", ["linear-zero", "linear-negative", "conv-negative", "embedding-zero"])
def test_rules_handle_flagged_examples_exactly_in_norm_and_clipped_sum(case):
    """The flagged example's norm is the float64 one, and its clipped sum is added from the same float64 gradient
    (the float32 matmul would be off by 1e-3 of it: 3e4 times the float32 rounding over the difference)."""
    model, x, target = CASES[case]()
    module = model.embed if isinstance(model, Lookup) else model
    call = _call(module, x, target)
    norms = _checked_norms(rule_for(module), call)
    assert "weight" in call.exact, "the crafted example must be flagged"
    exact = _exact_gradient(model, x, target)
    assert float(sum(norms.values())) == pytest.approx(_norm(exact) ** 2, rel=1e-6)
    weights = torch.tensor([0.5])
    into = {name: torch.zeros_like(p) for name, p in module.named_parameters()}
    rule_for(module).add_weighted_sum(call, weights, into)
    error = _norm([into[name].double() - 0.5 * g for (name, _), g in zip(module.named_parameters(), exact)])
    assert error <= 1e-6 * _norm(exact)


def test_shared_parameter_whose_calls_cancel_is_certified_and_summed_exactly():
    """A Linear applied to two nearly equal inputs with opposite output gradients: each call's own norm is large,
    the total (own terms plus twice the cross term) cancels; shared_squared_norms recomputes it in float64."""
    model, x, target = crafted_shared()
    rule = rule_for(model.lin)
    calls = [_call(model.lin, x[:, 0], target), _call(model.lin, x[:, 1], -target)]
    own = [_checked_norms(rule, call) for call in calls]
    assert all(not call.exact for call in calls), "no single call cancels"
    exact = _exact_gradient(model, x, target)
    for name, reference in zip(("weight", "bias"), exact):
        parts = [(rule, call, name) for call in calls]
        total = shared_squared_norms(parts, [o[name] for o in own])
        assert float(total[0]) == pytest.approx(float(reference.square().sum()), rel=1e-6, abs=1e-12), name
    into = {name: torch.zeros_like(p) for name, p in model.lin.named_parameters()}
    for call in calls:
        rule.add_weighted_sum(call, torch.tensor([0.25]), into)
    error = _norm([into["weight"].double() - 0.25 * exact[0], into["bias"].double() - 0.25 * exact[1]])
    assert error <= 1e-6 * _norm(exact)


def test_tied_embedding_and_head_whose_gradients_cancel_are_summed_exactly():
    """Embedding row 2 gets g, the tied head's row 2 gets -(g + 3): the total row is exactly -3 everywhere."""
    embed, head = nn.Embedding(4, FEATURES), nn.Linear(FEATURES, 4, bias=False)
    head.weight = embed.weight
    rows = _near_pair(FEATURES, 3.0)
    embed_call = _call(embed, torch.tensor([[2]]), rows[:1][None])
    head_grad = torch.zeros(1, 1, 4)
    head_grad[0, 0, 2] = -1.0
    head_call = _call(head, rows[1:][None], head_grad)
    parts = [(rule_for(embed), embed_call, "weight"), (rule_for(head), head_call, "weight")]
    own = [_checked_norms(rule, call)["weight"] for rule, call, _ in parts]
    total = shared_squared_norms(parts, own)
    assert float(total[0]) == pytest.approx(9.0 * FEATURES, rel=1e-6)
    into = {"weight": torch.zeros_like(embed.weight)}
    for rule, call, _ in parts:
        rule.add_weighted_sum(call, torch.tensor([1.0]), into)
    expected = torch.zeros(4, FEATURES)
    expected[2] = -3.0
    assert torch.equal(into["weight"], expected)


# --------------------------------------------------------------------------------------------------------------------
# Natural data keeps the fast path; 16-bit models
# --------------------------------------------------------------------------------------------------------------------


def _natural_cases():
    """Random inputs of the shapes of the benchmark models (lm: T=64, d=128, ff 512), with ReLU (all-positive,
    strongly correlated) activations too, on every signed-sum path."""
    g = torch.Generator().manual_seed(3)
    yield "ghost T=64 d=128 p=512", nn.Linear(128, 512), torch.randn(4, 64, 128, generator=g), torch.randn(
        4, 64, 512, generator=g
    )
    yield "ghost relu T=64 d=512 p=128", nn.Linear(512, 128), torch.randn(4, 64, 512, generator=g).relu(), torch.randn(
        4, 64, 128, generator=g
    )
    yield "ghost T=7", nn.Linear(32, 48), torch.randn(8, 7, 32, generator=g), torch.randn(8, 7, 48, generator=g)
    yield "materialised T=40 d=p=8", nn.Linear(8, 8), torch.randn(8, 40, 8, generator=g), torch.randn(
        8, 40, 8, generator=g
    )
    yield "conv ghost", nn.Conv2d(16, 32, 4, stride=2), torch.randn(8, 16, 10, 10, generator=g), torch.randn(
        8, 32, 4, 4, generator=g
    )
    yield "conv materialised", nn.Conv2d(2, 3, 3), torch.randn(8, 2, 12, 12, generator=g), torch.randn(
        8, 3, 10, 10, generator=g
    )
    yield "embedding repeats", nn.Embedding(10, 32), torch.randint(0, 10, (8, 40), generator=g), torch.randn(
        8, 40, 32, generator=g
    )


NATURAL = list(_natural_cases())


@pytest.mark.parametrize("name,module,activation,output_grad", NATURAL, ids=[case[0] for case in NATURAL])
def test_natural_inputs_are_never_flagged_and_match_brute_force(name, module, activation, output_grad):
    call = _call(module, activation, output_grad)
    norms = rule_for(module).squared_norms(call)
    assert not call.exact, f"{name}: natural data flagged for exact recomputation"
    total = sum(n.double() for n in norms.values())
    reference = _brute_force_norms(module, activation, output_grad)
    assert torch.allclose(total, reference, rtol=1e-5, atol=0), f"{name}: {(total / reference - 1).abs().max()}"
    for param, sq in norms.items():  # with a margin: natural data is far from the threshold
        assert (call.bounds[param] <= NORM_RTOL * sq / 4).all(), f"{name}: {param} within 4x of being flagged"


def test_bfloat16_model_clipped_contributions_stay_within_c_in_the_float32_step_total():
    """bf16 model, one example per step, no noise: each example's clipped contribution, read from the optimizer's
    step total (float32 for 16-bit parameters), is <= C (1 + 1e-6). Needs the optimizer's float32 accumulation."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(torch.bfloat16)
    x = (torch.randn(6, 3, 16) * 4).to(torch.bfloat16)
    target = (torch.randn(6, 3, 4) * 100).to(torch.bfloat16)
    model, optimizer, loader = _noiseless_one_per_step(model, x, target, lr=0.0)
    contributions, dtypes = [], set()

    def record(opt, totals: dict) -> None:
        dtypes.update(t.dtype for t in totals.values())
        contributions.append(_norm(list(totals.values())))

    optimizer.clipped_sum_hooks.append(record)
    for xb, tb in loader:
        optimizer.zero_grad()
        _loss(model, xb, tb).backward()
        optimizer.step()
    assert dtypes == {torch.float32}, f"the step total of bf16 parameters must be float32, got {dtypes}"
    assert len(contributions) == 6
    assert all(C * (1 - 1e-3) <= c <= C * (1 + 1e-6) for c in contributions), [c - C for c in contributions]


def test_examples_the_quick_bound_leaves_uncertain_are_certified_by_the_gram_norms_without_float64():
    """Long sequences with repeated tokens: the bound from the factors' norms alone (no pass over the Gram
    matrices) does not certify natural data, the recheck's Frobenius bound does, so no gradient is formed in
    float64 and the norm is the brute-force one."""
    g = torch.Generator().manual_seed(5)
    module = nn.Embedding(50, FEATURES)
    ids, output_grad = torch.randint(0, 50, (2, 2048), generator=g), torch.randn(2, 2048, FEATURES, generator=g)
    call = _call(module, ids, output_grad)
    quick = rule_for(module).squared_norms(call)["weight"]
    assert uncertain(quick, call.bounds["weight"]).all(), "the quick bound must leave these examples uncertain"
    norms = _checked_norms(rule_for(module), call)
    assert not call.exact, "the Frobenius bound should certify natural data"
    assert not uncertain(norms["weight"], call.bounds["weight"]).any()
    reference = _brute_force_norms(module, ids, output_grad)
    assert torch.allclose(norms["weight"].double(), reference, rtol=1e-5, atol=0)


def test_materialised_norms_are_taken_of_the_very_gradients_the_clipped_sum_adds():
    """A Linear whose norms are cheaper materialised (T d p <= T^2 (d + p)) keeps those per-example gradients for
    the clipped sum: the released sum is sum_i w_i G_i of the measured G_i, within float32 rounding of the float64
    reference, and no bound needs testing (a sum of squares)."""
    g = torch.Generator().manual_seed(7)
    module = nn.Linear(8, 8)
    activation, output_grad = torch.randn(6, 40, 8, generator=g), torch.randn(6, 40, 8, generator=g)
    assert not ghost_is_cheaper(40, 8, 8)
    call = _call(module, activation, output_grad)
    norms = _checked_norms(rule_for(module), call)
    assert "weight" in call.kept and isinstance(call.bounds["weight"], float)
    reference = _brute_force_norms(module, activation, output_grad)
    assert torch.allclose(sum(n.double() for n in norms.values()), reference, rtol=1e-5, atol=0)
    weights = torch.linspace(0.1, 1.0, 6)
    into = {name: torch.zeros_like(p) for name, p in module.named_parameters()}
    rule_for(module).add_weighted_sum(call, weights, into)
    a64, g64 = activation.double(), output_grad.double()
    expected_weight = torch.einsum("b,btp,btd->pd", weights.double(), g64, a64)
    expected_bias = torch.einsum("b,btp->p", weights.double(), g64)
    assert torch.allclose(into["weight"].double(), expected_weight, rtol=1e-5, atol=1e-5)
    assert torch.allclose(into["bias"].double(), expected_bias, rtol=1e-5, atol=1e-5)
