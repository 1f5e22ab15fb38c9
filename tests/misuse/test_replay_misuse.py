"""Misuse of the torch.func replay (grad_sample_mode="vmap", and the fast engine's per-layer fallback and whole-model
replay) is refused or exact: randomness inside a replayed forward, 0-dim parameters, batch tags, 16-bit gradients.

A replay cannot draw the dropout masks the user's forward drew (the gradient was 164% off), so randomness inside a
replayed module is refused at the forward that drew it, before any step. Equality tests compare one noiseless step
with a brute-force per-example loop at 1e-5 relative (float32).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.grad import MaterializedGradients, VmapGradSampler
from dptrain.grad.base import per_example_squared_norms, per_example_weighted_sums
from models import brute_force_clipped_sum

BATCH = 6
LR = 0.5
REL_TOL = 1e-5
MODES = ("auto", "vmap")
RANDOM_FORWARD = "draws random numbers"


def make_private(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, mode: str, max_grad_norm: float = 1.0):
    """The private model, optimizer and loader of one noiseless full batch (poisson_sampling=False)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=len(inputs))
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        return PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip


def step_once(model, optimizer, loader) -> None:
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_one_step_equals_brute_force(model: nn.Module, inputs, labels, mode: str, max_grad_norm: float) -> None:
    reference = copy.deepcopy(model)
    clipped_sum = brute_force_clipped_sum(reference, inputs, labels, max_grad_norm)
    step_once(*make_private(model, inputs, labels, mode, max_grad_norm))
    trainable = [(b, a) for b, a in zip(reference.parameters(), model.parameters()) if b.requires_grad]
    assert len(trainable) == len(clipped_sum)
    for (b, a), total in zip(trainable, clipped_sum):
        expected = b.detach() - LR * total / len(inputs)
        torch.testing.assert_close(a.detach(), expected, rtol=REL_TOL, atol=REL_TOL * expected.abs().max().item())


def assert_refused_at_first_forward(model: nn.Module, inputs, labels, mode: str, names: str) -> None:
    """The first forward pass raises, naming the module; no parameter has moved."""
    before = copy.deepcopy(model.state_dict())
    private, optimizer, loader = make_private(model, inputs, labels, mode)
    x, _ = next(iter(loader))
    with pytest.raises(RuntimeError, match=f"{names} {RANDOM_FORWARD}.*dropout to 0"):
        private(x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------------------------------------------------
# Randomness inside a replayed forward
# --------------------------------------------------------------------------------------------------------------------


class GRUClassifier(nn.Module):
    """A two-layer nn.GRU (dropout between its layers): a layer the fast engine replays with torch.func."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 6, num_layers=2, dropout=dropout, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def gru_case(dropout: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return GRUClassifier(dropout), torch.randn(BATCH, 5, 4), torch.randint(0, 3, (BATCH,))


@pytest.mark.parametrize("mode", MODES)
def test_gru_with_dropout_in_training_mode_is_refused_at_the_first_forward(mode):
    model, inputs, labels = gru_case(dropout=0.5)
    assert_refused_at_first_forward(model, inputs, labels, mode, "GRU" if mode == "auto" else "GRUClassifier")


@pytest.mark.parametrize("mode", MODES)
def test_gru_without_dropout_equals_brute_force(mode):
    model, inputs, labels = gru_case(dropout=0.0)
    assert_one_step_equals_brute_force(model, inputs, labels, mode, max_grad_norm=0.3)


@pytest.mark.parametrize("mode", MODES)
def test_gru_with_dropout_in_eval_mode_equals_brute_force(mode):
    model, inputs, labels = gru_case(dropout=0.5)
    assert_one_step_equals_brute_force(model.eval(), inputs, labels, mode, max_grad_norm=0.3)


class NoisyScale(nn.Module):
    """A custom layer with its own parameter (replayed by the fast engine) whose forward applies dropout, either by
    F.dropout or by a child nn.Dropout."""

    def __init__(self, child: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.drop = nn.Dropout(0.5) if child else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x) if self.drop is not None else F.dropout(x, 0.5, self.training)
        return x * self.scale


@pytest.mark.parametrize("child", [False, True], ids=["functional", "child_module"])
@pytest.mark.parametrize("mode", MODES)
def test_custom_layer_with_dropout_is_refused(mode, child):
    torch.manual_seed(0)
    model = nn.Sequential(NoisyScale(child), nn.Linear(4, 3))
    names = "NoisyScale" if mode == "auto" else "Sequential"
    assert_refused_at_first_forward(model, torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,)), mode, names)


class SharedTableModel(nn.Module):
    """A Linear applied to a table without a batch dimension (the fast engine replays the whole model for it) and
    an nn.Dropout elsewhere in the model."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.register_buffer("table", torch.randn(5, 4))
        self.project = nn.Linear(4, 4)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.project(self.table)  # (5, 4), shared by all examples
        return self.head(self.drop(torch.softmax(x @ keys.T, dim=1) @ keys))


@pytest.mark.parametrize("mode", MODES)
def test_whole_model_replay_of_a_model_with_dropout_is_refused(mode):
    torch.manual_seed(0)
    model, inputs, labels = SharedTableModel(0.5), torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,))
    assert_refused_at_first_forward(model, inputs, labels, mode, "SharedTableModel")


@pytest.mark.parametrize("mode", MODES)
def test_whole_model_replay_without_dropout_equals_brute_force(mode):
    torch.manual_seed(0)
    model, inputs, labels = SharedTableModel(0.0), torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,))
    assert_one_step_equals_brute_force(model, inputs, labels, mode, max_grad_norm=0.1)


