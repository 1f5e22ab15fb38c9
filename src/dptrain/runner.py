"""Config-driven training runs: ``dptrain train CONFIG.toml`` and the demo.

A run is described by a :class:`RunConfig` (read from TOML by :func:`load_config`, which validates every key and
reports all problems at once) and executed by :func:`run_training`, which

1. loads the dataset (scikit-learn's digits, or a CSV file whose features are scaled by *declared* ranges, never by
   statistics of the private data),
2. builds an MLP and trains it with DP-SGD/DP-Adam through :class:`dptrain.engine.PrivacyEngine`, optionally
   charging a budget ledger (reserve before the first step, settle after the last),
3. reports progress once per epoch (loss and accuracy on the *held-out* split, epsilon spent),
4. stops cleanly on Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint is written, the ledger
   reservation is settled to the steps actually taken, and a partial report and privacy card marked
   "interrupted" are produced,
5. audits the model with the loss-threshold membership attack (training set vs held-out set) when ``[audit]
   membership = true`` (off by default: it is computed from the training data without noise, so its figures are
   outside the guarantee, for reviewers; the card says so),
6. writes ``run.json`` (everything below is derived from it), ``metrics.jsonl``, ``model.pt`` (the weights: the DP
   release), ``checkpoint.pt`` (for resuming: it also holds the noise generator's state, so it is as private as the
   data), ``report.html`` and ``privacy_card.json`` / ``privacy_card.md`` to the run directory.

Why held-out metrics only: the training loss is a statistic of the private data computed without noise; showing it
would release information outside the guarantee. The held-out split is not protected by the guarantee either (it
is evaluated without noise), which the privacy card states.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
import math
import os
import platform
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is imported lazily: the config can be validated without loading it
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

RUN_FORMAT = "dptrain-run/1"
SUITE_FORMAT = "dptrain-suite/1"
RUN_FILE, SUITE_FILE, METRICS_FILE = "run.json", "suite.json", "metrics.jsonl"
MODEL_FILE, CHECKPOINT_FILE = "model.pt", "checkpoint.pt"
MODEL_FORMAT = "dptrain-model/1"
DATASETS = ("digits", "csv")
ACTIVATIONS = ("relu", "tanh", "gelu", "elu", "silu")
OPTIMIZERS = ("sgd", "adam")
COMPLETED, INTERRUPTED, BUDGET_EXHAUSTED = "completed", "interrupted", "budget_exhausted"


# -- configuration ---------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """An invalid run configuration; ``errors`` lists every problem found (all are reported at once)."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = list(errors)
        self.source = source
        details = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid config {source}:\n{details}")


@dataclass(frozen=True)
class DatasetConfig:
    """``name``: "digits" (scikit-learn's, shipped) or "csv" (``path`` with a ``label_column``).

    CSV features are scaled to [0, 1] by the declared ``feature_ranges`` (per column) or ``feature_range`` (all
    columns) and clipped to them; ``classes`` declares the label values (a label set read from the data would
    itself leak which labels occur). ``test_fraction`` of the rows (split with ``split_seed``) are held out.
    ``scale_to``: features, first scaled to [0, 1] by their known range, are mapped linearly onto [low, high]
    (e.g. [-1, 1] to centre them); a fixed map, so it looks at no data.
    """

    name: str = "digits"
    path: str | None = None
    label_column: str | None = None
    classes: tuple[Any, ...] | None = None
    features: tuple[str, ...] | None = None
    feature_ranges: Mapping[str, tuple[float, float]] | None = None
    feature_range: tuple[float, float] | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    scale_to: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class ModelConfig:
    """An MLP: ``hidden`` layer sizes (empty: a linear model) and their ``activation``."""

    hidden: tuple[int, ...] = (128,)
    activation: str = "relu"


@dataclass(frozen=True)
class TrainingConfig:
    """``batch_size`` is the expected batch size's basis: Poisson rate q = 1 / ceil(N / batch_size) (as Opacus)."""

    epochs: int = 50
    batch_size: int = 256
    max_grad_norm: float = 1.0
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.0


@dataclass(frozen=True)
class PrivacyConfig:
    """Exactly one of ``target_epsilon`` (noise calibrated for the planned epochs) and ``noise_multiplier``."""

    delta: float
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    accountant: str = "pld"
    secure_mode: bool = False


@dataclass(frozen=True)
class LedgerConfig:
    """Charge budget ``budget`` in the ledger file ``path``; ``cap``: create the budget with this epsilon cap if it
    does not exist (if it does, the cap must match)."""

    path: str
    budget: str
    cap: float | None = None


