"""Issue #10, item 2: the API calls of Opacus' examples and tutorials, in the patterns they make them, with only the
import changed (``opacus`` -> ``dptrain``), on synthetic data of the real shapes (smaller models and batches).

Written here from the examples' structure, not copied: mnist (make_private, ``accountant.get_epsilon``), cifar10
(GroupNorm CNN, ``clipping="per_layer"`` with one norm per parameter, BatchMemoryManager, ``get_epsilon``),
char-lstm (``DPLSTM`` over embedded characters, batch_first=False), imdb (``make_private_with_epsilon`` on an
embedding-bag classifier), dcgan (the discriminator private: real and fake batches in two forward passes, one
backward of the summed loss, one step; the generator trained through it), the image-classifier tutorial
(``ModuleValidator.validate/fix`` of a BatchNorm CNN, ``make_private_with_epsilon``, BatchMemoryManager) and the
text-classifier tutorial (a Hugging Face BERT classifier from a config, most layers frozen, ``model(**batch)``
with ``labels``, ``outputs[0]`` the loss). Each runs a few real steps and reports a finite, positive epsilon.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.layers import DPLSTM
from dptrain.utils.batch_memory_manager import BatchMemoryManager
from dptrain.validators import ModuleValidator

DELTA = 1e-5


def _moved(before: list[torch.Tensor], model: nn.Module) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_mnist_example():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 8, 2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip
    data = TensorDataset(torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,)))
    train_loader = DataLoader(data, batch_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0)
    privacy_engine = PrivacyEngine(secure_mode=False)
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.1, max_grad_norm=1.0
    )
    criterion = nn.CrossEntropyLoss()
    before = _snapshot(model)
    model.train()
    for data, target in train_loader:
        optimizer.zero_grad()
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.step()
    epsilon = privacy_engine.accountant.get_epsilon(delta=DELTA)
    assert 0 < epsilon < math.inf and _moved(before, model)


def test_cifar10_example_with_per_layer_clipping_and_the_batch_memory_manager():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    train_loader = DataLoader(TensorDataset(torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))), batch_size=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n_layers = len([p for p in model.parameters() if p.requires_grad])
    max_grad_norm = [1.5 / math.sqrt(n_layers)] * n_layers  # the example's --clip_per_layer
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.5,
        max_grad_norm=max_grad_norm, clipping="per_layer", grad_sample_mode="hooks",
    )  # fmt: skip
    criterion = nn.CrossEntropyLoss()
    before = _snapshot(model)
    with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=16, optimizer=optimizer) as loader:
        for images, target in loader:
            optimizer.zero_grad()
            loss = criterion(model(images), target)
            loss.backward()
            optimizer.step()
    epsilon = privacy_engine.get_epsilon(DELTA)
    assert 0 < epsilon < math.inf and _moved(before, model)
    assert optimizer.max_grad_norm == pytest.approx(1.5)


class CharLSTM(nn.Module):
    def __init__(self, vocab: int = 30, hidden: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 16)
        self.lstm = DPLSTM(16, hidden, batch_first=False)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):  # x: (T, B) character ids
        out, _ = self.lstm(self.embedding(x))
        return self.out(out[-1])


def test_char_lstm_example_with_dplstm_and_time_first_batches():
    torch.manual_seed(2)
    names, labels = torch.randint(0, 30, (96, 12)), torch.randint(0, 5, (96,))
    train_loader = DataLoader(TensorDataset(names, labels), batch_size=32)
    model = CharLSTM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.0, max_grad_norm=1.0,
        batch_first=False,
    )  # fmt: skip
    before = _snapshot(model)
    for x, y in train_loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x.t()), y)  # the example feeds (T, B)
        loss.backward()
        optimizer.step()
    assert 0 < privacy_engine.get_epsilon(DELTA) < math.inf and _moved(before, model)


def test_imdb_example_with_make_private_with_epsilon():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(100, 16), nn.Flatten(), nn.Linear(16 * 20, 2))
    train_loader = DataLoader(TensorDataset(torch.randint(0, 100, (200, 20)), torch.randint(0, 2, (200,))), batch_size=50)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_loader, target_epsilon=3.0, target_delta=DELTA,
        epochs=2, max_grad_norm=1.0,
    )  # fmt: skip
    for _ in range(2):
        for data, label in train_loader:
            optimizer.zero_grad()
            F.cross_entropy(model(data), label).backward()
            optimizer.step()
    epsilon = privacy_engine.get_epsilon(DELTA)
    assert 2.5 < epsilon <= 3.0


def test_dcgan_example_private_discriminator():
    torch.manual_seed(4)
    nz = 8
    netG = nn.Sequential(nn.ConvTranspose2d(nz, 8, 4, 1, 0), nn.ReLU(), nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Tanh())
    netD = nn.Sequential(
        nn.Conv2d(1, 8, 4, 2, 1), nn.GroupNorm(2, 8), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(8 * 4 * 4, 1),
        nn.Sigmoid(), nn.Flatten(0),
    )  # fmt: skip
    dataloader = DataLoader(TensorDataset(torch.randn(64, 1, 8, 8)), batch_size=16)
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    privacy_engine = PrivacyEngine()
    netD, optimizerD, dataloader = privacy_engine.make_private(
        module=netD, optimizer=optimizerD, data_loader=dataloader, noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    criterion = nn.BCELoss()
    before_d, before_g = _snapshot(netD), _snapshot(netG)
    for (real,) in dataloader:
        # (1) the discriminator: real and fake batches, one backward of the summed loss, one private step
        optimizerD.zero_grad(set_to_none=True)
        batch = real.size(0)
        output = netD(real)
        err_real = criterion(output, torch.full((batch,), 1.0))
        fake = netG(torch.randn(batch, nz, 1, 1))
        output = netD(fake.detach())
        err_fake = criterion(output, torch.full((batch,), 0.0))
        (err_real + err_fake).backward()
        optimizerD.step()
        # (2) the generator, through the (private) discriminator, with its own ordinary optimizer
        optimizerG.zero_grad()
        optimizerD.zero_grad()
        err_g = criterion(netD(fake), torch.full((batch,), 1.0))
        err_g.backward()
        optimizerG.step()
    assert 0 < privacy_engine.get_epsilon(DELTA) < math.inf
    assert _moved(before_d, netD) and _moved(before_g, netG)


def test_image_classifier_tutorial_with_module_validator_fix():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 10),
    )  # fmt: skip
    errors = ModuleValidator.validate(model, strict=False)
    assert errors  # BatchNorm
    model = ModuleValidator.fix(model)
    assert not ModuleValidator.validate(model, strict=False)
    train_loader = DataLoader(TensorDataset(torch.randn(120, 3, 16, 16), torch.randint(0, 10, (120,))), batch_size=40)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_loader, epochs=1, target_epsilon=50.0,
        target_delta=DELTA, max_grad_norm=1.2,
    )  # fmt: skip
    criterion = nn.CrossEntropyLoss()
    model.train()
    with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=16, optimizer=optimizer) as memory_safe:
        for images, target in memory_safe:
            optimizer.zero_grad()
            criterion(model(images), target).backward()
            optimizer.step()
    assert 0 < privacy_engine.get_epsilon(DELTA) <= 50.0


def test_text_classifier_tutorial_with_a_hugging_face_model_returning_its_loss():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(6)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    model = BertForSequenceClassification(config)
    # the tutorial trains the last encoder layer and the classifier head only
    trainable = [model.bert.encoder.layer[-1], model.bert.pooler, model.classifier]
    for p in model.parameters():
        p.requires_grad = False
    for layer in trainable:
        for p in layer.parameters():
            p.requires_grad = True
    ids = torch.randint(1, 64, (60, 10))
    data = TensorDataset(ids, torch.ones_like(ids), torch.zeros_like(ids), torch.randint(0, 3, (60,)))
    train_dataloader = DataLoader(data, batch_size=20)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, eps=1e-8)
    privacy_engine = PrivacyEngine()
    model, optimizer, train_dataloader = privacy_engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=train_dataloader, target_delta=DELTA, target_epsilon=8.0,
        epochs=1, max_grad_norm=0.1,
    )  # fmt: skip
    before = _snapshot(model)
    model.train()
    for batch in train_dataloader:
        optimizer.zero_grad()
        inputs = {"input_ids": batch[0], "attention_mask": batch[1], "token_type_ids": batch[2], "labels": batch[3]}
        outputs = model(**inputs)
        loss = outputs[0]
        loss.backward()
        optimizer.step()
    assert 0 < privacy_engine.get_epsilon(DELTA) <= 8.0 and _moved(before, model)


def test_the_distributed_examples_wrapper_is_ddp_and_trains(tmp_path):
    """Opacus' multi-GPU examples wrap the model in DifferentiallyPrivateDistributedDataParallel before make_private
    (one gloo process here; tests/misuse/test_ddp_physical_chunks.py runs two)."""
    import torch.distributed as dist

    from dptrain.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(7)
        model = DPDDP(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)))
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        loader = DataLoader(TensorDataset(torch.randn(64, 6), torch.randint(0, 2, (64,))), batch_size=16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        privacy_engine = PrivacyEngine()
        model, optimizer, loader = privacy_engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )
        before = _snapshot(model)
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        assert 0 < privacy_engine.get_epsilon(DELTA) < math.inf and _moved(before, model)
    finally:
        dist.destroy_process_group()


def test_get_compatible_module_fixes_and_validates():
    fixed = PrivacyEngine.get_compatible_module(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    assert isinstance(fixed[1], nn.GroupNorm)
    from dptrain.validators import UnsupportedModuleError

    with pytest.raises(UnsupportedModuleError):
        PrivacyEngine.get_compatible_module(nn.Sequential(nn.Linear(3, 3), nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3))))


def test_model_module_is_the_model_itself_as_opacus_code_reads_it():
    """Opacus code saves ``model._module.state_dict()``: dptrain has no wrapper, so ``_module`` is the model (not a
    submodule: ``state_dict`` keys and ``modules()`` unchanged), gone after ``detach``."""
    import copy

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    keys = list(model.state_dict())
    engine = PrivacyEngine()
    private, _, _ = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    assert private._module is private
    assert list(private._module.state_dict()) == keys and len(list(private.modules())) == 4
    copied = copy.deepcopy(private)
    assert copied._module is copied
    engine.detach()
    assert not hasattr(model, "_module")
