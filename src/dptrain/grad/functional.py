"""Layers written with ``torch.nn.functional``: a module of the user's that calls ``F.linear``, ``F.layer_norm``,
``F.group_norm``, ``F.rms_norm``, ``F.embedding`` or ``F.conv1d/2d/3d`` on its own parameters gets the rule of the
built-in layer, with no torch.func replay (nanoGPT's LayerNorm: ``F.layer_norm(x, w.shape, w, b, 1e-5)``).

During the forward pass of a module without a rule that owns parameters, a ``TorchFunctionMode`` sees every torch
call. A call of one of those functionals whose weight (and bias, if any) are the module's own ``nn.Parameter``
objects is described to the layer rule by a *stand-in*: an instance of the built-in layer on the meta device that
holds the same Parameter objects and the call's settings (so its parameters are the module's, by identity, and the
rule reads ``eps``, ``stride`` or ``padding_idx`` from it). Any other call that takes one of the module's parameters
and returns a tensor (a transpose, a product, ``.T``, a functional without a rule) is a use the rules do not cover:
the module then gets its per-example gradients from its torch.func fallback, from that forward pass on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dptrain.grad.layers import LayerRule, rule_for


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _linear(args: tuple, kwargs: dict) -> tuple[Any, Callable[[], nn.Module]] | None:
    weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if weight.dim() != 2:
        return None
    return (F.linear, id(weight), id(bias)), lambda: nn.Linear(weight.shape[1], weight.shape[0], False, "meta")


def _layer_norm(args: tuple, kwargs: dict) -> tuple[Any, Callable[[], nn.Module]] | None:
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    key = (F.layer_norm, id(weight), id(bias), shape, eps)
    return key, lambda: nn.LayerNorm(shape, eps, device="meta")


def _rms_norm(args: tuple, kwargs: dict) -> tuple[Any, Callable[[], nn.Module]] | None:
    shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
    weight, eps = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "eps")
    return (F.rms_norm, id(weight), shape, eps), lambda: nn.RMSNorm(shape, eps, device="meta")


def _group_norm(args: tuple, kwargs: dict) -> tuple[Any, Callable[[], nn.Module]] | None:
    groups = int(_arg(args, kwargs, 1, "num_groups"))
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    channels = (weight if weight is not None else bias).shape[0]
    return (F.group_norm, id(weight), id(bias), groups, eps), lambda: nn.GroupNorm(groups, channels, eps, device="meta")


def _embedding(args: tuple, kwargs: dict) -> tuple[Any, Callable[[], nn.Module]] | None:
    weight = _arg(args, kwargs, 1, "weight")
    padding_idx = _arg(args, kwargs, 2, "padding_idx")
    if _arg(args, kwargs, 3, "max_norm") is not None:
        return None  # renormalises the weight in place during forward: not a layer call the rule covers
    if _arg(args, kwargs, 5, "scale_grad_by_freq", False) or _arg(args, kwargs, 6, "sparse", False):
        return None
    if weight.dim() != 2:
        return None
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    key = (F.embedding, id(weight), padding_idx)
    return key, lambda: nn.Embedding(weight.shape[0], weight.shape[1], padding_idx, device="meta")


def _conv(layer: type[nn.Module], spatial: int) -> Callable[[tuple, dict], tuple[Any, Callable[[], nn.Module]] | None]:
    def describe(args: tuple, kwargs: dict) -> tuple[Any, Callable[[], nn.Module]] | None:
        weight, bias = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        settings = tuple(_arg(args, kwargs, i, name, default) for i, name, default in (
            (3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)))  # fmt: skip
        stride, padding, dilation, groups = (tuple(s) if isinstance(s, (list, tuple)) else s for s in settings)
        shape = weight.shape
        if weight.dim() != spatial + 2:  # (out, in / groups, *kernel)
            return None

        def build() -> nn.Module:
            return layer(shape[1] * groups, shape[0], tuple(shape[2:]), stride, padding, dilation, groups, False,
                         device="meta")  # fmt: skip

        return (layer, id(weight), id(bias), stride, padding, dilation, groups), build

    return describe


#: The functionals with a rule, and how each call's settings make the built-in layer's stand-in.
_DESCRIBE: dict[Callable, Callable[[tuple, dict], tuple[Any, Callable[[], nn.Module]] | None]] = {
    F.linear: _linear,
    F.layer_norm: _layer_norm,
    F.rms_norm: _rms_norm,
    F.group_norm: _group_norm,
    F.embedding: _embedding,
    F.conv1d: _conv(nn.Conv1d, 1),
    F.conv2d: _conv(nn.Conv2d, 2),
    F.conv3d: _conv(nn.Conv3d, 3),
}
#: Where each functional's weight and bias arguments are (position, keyword); the input is argument 0 ("input").
_PARAMETER_ARGS: dict[Callable, tuple[tuple[int, str], ...]] = {
    F.linear: ((1, "weight"), (2, "bias")),
    F.layer_norm: ((2, "weight"), (3, "bias")),
    F.rms_norm: ((2, "weight"),),
    F.group_norm: ((2, "weight"), (3, "bias")),
    F.embedding: ((1, "weight"),),
    **{f: ((1, "weight"), (2, "bias")) for f in (F.conv1d, F.conv2d, F.conv3d)},
}


class FunctionalOwner:
    """A module without a rule that owns parameters: its stand-ins (one per distinct functional call), and whether
    its forward passes went to its torch.func fallback (from forward pass ``fallback_from`` on)."""

    def __init__(self, module: nn.Module, params: list[nn.Parameter]) -> None:
        self.module = module
        self.params = params
        self.ids = {id(p) for p in params}
        self.standins: dict[Any, nn.Module] = {}
        self.fallback_from: int | None = None
        self.suspended: list[nn.Parameter] = []
        self.watch: TorchFunctionMode | None = None  # while a forward pass of the module runs

    def touches(self, args: tuple, kwargs: dict) -> bool:
        """Whether a call's arguments include one of the module's parameters (one level of lists and tuples)."""
        ids = self.ids
        for a in (*args, *kwargs.values()):
            if id(a) in ids:
                return True
            if isinstance(a, (list, tuple)) and any(id(b) in ids for b in a):
                return True
        return False

    def standin(self, func: Callable, args: tuple, kwargs: dict) -> nn.Module | None:
        """The built-in layer that ``func(*args, **kwargs)`` is a call of, holding this module's parameters; None when
        the call is not one (a weight or bias that is not this module's own Parameter, a setting no rule covers)."""
        describe = _DESCRIBE.get(func)
        if describe is None:
            return None
        parameters = {}
        for index, name in _PARAMETER_ARGS[func]:
            value = _arg(args, kwargs, index, name)
            if value is None:
                parameters[name] = None
            elif id(value) in self.ids:
                parameters[name] = value
            elif isinstance(value, torch.Tensor) and not value.requires_grad:
                parameters[name] = None  # a constant (a buffer): it needs no gradient, the output is the same
            else:
                return None
        if all(p is None for p in parameters.values()) or not isinstance(_arg(args, kwargs, 0, "input"), torch.Tensor):
            return None
        try:
            described = describe(args, kwargs)
            if described is None:
                return None
            key, build = described
            standin = self.standins.get(key)
            if standin is None:
                standin = build()
                for name in ("weight", "bias"):
                    if hasattr(standin, name):
                        setattr(standin, name, parameters.get(name))
                self.standins[key] = standin
        except (TypeError, ValueError, RuntimeError):  # settings the built-in layer does not take
            return None
        return standin


class FunctionalWatch(TorchFunctionMode):
    """Active during one forward pass of ``owner.module``: hands each functional call on its parameters to
    ``on_call(standin, func, args, kwargs)`` (which runs it), and any other use of them to ``on_other_use()``."""

    def __init__(
        self, owner: FunctionalOwner, on_call: Callable[..., Any], on_other_use: Callable[[], None], rule_for: Callable
    ) -> None:
        super().__init__()
        self.owner, self.on_call, self.on_other_use, self.rule_for = owner, on_call, on_other_use, rule_for

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        if owner.fallback_from is not None or not owner.touches(args, kwargs):
            return func(*args, **kwargs)
        standin = owner.standin(func, args, kwargs)
        rule = self.rule_for(standin) if standin is not None else None
        if rule is not None:
            return self.on_call(rule, standin, func, args, kwargs)
        if not _returns_metadata(func):
            self.on_other_use()  # before the call: the parameters must take part in autograd again
        return func(*args, **kwargs)


def _returns_metadata(func: Callable) -> bool:
    """Property reads that return no tensor (``w.shape``, ``w.dtype``, ``w.size()``): not a use of the values."""
    name = getattr(func, "__name__", "")
    return name in ("size", "dim", "numel", "stride", "is_contiguous") or (
        name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA_PROPERTIES
    )


_METADATA_PROPERTIES = frozenset(("shape", "dtype", "device", "requires_grad", "ndim", "is_cuda", "layout", "names"))


class FunctionalLayers:
    """``FastGradSampler``'s handling of modules without a rule that own parameters (a mixin: it uses the sampler's
    hooks, probe, replay guard and fallbacks)."""

    def _add_functional(self, module: nn.Module, params: list[nn.Parameter], batch_first: bool) -> None:
        """A module without a rule that owns ``params``: its functional calls on them get the built-in layers'
        rules (``dptrain.grad.functional``); any other use of them hands it to its fallback (disabled until then)."""
        owner = FunctionalOwner(module, params)
        sampler = self._fallback_sampler(module, batch_first, enabled=False)
        self._functional.append((owner, sampler))

        def on_call(rule: LayerRule, standin: nn.Module, func, args: tuple, kwargs: dict) -> torch.Tensor:
            self._standin_owner[standin] = owner
            output = func(*args, **kwargs)
            activation = args[0] if args else kwargs.get("input")
            if self.guard.active:  # a probe of the forward pass
                if self.probe.running and isinstance(output, torch.Tensor) and isinstance(activation, torch.Tensor):
                    expanded = self.probe.seen(standin, activation, output)
                    return output if expanded is None else expanded
                return output
            replaced = self._after_layer_call(rule, standin, activation, output, bool(owner.suspended))
            return output if replaced is None else replaced

        def on_other_use() -> None:
            if self.guard.active or owner.fallback_from is not None:
                return
            owner.fallback_from = self._forwards
            for p in owner.suspended:
                p.requires_grad_(True)
            owner.suspended = []
            sampler.enabled, sampler.batch_tag = True, self._batch_tag
            self.fallbacks.append((sampler, params))
            self._fallen_back.update(params)

        def enter(layer: nn.Module, args: tuple) -> None:
            if layer is not module or owner.fallback_from is not None or not torch.is_grad_enabled():
                return
            if self.guard.active and not self.probe.running:
                return
            if self._skip_autograd_weight_grads and not self.guard.active:  # as for rule layers (_suspend_hook)
                owner.suspended = [p for p in params if p.requires_grad]
                for p in owner.suspended:
                    p.requires_grad_(False)
            owner.watch = FunctionalWatch(owner, on_call, on_other_use, rule_for)
            owner.watch.__enter__()

        def leave(layer: nn.Module, args: tuple, output) -> None:
            if layer is not module:
                return
            watch, owner.watch = owner.watch, None
            if watch is not None:
                watch.__exit__(None, None, None)
            for p in owner.suspended:
                p.requires_grad_(True)
            owner.suspended = []

        self._handles.append(module.register_forward_pre_hook(enter))
        self._handles.append(module.register_forward_hook(leave, always_call=True))