@dataclass(frozen=True)
class AuditConfig:
    """``membership``: run the loss-threshold membership attack after training. Off by default: its figures (AUC,
    ROC, TPRs) are statistics of the training data computed without noise, outside the DP guarantee; the report and
    card mark them so, for reviewers, not for publication."""

    membership: bool = False


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``privacy=None`` trains without DP (the demo's non-private reference; not available
    from a TOML file)."""

    dataset: DatasetConfig
    privacy: PrivacyConfig | None
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    ledger: LedgerConfig | None = None
    audit: AuditConfig = AuditConfig()
    name: str = "run"
    output_dir: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


class _Section:
    """Typed reads from one TOML table, collecting errors instead of raising at the first one."""

    def __init__(self, data: Any, name: str, allowed: tuple[str, ...], errors: list[str]) -> None:
        self.name, self.errors = name, errors
        self.label = f"[{name}]" if name else "top level:"
        if not isinstance(data, dict):
            errors.append(f"{self.label} must be a table, got {_type_name(data)}")
            data = {}
        self.data = data
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                if not hint:  # perhaps a key of another section
                    homes = {k: section for section, keys in _SECTION_KEYS.items() if section != name for k in keys}
                    near = difflib.get_close_matches(key, list(homes), n=1)
                    suggestion = f" (did you mean {near[0]!r} in [{homes[near[0]]}]?)" if near else ""
                errors.append(
                    f"{self.label} unknown key {key!r}{suggestion}; allowed keys: {', '.join(sorted(allowed))}"
                )

    def _bad(self, key: str, expected: str, value: Any) -> None:
        self.errors.append(f"{self.label} {key} must be {expected}, got {value!r} ({_type_name(value)})")

    def get(self, key: str, kind: str, default: Any = None, *, required: bool = False, check=None, expected=""):
        """Read ``key`` as ``kind`` ("int", "float", "str", "bool", "ints", "floatpair", "list"); None if absent."""
        if key not in self.data:
            if required:
                self.errors.append(f"{self.label} missing required key {key!r}{expected and ' (' + expected + ')'}")
            return default
        value = self.data[key]
        if kind == "int":
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind == "float":
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            value = float(value) if ok else value
        elif kind == "str":
            ok, want = isinstance(value, str), "a string"
        elif kind == "bool":
            ok, want = isinstance(value, bool), "true or false"
        elif kind == "ints":
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            want, value = "an array of integers, e.g. [128, 64]", tuple(value) if ok else value
        elif kind == "floatpair":
            ok = (
                isinstance(value, list)
                and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            )
            want, value = "an array [low, high] of two numbers", (float(value[0]), float(value[1])) if ok else value
        elif kind == "list":
            ok, want = isinstance(value, list), "an array"
        else:  # pragma: no cover - programming error
            raise AssertionError(kind)
        if not ok:
            self._bad(key, want, value)
            return default
        if check is not None:
            problem = check(value)
            if problem:
                self.errors.append(f"{self.label} {key} {problem}, got {value!r}")
                return default
        return value


def _positive(value: float) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be a finite number > 0"


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be >= 1"


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(map(repr, choices))}"


_TOP = ("name", "output_dir", "seed", "dataset", "model", "training", "privacy", "ledger", "audit")
_DATASET = (
    "name", "path", "label_column", "classes", "features", "feature_ranges", "feature_range", "test_fraction",
    "split_seed", "scale_to",
)
_MODEL = ("hidden", "activation")
_TRAINING = ("epochs", "batch_size", "max_grad_norm", "optimizer", "lr", "momentum")
_PRIVACY = ("target_epsilon", "noise_multiplier", "delta", "accountant", "secure_mode")
_LEDGER = ("path", "budget", "cap")
_AUDIT = ("membership",)
_SECTION_KEYS = {"dataset": _DATASET, "model": _MODEL, "training": _TRAINING, "privacy": _PRIVACY, "ledger": _LEDGER,
                 "audit": _AUDIT}


def parse_config(data: Mapping[str, Any], source: str = "config", default_name: str = "run") -> RunConfig:
    """Validate a config table (as read from TOML) and build a :class:`RunConfig`; raises :class:`ConfigError`."""
    errors: list[str] = []
    top = _Section(dict(data), "", _TOP, errors)
    name = top.get("name", "str", default_name, check=lambda v: None if v.strip() else "must not be empty")
    output_dir = top.get("output_dir", "str")
    seed = top.get("seed", "int", 0)

    if "dataset" not in top.data:
        errors.append('missing [dataset] section: add name = "digits", or name = "csv" with path and label_column')
        dataset = DatasetConfig()
    else:
        dataset = _parse_dataset(_Section(top.data["dataset"], "dataset", _DATASET, errors), errors)

    m = _Section(top.data.get("model", {}), "model", _MODEL, errors)
    model = ModelConfig(
        hidden=m.get("hidden", "ints", (128,),
                     check=lambda v: None if all(h >= 1 for h in v) else "sizes must be >= 1"),
        activation=m.get("activation", "str", "relu", check=_one_of(ACTIVATIONS)),
    )

    t = _Section(top.data.get("training", {}), "training", _TRAINING, errors)
    training = TrainingConfig(
        epochs=t.get("epochs", "int", 50, required=True, check=_at_least_one),
        batch_size=t.get("batch_size", "int", 256, required=True, check=_at_least_one),
        max_grad_norm=t.get("max_grad_norm", "float", 1.0, check=_positive),
        optimizer=t.get("optimizer", "str", "adam", check=_one_of(OPTIMIZERS)),
        lr=t.get("lr", "float", 0.01, check=_positive),
        momentum=t.get("momentum", "float", 0.0, check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
    )
    if "momentum" in t.data and training.optimizer != "sgd":
        errors.append(f"[training] momentum applies to optimizer = \"sgd\" only (optimizer is {training.optimizer!r})")
    if "training" not in top.data:
        errors.append("missing [training] section: set at least epochs and batch_size")

    privacy = None
    if "privacy" not in top.data:
        errors.append("missing [privacy] section: set target_epsilon (or noise_multiplier) and delta")
    else:
        privacy = _parse_privacy(_Section(top.data["privacy"], "privacy", _PRIVACY, errors), errors)

    ledger = None
    if "ledger" in top.data:
        lg = _Section(top.data["ledger"], "ledger", _LEDGER, errors)
        path = lg.get("path", "str", required=True, expected="the ledger's SQLite file")
        budget = lg.get("budget", "str", required=True, expected="the budget's name")
        cap = lg.get("cap", "float", check=_positive)
        if path is not None and budget is not None:
            ledger = LedgerConfig(path, budget, cap)

    a = _Section(top.data.get("audit", {}), "audit", _AUDIT, errors)
    audit = AuditConfig(membership=a.get("membership", "bool", False))

    if errors:
        raise ConfigError(errors, source)
    return RunConfig(
        dataset=dataset, privacy=privacy, model=model, training=training, ledger=ledger, audit=audit,
        name=name, output_dir=output_dir, seed=seed,
    )


def _parse_dataset(d: _Section, errors: list[str]) -> DatasetConfig:
    name = d.get("name", "str", required=True, check=_one_of(DATASETS), expected='"digits" or "csv"')
    test_fraction = d.get(
        "test_fraction", "float", 0.2, check=lambda v: None if 0 < v < 1 else "must be in the open interval (0, 1)"
    )
    split_seed = d.get("split_seed", "int", 0)
    scale_to = d.get("scale_to", "floatpair", (0.0, 1.0), check=lambda v: None if v[0] < v[1] else "needs low < high")
    csv_keys = ("path", "label_column", "classes", "features", "feature_ranges", "feature_range")
    if name != "csv":
        for key in csv_keys:
            if key in d.data:
                errors.append(f"[dataset] {key} applies to name = \"csv\" only (name is {name!r})")
        return DatasetConfig(name=name or "digits", test_fraction=test_fraction, split_seed=split_seed,
                             scale_to=scale_to)
    path = d.get("path", "str", required=True, expected="the CSV file")
    label_column = d.get("label_column", "str", required=True, expected="the column holding the class label")
    classes = d.get(
        "classes", "list", required=True, expected="the label values, e.g. [0, 1] or [\"no\", \"yes\"]",
        check=lambda v: None if len(v) >= 2 and len({str(c) for c in v}) == len(v) and all(
            isinstance(c, (int, str)) and not isinstance(c, bool) for c in v
        ) else "must list at least two distinct integers or strings",
    )
    features = d.get("features", "list", check=lambda v: None if v and all(isinstance(f, str) for f in v) else
                     "must be a non-empty array of column names")
    feature_range = d.get("feature_range", "floatpair", check=lambda v: None if v[0] < v[1] else "needs low < high")
    ranges: dict[str, tuple[float, float]] | None = None
    if "feature_ranges" in d.data:
        raw = d.data["feature_ranges"]
        if not isinstance(raw, dict):
            d._bad("feature_ranges", "a table {column = [low, high], ...}", raw)
        else:
            ranges = {}
            for column, pair in raw.items():
                ok = isinstance(pair, list) and len(pair) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair
                )
                if not ok or not pair[0] < pair[1]:
                    errors.append(
                        f"[dataset] feature_ranges.{column} must be [low, high] with low < high, got {pair!r}"
                    )
                else:
                    ranges[column] = (float(pair[0]), float(pair[1]))
    if "feature_ranges" not in d.data and "feature_range" not in d.data:
        errors.append(
            "[dataset] a CSV dataset needs the known range of every feature: feature_ranges = {column = [low, high]}"
            " or feature_range = [low, high] for all (scaling by the data's own min/max would leak it)"
        )
    return DatasetConfig(
        name="csv", path=path, label_column=label_column, classes=tuple(classes) if classes else None,
        features=tuple(features) if features else None, feature_ranges=ranges, feature_range=feature_range,
        test_fraction=test_fraction, split_seed=split_seed, scale_to=scale_to,
    )


def _parse_privacy(p: _Section, errors: list[str]) -> PrivacyConfig:
    target = p.get("target_epsilon", "float", check=_positive)
    sigma = p.get("noise_multiplier", "float", check=_positive)
    delta = p.get("delta", "float", 1e-5, required=True, check=lambda v: None if 0 < v < 1 else
                  "must be in the open interval (0, 1)", expected="e.g. 1e-5, well below 1 / dataset size")
    if "target_epsilon" in p.data and "noise_multiplier" in p.data:
        errors.append("[privacy] set target_epsilon or noise_multiplier, not both")
    elif "target_epsilon" not in p.data and "noise_multiplier" not in p.data:
        errors.append("[privacy] missing target_epsilon (or noise_multiplier): the run's privacy level")
    return PrivacyConfig(
        delta=delta,
        target_epsilon=target,
        noise_multiplier=sigma,
        accountant=p.get("accountant", "str", "pld", check=_one_of(("pld", "rdp"))),
        secure_mode=p.get("secure_mode", "bool", False),
    )


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """``"training.epochs=5"`` -> (["training", "epochs"], 5); the value is read as TOML, else as a string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set expects KEY=VALUE, e.g. training.epochs=5, got {assignment!r}"], "--set")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [k.strip() for k in key.split(".")], value


