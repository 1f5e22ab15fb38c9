"""A training run's configuration: dataclasses, and the TOML parser that validates every key and reports all
problems at once (``dptrain train CONFIG.toml``, ``--set KEY=VALUE``). No torch: a config is checked in
milliseconds."""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DATASETS = ("digits", "csv")
ACTIVATIONS = ("relu", "tanh", "gelu", "elu", "silu")
OPTIMIZERS = ("sgd", "adam")


class ConfigError(ValueError):
    """An invalid run configuration; ``errors`` lists every problem found (all are reported at once)."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = list(errors)
        self.source = source
        details = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid config {source}:\n{details}")


def _refuse(section: str, problems: list[str | None]) -> None:
    """A config built in Python is checked as the TOML parser checks it: raise ConfigError listing every problem."""
    found = [f"[{section}] {p}" for p in problems if p]
    if found:
        raise ConfigError(found, "config")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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

    def __post_init__(self) -> None:
        _refuse("dataset", [
            None if self.name in DATASETS else f"name must be one of {list(DATASETS)}, got {self.name!r}",
            None if _number(self.test_fraction) and 0 < self.test_fraction < 1 else
            f"test_fraction must be in (0, 1), got {self.test_fraction!r}",
        ])  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """An MLP: ``hidden`` layer sizes (empty: a linear model) and their ``activation``."""

    hidden: tuple[int, ...] = (128,)
    activation: str = "relu"

    def __post_init__(self) -> None:
        _refuse("model", [
            None if self.activation in ACTIVATIONS else f"activation must be one of {list(ACTIVATIONS)}, got "
            f"{self.activation!r}",
            None if all(isinstance(h, int) and h >= 1 for h in self.hidden) else
            f"hidden sizes must be integers >= 1, got {self.hidden!r}",
        ])  # fmt: skip


@dataclass(frozen=True)
class TrainingConfig:
    """``batch_size`` is the expected batch size's basis: Poisson rate q = 1 / ceil(N / batch_size) (as Opacus)."""

    epochs: int = 50
    batch_size: int = 256
    max_grad_norm: float = 1.0
    optimizer: str = "adam"
    lr: float = 0.01
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _refuse("training", [
            None if self.optimizer in OPTIMIZERS else f"optimizer must be one of {list(OPTIMIZERS)}, got "
            f"{self.optimizer!r}",
            *(None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else f"{k} must be an integer >= 1, "
              f"got {v!r}" for k, v in (("epochs", self.epochs), ("batch_size", self.batch_size))),
            *(None if _number(v) and v > 0 else f"{k} must be a finite number > 0, got {v!r}"
              for k, v in (("lr", self.lr), ("max_grad_norm", self.max_grad_norm))),
            None if _number(self.momentum) and 0 <= self.momentum < 1 else
            f"momentum must be in [0, 1), got {self.momentum!r}",
        ])  # fmt: skip


@dataclass(frozen=True)
class PrivacyConfig:
    """Exactly one of ``target_epsilon`` (noise calibrated for the planned epochs) and ``noise_multiplier``.

    ``delta`` >= 1/N (N training examples) is refused unless ``allow_weak_delta``: a mechanism that publishes one
    random example in full satisfies such a delta. Allowed, it is flagged on the privacy card."""

    delta: float
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    accountant: str = "pld"
    secure_mode: bool = False
    allow_weak_delta: bool = False

    def __post_init__(self) -> None:
        chosen = [v for v in (self.target_epsilon, self.noise_multiplier) if v is not None]
        _refuse("privacy", [
            None if _number(self.delta) and 0 < self.delta < 1 else f"delta must be in (0, 1), got {self.delta!r}",
            None if len(chosen) == 1 else "set exactly one of target_epsilon and noise_multiplier",
            *(None if _number(v) and v > 0 else f"target_epsilon and noise_multiplier must be finite and > 0, got "
              f"{v!r}" for v in chosen),
            None if self.accountant in ("pld", "rdp") else f"accountant must be 'pld' or 'rdp', got {self.accountant!r}",
        ])  # fmt: skip


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
class CardConfig:
    """Who answers for the run and why it was trained: the privacy card's ``owner`` and ``purpose`` (GDPR Art. 30
    records of processing ask for both)."""

    owner: str | None = None
    purpose: str | None = None


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
    card: CardConfig = CardConfig()
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


_TOP = ("name", "output_dir", "seed", "dataset", "model", "training", "privacy", "ledger", "audit", "card")
_DATASET = (
    "name", "path", "label_column", "classes", "features", "feature_ranges", "feature_range", "test_fraction",
    "split_seed", "scale_to",
)
_MODEL = ("hidden", "activation")
_TRAINING = ("epochs", "batch_size", "max_grad_norm", "optimizer", "lr", "momentum")
_PRIVACY = ("target_epsilon", "noise_multiplier", "delta", "accountant", "secure_mode", "allow_weak_delta")
_LEDGER = ("path", "budget", "cap")
_AUDIT = ("membership",)
_CARD = ("owner", "purpose")
_SECTION_KEYS = {"dataset": _DATASET, "model": _MODEL, "training": _TRAINING, "privacy": _PRIVACY, "ledger": _LEDGER,
                 "audit": _AUDIT, "card": _CARD}


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
    c = _Section(top.data.get("card", {}), "card", _CARD, errors)
    card = CardConfig(owner=c.get("owner", "str"), purpose=c.get("purpose", "str"))

    if errors:
        raise ConfigError(errors, source)
    return RunConfig(
        dataset=dataset, privacy=privacy, model=model, training=training, ledger=ledger, audit=audit, card=card,
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


def _parse_privacy(p: _Section, errors: list[str]) -> PrivacyConfig | None:
    target = p.get("target_epsilon", "float", check=_positive)
    sigma = p.get("noise_multiplier", "float", check=_positive)
    delta = p.get("delta", "float", 1e-5, required=True, check=lambda v: None if 0 < v < 1 else
                  "must be in the open interval (0, 1)", expected="e.g. 1e-5, well below 1 / dataset size")
    if "target_epsilon" in p.data and "noise_multiplier" in p.data:
        errors.append("[privacy] set target_epsilon or noise_multiplier, not both")
    elif "target_epsilon" not in p.data and "noise_multiplier" not in p.data:
        errors.append("[privacy] missing target_epsilon (or noise_multiplier): the run's privacy level")
    accountant = p.get("accountant", "str", "pld", check=_one_of(("pld", "rdp")))
    secure_mode = p.get("secure_mode", "bool", False)
    allow_weak_delta = p.get("allow_weak_delta", "bool", False)
    if (target is None) == (sigma is None) or delta is None:
        return None  # already reported
    return PrivacyConfig(
        delta=delta,
        target_epsilon=target,
        noise_multiplier=sigma,
        accountant=accountant,
        secure_mode=secure_mode,
        allow_weak_delta=allow_weak_delta,
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