def test_dropout_between_layers_with_rules_is_not_refused_by_the_fast_engine():
    """The fast engine replays nothing here: its rules see the dropped-out activations themselves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    private, optimizer, loader = make_private(model, torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,)), "auto")
    before = model[0].weight.detach().clone()
    step_once(private, optimizer, loader)
    assert not torch.equal(model[0].weight, before)


class DropoutForSingleExamples(nn.Module):
    """Deterministic on the user's batch, random on a batch of one (as in the replay, one example at a time)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.dropout(x, 0.5) if x.shape[0] == 1 else x)


def test_randomness_drawn_only_by_the_replay_is_refused_before_the_step():
    torch.manual_seed(0)
    model = DropoutForSingleExamples()
    before = copy.deepcopy(model.state_dict())
    private, optimizer, loader = make_private(model, torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,)), "vmap")
    with pytest.raises(RuntimeError, match=f"DropoutForSingleExamples {RANDOM_FORWARD} when its forward is replayed"):
        step_once(private, optimizer, loader)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------------------------------------------------
# 0-dim parameters
# --------------------------------------------------------------------------------------------------------------------


class ScalarParameters(nn.Module):
    """A learned temperature and offset, nn.Parameter(torch.tensor(...)) with shape ()."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.offset = nn.Parameter(torch.tensor(-0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.temperature + self.offset * x[:, :1]


@pytest.mark.parametrize("mode", MODES)
def test_zero_dim_parameters_equal_brute_force(mode):
    torch.manual_seed(0)
    model, inputs, labels = ScalarParameters(), torch.randn(BATCH, 4), torch.randint(0, 3, (BATCH,))
    assert_one_step_equals_brute_force(model, inputs, labels, mode, max_grad_norm=0.5)


# --------------------------------------------------------------------------------------------------------------------
# Batch tags
# --------------------------------------------------------------------------------------------------------------------


def tagged_sampler() -> tuple[nn.Module, VmapGradSampler, list[str]]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    sampler = VmapGradSampler(model)
    current = ["a"]
    sampler.batch_tag = lambda: current[0]
    return model, sampler, current


def test_records_of_two_chunks_carry_both_tags():
    model, sampler, current = tagged_sampler()
    for tag in ("a", "b"):
        current[0] = tag
        model(torch.randn(BATCH, 4)).sum().backward()
    assert sampler.collect(list(model.parameters())).tags == frozenset({"a", "b"})


def test_two_backward_passes_over_one_forward_carry_its_tag_only():
    model, sampler, current = tagged_sampler()
    out = model(torch.randn(BATCH, 4))
    current[0] = "b"  # the tag is the forward's, whatever it is at the backward passes
    out.pow(2).sum().backward(retain_graph=True)
    out.sum().backward()
    grads = sampler.collect(list(model.parameters()))
    assert grads.tags == frozenset({"a"})
    assert grads.batch_size == BATCH


def test_records_without_a_batch_tag_have_no_tags():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    sampler = VmapGradSampler(model)
    model(torch.randn(BATCH, 4)).sum().backward()
    assert sampler.collect(list(model.parameters())).tags == frozenset()


def test_adding_materialized_gradients_unions_their_tags():
    p = nn.Parameter(torch.zeros(2))
    first = MaterializedGradients({p: torch.ones(3, 2)}, 3, tags={"a"})
    second = MaterializedGradients({p: torch.ones(3, 2)}, 3, tags={"b"})
    assert (first + second).tags == frozenset({"a", "b"})


# --------------------------------------------------------------------------------------------------------------------
# 16-bit per-example gradients
# --------------------------------------------------------------------------------------------------------------------


def test_bfloat16_squared_norms_are_float32_accurate():
    # 1 + 2^-7 is a bfloat16; its square 1 + 2^-6 + 2^-14 is not, and 1000 of them sum to 1015.69 (1016 in bfloat16).
    grads = torch.full((3, 1000), 1 + 2**-7, dtype=torch.bfloat16)
    grads[1] *= 3
    assert grads.flatten(1).pow(2).sum(1)[0].item() == 1016.0  # the input does lose precision in bfloat16
    norms = per_example_squared_norms({"w": grads})["w"]
    assert norms.dtype == torch.float32
    exact = grads.double().pow(2).sum(1)
    torch.testing.assert_close(norms.double(), exact, rtol=1e-6, atol=0)


def test_float16_squared_norms_do_not_overflow():
    grads = torch.full((2, 10), 300.0, dtype=torch.float16)  # 300^2 = 90000 > 65504, float16's largest
    norms = per_example_squared_norms({"w": grads})["w"]
    torch.testing.assert_close(norms.double(), torch.full((2,), 900000.0, dtype=torch.float64), rtol=1e-6, atol=0)


def test_bfloat16_weighted_sums_are_float32_accurate():
    torch.manual_seed(0)
    grads = (1 + torch.rand(8, 50)).to(torch.bfloat16)
    weights = torch.rand(8) / 3  # clip factors are float32: rounding them to bfloat16 would move them by 2^-9
    sums = per_example_weighted_sums({"w": grads}, weights)["w"]
    assert sums.dtype == torch.float32
    exact = torch.einsum("b,bk->k", weights.double(), grads.double())
    torch.testing.assert_close(sums.double(), exact, rtol=1e-6, atol=0)