def load_config(path: str | os.PathLike[str], overrides: list[str] = ()) -> RunConfig:
    """Read and validate a TOML run config; ``overrides`` are ``KEY=VALUE`` assignments (``--set``)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"no such file: {path}"], str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([f"not valid TOML: {e}"], str(path)) from None
    for assignment in overrides:
        keys, value = parse_override(assignment)
        table = data
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError([f"--set {assignment}: {key!r} is not a table"], str(path))
        table[keys[-1]] = value
    return parse_config(data, str(path), default_name=path.stem)


# -- data and model --------------------------------------------------------------------------------------------------


@dataclass
class LoadedData:
    train: "TensorDataset"
    test: "TensorDataset"
    info: dict[str, Any]


def load_dataset(config: DatasetConfig) -> LoadedData:
    """The train and held-out splits of ``config``'s dataset with a description for the report and card."""
    if config.name == "digits":
        from dptrain.demo import DIGITS_PIXEL_MAX, load_digits_split

        train, test = load_digits_split(seed=config.split_seed, test_fraction=config.test_fraction)
        info = {
            "name": "digits",
            "source": "scikit-learn load_digits (UCI optical recognition of handwritten digits), shipped with "
            "scikit-learn",
            "preprocessing": f"pixels divided by their known maximum {DIGITS_PIXEL_MAX:g}",
            "num_classes": 10,
        }
    else:
        train, test, info = _load_csv(config)
    low, high = config.scale_to
    if (low, high) != (0.0, 1.0):
        for dataset in (train, test):
            x = dataset.tensors[0]
            x.mul_(high - low).add_(low)
        info["preprocessing"] += f", then mapped linearly from [0, 1] onto [{low:g}, {high:g}]"
    info["preprocessing"] += " (no statistics of the data used)"
    info.update(
        num_train=len(train), num_test=len(test), num_examples=len(train) + len(test),
        num_features=int(train.tensors[0].shape[1]), test_fraction=config.test_fraction, split_seed=config.split_seed,
    )
    return LoadedData(train, test, info)


def _load_csv(config: DatasetConfig) -> tuple["TensorDataset", "TensorDataset", dict[str, Any]]:
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    source = str(config.path)
    try:
        with open(config.path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [row for row in reader if row]
    except FileNotFoundError:
        raise ConfigError([f"[dataset] path: no such file {config.path}"], source) from None
    if not header:
        raise ConfigError([f"[dataset] {config.path} is empty (a header row is needed)"], source)
    header = [h.strip() for h in header]
    errors: list[str] = []
    if config.label_column not in header:
        errors.append(f"[dataset] label_column {config.label_column!r} is not a column of {config.path}: {header}")
    features = list(config.features or [h for h in header if h != config.label_column])
    for name in features:
        if name not in header:
            errors.append(f"[dataset] feature {name!r} is not a column of {config.path}: {header}")
    ranges = dict(config.feature_ranges or {})
    for name in ranges:
        if name not in features:
            errors.append(f"[dataset] feature_ranges.{name}: no such feature (features: {features})")
    missing = [f for f in features if f not in ranges and config.feature_range is None]
    if missing:
        errors.append(
            f"[dataset] no known range for features {missing}: add them to feature_ranges or set feature_range"
        )
    if not rows:
        errors.append(f"[dataset] {config.path} has no data rows")
    if errors:
        raise ConfigError(errors, source)
    columns = [header.index(f) for f in features]
    label_index = header.index(config.label_column)
    class_ids = {str(c): i for i, c in enumerate(config.classes)}
    x = np.empty((len(rows), len(features)), dtype=np.float64)
    y = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            errors.append(f"{config.path} line {line}: {len(row)} fields, the header has {len(header)}")
        else:
            label = row[label_index].strip()
            if label not in class_ids:
                errors.append(
                    f"{config.path} line {line}: label {label!r} is not one of classes {list(config.classes)}"
                )
            else:
                y[r] = class_ids[label]
            for j, c in enumerate(columns):
                try:
                    x[r, j] = float(row[c])
                except ValueError:
                    errors.append(f"{config.path} line {line}, column {features[j]!r}: {row[c]!r} is not a number")
                else:
                    if not math.isfinite(x[r, j]):
                        errors.append(f"{config.path} line {line}, column {features[j]!r}: {row[c]!r} is not finite")
        if len(errors) >= 10:
            errors.append("(stopped after 10 errors)")
            break
    if errors:
        raise ConfigError(errors, source)
    low = np.array([ranges.get(f, config.feature_range)[0] for f in features])
    high = np.array([ranges.get(f, config.feature_range)[1] for f in features])
    x = np.clip((x - low) / (high - low), 0.0, 1.0)
    order = np.random.default_rng(config.split_seed).permutation(len(rows))
    num_test = min(len(rows) - 1, max(1, round(len(rows) * config.test_fraction)))
    test_idx, train_idx = order[:num_test], order[num_test:]

    def subset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(x[idx], dtype=torch.float32), torch.tensor(y[idx], dtype=torch.long))

    info = {
        "name": Path(config.path).name,
        "source": f"CSV file {config.path}, label column {config.label_column!r}",
        "preprocessing": "each feature scaled to [0, 1] by its declared range and clipped to it",
        "num_classes": len(config.classes),
    }
    return subset(train_idx), subset(test_idx), info


def build_model(num_features: int, num_classes: int, config: ModelConfig) -> "nn.Module":
    from torch import nn

    activation = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU}[config.activation]
    layers: list[nn.Module] = []
    width = num_features
    for size in config.hidden:
        layers += [nn.Linear(width, size), activation()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def describe_model(num_features: int, num_classes: int, config: ModelConfig) -> str:
    sizes = "-".join(str(s) for s in (num_features, *config.hidden, num_classes))
    return f"MLP {sizes} ({config.activation})" if config.hidden else f"linear model {num_features}-{num_classes}"


def evaluate(model: "nn.Module", dataset: "TensorDataset") -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``dataset``."""
    import torch
    from torch import nn

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x, y = dataset.tensors
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y).item()
            acc = (logits.argmax(dim=1) == y).float().mean().item()
    finally:
        model.train(was_training)
    return loss, acc


# -- progress display ------------------------------------------------------------------------------------------------


class RunDisplay(Protocol):
    """What a run reports while it trains (``dptrain.report.console.RichDisplay`` renders it)."""

    def start(self, name: str, total_steps: int, info: dict[str, Any]) -> None: ...

    def advance(self, steps_done: int) -> None: ...

    def epoch(self, record: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def stop(self) -> None: ...


class _NoDisplay:
    def start(self, name: str, total_steps: int, info: dict[str, Any]) -> None:
        pass

    def advance(self, steps_done: int) -> None:
        pass

    def epoch(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


# -- stopping --------------------------------------------------------------------------------------------------------


class StopRequest:
    """Set by a signal handler (or by the caller, from any thread) to end training after the current step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None
        self.signal_number: int | None = None

    def set(self, reason: str = INTERRUPTED, signal_number: int | None = None) -> None:
        if not self._event.is_set():
            self.reason, self.signal_number = reason, signal_number
            self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, enabled: bool = True) -> Iterator[None]:
    """While active, SIGINT (Ctrl-C) and SIGTERM set ``stop``; a second signal raises KeyboardInterrupt (abort).

    Only on the main thread (Python delivers signals there); nests: the previous handlers come back on exit.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum: int, frame: Any) -> None:
        if stop:
            raise KeyboardInterrupt
        stop.set(INTERRUPTED, signum)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


# -- running ---------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """The outcome of :func:`run_training`: ``summary`` is the content of ``run.json``."""

    status: str
    summary: dict[str, Any]
    run_dir: Path | None
    model: Any = field(repr=False, default=None)
    signal_number: int | None = None

    @property
    def exit_code(self) -> int:
        if self.status == INTERRUPTED:
            return 128 + (self.signal_number or signal.SIGINT)
        audit = self.summary.get("audit") or {}
        return 3 if audit.get("violates_bound") else 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_output_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def software_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("dptrain", "torch", "dp-accounting", "numpy", "scipy", "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over ``path``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _check_output_dir(path: Path) -> None:
    if (path / RUN_FILE).exists() or (path / SUITE_FILE).exists():
        raise ConfigError([f"output directory {path} already holds a run; choose another output_dir or remove it"],
                          str(path))
    if path.exists() and not path.is_dir():
        raise ConfigError([f"output_dir {path} exists and is not a directory"], str(path))


def _open_ledger(config: LedgerConfig, delta: float) -> Any:
    """The ledger with the budget checked (created if ``cap`` is given and it does not exist)."""
    from dptrain.budget import BudgetLedger, UnknownBudgetError

    path = Path(config.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = BudgetLedger(path)
    try:
        budget = ledger.budget(config.budget)
    except UnknownBudgetError:
        if config.cap is None:
            raise ConfigError(
                [f"[ledger] no budget {config.budget!r} in {path}: create it (dptrain budget create {config.budget} "
                 f"--epsilon CAP --delta {delta:g} --ledger {path}) or set cap = CAP to create it"], str(path)
            ) from None
        budget = ledger.create(config.budget, config.cap, delta)
    problems = []
    if config.cap is not None and budget.epsilon != config.cap:
        problems.append(f"[ledger] cap = {config.cap:g} but budget {config.budget!r} exists with cap {budget.epsilon:g}"
                        "; remove cap or make it match")
    if budget.delta != delta:
        problems.append(f"[privacy] delta = {delta:g} but budget {config.budget!r} is set at delta {budget.delta:g}")
    if budget.privacy_unit != "example":
        problems.append(f"[ledger] budget {config.budget!r} protects users; dptrain train samples examples and "
                        "accounts per example, so it cannot charge a user-level budget")
    if problems:
        raise ConfigError(problems, str(path))
    return ledger


def _ledger_info(ledger: Any, budget_name: str, entry_id: int | None) -> dict[str, Any]:
    from dptrain.accounting import COARSE_PLD_VALUE_DISCRETIZATION, composed_epsilon

    summary = ledger.summary(budget_name)
    entries = ledger.history(budget_name)
    entry = next((e for e in entries if e.id == entry_id), None)
    return {
        "path": str(ledger.path),
        "budget": budget_name,
        "cap_epsilon": summary.budget.epsilon,
        "delta": summary.budget.delta,
        "privacy_unit": summary.budget.privacy_unit,
        "spent_epsilon": summary.spent,
        "remaining_epsilon": summary.remaining,
        "entries": summary.entries,
        "reserved_entries": summary.reserved,
        "entry_id": entry_id,
        "entry_status": entry.status if entry else None,
        "entry_steps": entry.steps if entry else None,
        "entry_epsilon": composed_epsilon([entry.record()], summary.budget.delta, COARSE_PLD_VALUE_DISCRETIZATION)
        if entry else None,
        "history": [
            {"id": e.id, "status": e.status, "sample_rate": e.sample_rate, "noise_multiplier": e.noise_multiplier,
             "steps": e.steps, "planned_steps": e.planned_steps, "created_at": e.created_at, "note": e.note}
            for e in entries
        ],
    }


def run_training(
    config: RunConfig,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    display: RunDisplay | None = None,
    stop: StopRequest | None = None,
    handle_signals: bool = True,
    write_files: bool = True,
) -> RunResult:
    """Train ``config`` and (with ``write_files``) write the run directory; see the module docstring.

    ``output_dir`` overrides ``config.output_dir`` (default ``runs/<name>-<timestamp>``). ``stop`` ends training
    after the current step when set (SIGINT and SIGTERM set it when ``handle_signals`` and on the main thread).
    Raises :class:`ConfigError` for a bad dataset or ledger setting and ``BudgetExceededError`` when the budget
    cannot hold the planned run (nothing is trained or recorded then).
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    display = display or _NoDisplay()
    stop = stop if stop is not None else StopRequest()
    run_dir: Path | None = None
    if write_files:
        run_dir = Path(output_dir or config.output_dir or default_output_dir(config.name))
        _check_output_dir(run_dir)
    started, clock = _now(), time.perf_counter()
    data = load_dataset(config.dataset)
    info = data.info
    tc, pc = config.training, config.privacy
    torch.manual_seed(config.seed)
    model = build_model(info["num_features"], info["num_classes"], config.model)
    params = [p for p in model.parameters()]
    if tc.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=tc.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum)

    ledger, engine = None, None
    steps_per_epoch = math.ceil(len(data.train) / tc.batch_size)
    planned_steps = tc.epochs * steps_per_epoch

    def budget_exhausted(engine: Any) -> None:
        # Called after the last step the ledger allows; that is the natural end when the whole run was reserved.
        if engine.optimizers[-1].steps_taken < planned_steps:
            stop.set(BUDGET_EXHAUSTED)

    if pc is None:
        loader = DataLoader(data.train, batch_size=tc.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(config.seed))
    else:
        from dptrain.engine import PrivacyEngine

        if config.ledger is not None:
            ledger = _open_ledger(config.ledger, pc.delta)
        engine = PrivacyEngine(
            accountant=pc.accountant, secure_mode=pc.secure_mode, ledger=ledger,
            budget=config.ledger.budget if ledger else None, on_budget_exhausted=budget_exhausted,
            ledger_note=f"{config.name} ({run_dir})" if run_dir is not None else config.name,
        )
        private = dict(
            module=model, optimizer=optimizer, data_loader=DataLoader(data.train, batch_size=tc.batch_size),
            max_grad_norm=tc.max_grad_norm,
            noise_generator=None if pc.secure_mode else torch.Generator().manual_seed(config.seed),
        )
        if pc.target_epsilon is not None:
            display.message(f"{config.name}: calibrating the noise for epsilon {pc.target_epsilon:g} over "
                            f"{planned_steps} steps ...")
            model, optimizer, loader = engine.make_private_with_epsilon(
                target_epsilon=pc.target_epsilon, target_delta=pc.delta, epochs=tc.epochs, **private
            )
        else:
            model, optimizer, loader = engine.make_private(noise_multiplier=pc.noise_multiplier, **private)
    entry_id = next(iter(engine.ledger_entries), None) if engine is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_FILE).write_text("", encoding="utf-8")

    privacy = _privacy_settings(config, engine, optimizer, len(data.train), steps_per_epoch, planned_steps)
    ledger_before = _ledger_info(ledger, config.ledger.budget, entry_id) if ledger is not None else None
    history: list[dict[str, Any]] = []
    loss_fn = nn.CrossEntropyLoss()
    steps = 0

    def epsilon_now() -> float | None:
        if engine is None:
            return None
        if not engine.accountant.history:
            return 0.0
        if engine.accountant.kind == "rdp":
            return engine.accountant.get_epsilon(pc.delta)
        from dptrain.accounting import COARSE_PLD_VALUE_DISCRETIZATION, composed_epsilon

        # Coarse PLD (pessimistic: never below the exact value) keeps per-epoch accounting to milliseconds.
        return composed_epsilon(engine.accountant.history, pc.delta, COARSE_PLD_VALUE_DISCRETIZATION)

    from dptrain.optim import BudgetExhausted

    display.start(config.name, planned_steps, {"privacy": privacy, "dataset": info, "ledger": ledger_before})
    try:
        with stop_on_signals(stop, handle_signals):
            try:
                model.train()
                for _ in range(tc.epochs):
                    if stop:
                        break
                    for x, y in loader:
                        optimizer.zero_grad()
                        if len(y):
                            loss_fn(model(x), y).backward()
                        optimizer.step()  # an empty Poisson batch still takes its (noise-only) step
                        steps += 1
                        display.advance(steps)
                        if stop:
                            break
                    test_loss, test_acc = evaluate(model, data.test)
                    # Under Poisson sampling an epoch is a number of steps (1 / q), not a pass over the data.
                    record = {"epoch": round(steps / steps_per_epoch, 4), "step": steps, "epsilon": epsilon_now(),
                              "test_loss": test_loss, "test_accuracy": test_acc,
                              "seconds": round(time.perf_counter() - clock, 3)}
                    history.append(record)
                    display.epoch(record)
                    if run_dir is not None:
                        with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                            f.write(json.dumps(record) + "\n")
            except BudgetExhausted:
                stop.set(BUDGET_EXHAUSTED)
            status = stop.reason or COMPLETED
            if status == INTERRUPTED:
                display.message(
                    "interrupted: stopped after the current step; writing the checkpoint, settling the ledger and "
                    "the partial report (Ctrl-C again aborts at once, leaving the ledger's whole reservation)"
                )
            # A clean stop: every step taken is accounted for, so settling to the steps taken is exact. (On any
            # other exception the reservation stays in full: the ledger never under-counts.)
            if engine is not None:
                engine.close()
            summary = _finish(config, data, model, optimizer, engine, ledger, entry_id, privacy, history, status,
                              steps, steps_per_epoch, started, clock, run_dir)
    finally:
        display.stop()
    return RunResult(status, summary, run_dir, model, stop.signal_number)


def _finish(config: RunConfig, data: LoadedData, model: Any, optimizer: Any, engine: Any, ledger: Any,
            entry_id: int | None, privacy: dict[str, Any], history: list[dict[str, Any]], status: str, steps: int,
            steps_per_epoch: int, started: str, clock: float, run_dir: Path | None) -> dict[str, Any]:
    """Evaluate, checkpoint, audit and write ``run.json`` and the reports; returns the run summary."""
    import torch

    pc, tc, info = config.privacy, config.training, data.info
    model.eval()
    test_loss, test_acc = evaluate(model, data.test)
    epsilon = engine.get_epsilon(pc.delta) if engine is not None else math.inf
    if run_dir is not None:
        checkpoint = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "privacy": engine.state_dict() if engine is not None else None,
            "steps": steps, "status": status, "config": config.to_dict(),
        }
        release = {
            "format": MODEL_FORMAT, "state_dict": model.state_dict(), "num_features": info["num_features"],
            "num_classes": info["num_classes"], "model": asdict(config.model),
            "preprocessing": info["preprocessing"],
        }  # fmt: skip
        for name, content in ((MODEL_FILE, release), (CHECKPOINT_FILE, checkpoint)):
            tmp = run_dir / f".{name}.tmp"
            torch.save(content, tmp)
            os.replace(tmp, run_dir / name)
    audit = None
    if config.audit.membership:
        from dptrain.audit.mia import loss_threshold_attack

        result = loss_threshold_attack(
            model, data.train, data.test, claimed_epsilon=epsilon, delta=pc.delta if pc else 1e-5
        )
        audit = result.to_dict(curves=True)
        audit["roc"] = _thin_roc(audit["roc"])
        audit["covered_by_the_guarantee"] = False  # computed from the training data without noise
    privacy = dict(privacy, epsilon=_json_float(epsilon) if engine is not None else None, steps=steps,
                   epochs_completed=round(steps / steps_per_epoch, 4))
    summary = {
        "format": RUN_FORMAT,
        "name": config.name,
        "status": status,
        "started_at": started,
        "finished_at": _now(),
        "seconds": round(time.perf_counter() - clock, 2),
        "config": config.to_dict(),
        "dataset": info,
        "model": {
            "architecture": describe_model(info["num_features"], info["num_classes"], config.model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "optimizer": tc.optimizer,
            "learning_rate": tc.lr,
        },
        "privacy": privacy,
        "results": {"test_accuracy": test_acc, "test_loss": test_loss},
        "history": history,
        "audit": audit,
        "ledger": _ledger_info(ledger, config.ledger.budget, entry_id) if ledger is not None else None,
        "software": software_versions(),
        "files": ({"model": MODEL_FILE, "checkpoint": CHECKPOINT_FILE, "metrics": METRICS_FILE}
                  if run_dir is not None else {}),
    }
    if run_dir is not None:
        write_json(run_dir / RUN_FILE, summary)
        from dptrain.report import write_run_report

        write_run_report(run_dir)
    return summary


def _thin_roc(roc: dict[str, list[float]], max_points: int = 400) -> dict[str, list[float]]:
    """At most ``max_points`` ROC points for the report (evenly spaced, always the first and last)."""
    n = len(roc["fpr"])
    if n <= max_points:
        return roc
    keep = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return {k: [v[i] for i in keep] for k, v in roc.items()}


def _privacy_settings(
    config: RunConfig, engine: Any, optimizer: Any, num_train: int, steps_per_epoch: int, planned_steps: int
) -> dict[str, Any]:
    pc, tc = config.privacy, config.training
    if pc is None:
        return {
            "differentially_private": False, "epsilon": None, "delta": None, "target_epsilon": None,
            "accountant": None, "sampling": "shuffled fixed-size batches", "sample_rate": None,
            "expected_batch_size": tc.batch_size, "noise_multiplier": None, "max_grad_norm": None,
            "steps": 0, "planned_steps": planned_steps, "steps_per_epoch": steps_per_epoch,
            "epochs_planned": tc.epochs, "epochs_completed": 0, "secure_mode": False,
            "privacy_unit": "example", "neighbouring_relation": None,
        }
    q = optimizer.sample_rate
    allowance = getattr(optimizer, "step_allowance", None)
    return {
        "differentially_private": True, "epsilon": None, "delta": pc.delta, "target_epsilon": pc.target_epsilon,
        "accountant": pc.accountant, "sampling": "poisson", "sample_rate": q, "expected_batch_size": q * num_train,
        "noise_multiplier": optimizer.noise_multiplier, "max_grad_norm": tc.max_grad_norm, "steps": 0,
        "planned_steps": planned_steps, "steps_per_epoch": steps_per_epoch, "epochs_planned": tc.epochs,
        "epochs_completed": 0, "secure_mode": pc.secure_mode, "budget_step_allowance": allowance,
        "privacy_unit": "example", "neighbouring_relation": "add or remove one example",
    }


# -- suites (several runs sharing one report, e.g. the demo) --------------------------------------------------------


def write_suite(directory: str | os.PathLike[str], title: str, runs: list[str], extra: dict[str, Any]) -> Path:
    """Record ``runs`` (sub-directories of ``directory``) as one suite and write its report; returns report path."""
    from dptrain.report import write_suite_report

    directory = Path(directory)
    write_json(directory / SUITE_FILE, {"format": SUITE_FORMAT, "title": title, "runs": runs, "created_at": _now(),
                                        **extra})
    return write_suite_report(directory)

