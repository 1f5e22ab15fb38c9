"""The fast engine: per-example norms and clipped sums from the user's single backward pass (book-keeping).

Forward hooks keep each supported layer's input and a hook on its output keeps the output gradient. Per-example
squared norms come from the layer rules in ``dptrain.grad.layers`` (ghost norm where cheaper, without materialising
per-example gradients); once every example's total norm is known, each layer's clipped sum is formed from the same
kept tensors with the per-example clip factors (Bu et al., ICML 2023): no second backward pass.

Layers without a rule that own parameters fall back to torch.func per-example gradients for that layer only
(nn.MultiheadAttention, nn.LSTM/GRU, custom layers). A parameter used by several layer calls (tied embeddings, a
layer applied twice) has its per-example gradients materialised and summed over the calls, which is exact.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from dptrain.grad.base import GradSampler, MaterializedGradients, PerExampleGradients, ReplayGuard
from dptrain.grad.layers import LayerCall, LayerRule, rule_for
from dptrain.grad.vmap import VmapGradSampler

#: Layers whose forward uses their children's parameters directly (not by calling the children), so the whole
#: subtree must be one unit.
COMPOSITE_LAYERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _batch_first_of(module: nn.Module, default: bool) -> bool:
    return bool(getattr(module, "batch_first", default)) if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) else default


def _is_shared_input(module: nn.Module, activation: torch.Tensor, batch_size: int) -> bool:
    """Whether a layer's input is one tensor shared by all examples rather than a batch.

    Shared: a leading dimension of 1 in a batch of several, no batch-sized leading dimension at all, or an
    Embedding looking up ``arange(n)`` (position ids), even when n happens to equal the batch size.
    """
    if activation.dim() == 0:
        return True
    if batch_size > 1 and activation.shape[0] == 1:
        return True
    if isinstance(module, nn.Embedding) and activation.dim() == 1:
        positions = torch.arange(activation.shape[0], device=activation.device, dtype=activation.dtype)
        if torch.equal(activation, positions):
            return True
    return activation.shape[0] != batch_size and not (activation.dim() >= 2 and activation.shape[1] == batch_size)


def _expand_shared(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A (batch_size, ...) view of a shared tensor: its leading 1 expanded, or a new leading dimension."""
    if tensor.dim() > 0 and tensor.shape[0] == 1:
        return tensor.expand(batch_size, *tensor.shape[1:])
    return tensor.unsqueeze(0).expand(batch_size, *tensor.shape)


class _FastGradients(PerExampleGradients):
    """Per-example norms and weighted sums over layer calls, materialising only parameters used more than once."""

    def __init__(
        self,
        calls: list[tuple[LayerRule, LayerCall]],
        fallback: MaterializedGradients | None,
        params: set[nn.Parameter],
        batch_size: int,
    ) -> None:
        self.calls = calls
        self.fallback = fallback
        self.params = params
        self.batch_size = batch_size
        uses = Counter(p for _, call in calls for p in self._owned(call).values())
        self.shared: dict[nn.Parameter, torch.Tensor] = {}
        for rule, call in calls:
            owned = self._owned(call)
            if any(uses[p] > 1 for p in owned.values()):
                for name, g in rule.per_example(call).items():
                    p = owned.get(name)
                    if p is not None and uses[p] > 1:
                        self.shared[p] = self.shared[p] + g if p in self.shared else g

    def _owned(self, call: LayerCall) -> dict[str, nn.Parameter]:
        return {name: p for name, p in call.module.named_parameters(recurse=False) if p in self.params}

    def squared_norms(self) -> torch.Tensor:
        device = self.calls[0][1].output_grad.device if self.calls else None
        total = torch.zeros(self.batch_size, device=device)
        for rule, call in self.calls:
            owned = self._owned(call)
            for name, sq in rule.squared_norms(call).items():
                p = owned.get(name)
                if p is not None and p not in self.shared:
                    total = total + sq.to(total.device, total.dtype)
        for g in self.shared.values():
            total = total + g.flatten(1).pow(2).sum(1).to(total.device, total.dtype)
        if self.fallback is not None:
            total = total + self.fallback.squared_norms().to(total.device, total.dtype)
        return total

    def weighted_sum(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = {}
        for rule, call in self.calls:
            owned = self._owned(call)
            if all(p in self.shared for p in owned.values()):
                continue
            for name, g in rule.weighted_sum(call, weights.to(call.output_grad.device)).items():
                p = owned.get(name)
                if p is not None and p not in self.shared:
                    out[p] = g
        for p, g in self.shared.items():
            out[p] = torch.einsum("b,b...->...", weights.to(g.device, g.dtype), g)
        if self.fallback is not None:
            out.update(self.fallback.weighted_sum(weights))
        return out

    def materialize(self) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = dict(self.shared)
        for rule, call in self.calls:
            owned = self._owned(call)
            for name, g in rule.per_example(call).items():
                p = owned.get(name)
                if p is not None and p not in self.shared:
                    out[p] = g
        if self.fallback is not None:
            out.update(self.fallback.per_param)
        return out


class FastGradSampler(GradSampler):
    """Book-keeping per-example clipping with per-layer rules and a per-layer torch.func fallback."""

    def __init__(self, module: nn.Module, batch_first: bool = True, loss_reduction: str = "mean") -> None:
        self.module = module
        self.batch_dim = 0 if batch_first else 1
        self.scale_by_batch = loss_reduction == "mean"
        self.guard = ReplayGuard()
        self._calls: list[tuple[LayerRule, LayerCall]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.fallbacks: list[tuple[VmapGradSampler, list[nn.Parameter]]] = []
        self.fast_layers: list[str] = []
        self._batch_size: int | None = None
        self._handles.append(module.register_forward_pre_hook(self._on_root_forward, with_kwargs=True))
        self._plan(module, "", batch_first)

    def _plan(self, module: nn.Module, path: str, batch_first: bool) -> None:
        rule = rule_for(module)
        if rule is not None:
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_hook(self._fast_hook(rule, path)))
                self.fast_layers.append(path)
            return
        if isinstance(module, COMPOSITE_LAYERS):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                self._add_fallback(module, params, batch_first)
            return
        direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if direct:
            self._add_fallback(module, direct, batch_first)
        for name, child in module.named_children():
            self._plan(child, f"{path}.{name}" if path else name, batch_first)

    def _add_fallback(self, module: nn.Module, params: list[nn.Parameter], batch_first: bool) -> None:
        kwarg_dims = {"key_padding_mask": 0} if isinstance(module, nn.MultiheadAttention) else None
        sampler = VmapGradSampler(
            module,
            batch_first=_batch_first_of(module, batch_first),
            loss_reduction="mean" if self.scale_by_batch else "sum",
            guard=self.guard,
            kwarg_batch_dims=kwarg_dims,
        )
        self.fallbacks.append((sampler, params))

    def _on_root_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.guard.active:
            return
        for leaf in torch.utils._pytree.tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and leaf.dim() > self.batch_dim:
                self._batch_size = leaf.shape[self.batch_dim]
                return

    def _fast_hook(self, rule: LayerRule, path: str):
        def on_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self.guard.active or not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            activation = args[0].detach()
            if self.batch_dim != 0:
                activation = activation.movedim(self.batch_dim, 0)
            batch_size = self._batch_size
            replaced = None
            if batch_size is not None and _is_shared_input(module, activation, batch_size):
                if self.batch_dim != 0:
                    raise RuntimeError(
                        f"layer {path or '<root>'} ({type(module).__name__}) is applied to an input shared by all "
                        "examples; with batch_first=False use grad_sample_mode='vmap'"
                    )
                # A layer applied to one input shared by every example (position ids, a learned query): give each
                # example its own copy of the output, so the backward pass yields per-example output gradients.
                # Downstream broadcasting sees the same values and shapes.
                activation, replaced = _expand_shared(activation, batch_size), _expand_shared(output, batch_size)
                output = replaced
            elif batch_size is not None and (activation.dim() == 0 or activation.shape[0] != batch_size):
                raise RuntimeError(
                    f"layer {path or '<root>'} ({type(module).__name__}) got an input whose batch dimension "
                    f"{self.batch_dim} has size {activation.shape[0]}, but the model's batch has {batch_size} "
                    "examples; every layer must see batch-first tensors (or pass batch_first=False if all see "
                    "(T, B, ...)). grad_sample_mode='vmap' handles any layout"
                )

            def on_output_grad(grad: torch.Tensor) -> None:
                g = grad.detach()
                if self.batch_dim != 0:
                    g = g.movedim(self.batch_dim, 0)
                if self.scale_by_batch:
                    g = g * g.shape[0]
                self._calls.append((rule, LayerCall(module, activation, g)))

            output.register_hook(on_output_grad)
            return replaced

        return on_forward

    def collect(self, params: list[nn.Parameter]) -> PerExampleGradients | None:
        wanted = set(params)
        calls, self._calls = self._calls, []
        fallback: MaterializedGradients | None = None
        for sampler, owned in self.fallbacks:
            mine = [p for p in owned if p in wanted]
            if not mine:
                sampler.discard()
                continue
            grads = sampler.collect(mine)
            if grads is not None:
                fallback = grads if fallback is None else fallback + grads
        if not calls and fallback is None:
            return None
        sizes = {call.batch_size for _, call in calls} | ({fallback.batch_size} if fallback is not None else set())
        if len(sizes) != 1:
            raise RuntimeError(f"layers saw different batch sizes {sorted(sizes)} before one optimizer.step()")
        batch_size = sizes.pop()
        if batch_size == 0:  # an empty Poisson batch: no example, nothing to clip
            return MaterializedGradients({p: p.new_zeros((0, *p.shape)) for p in params}, 0)
        self._check_coverage(calls, fallback, wanted)
        return _FastGradients(calls, fallback, wanted, batch_size)

    def _check_coverage(
        self, calls: list[tuple[LayerRule, LayerCall]], fallback: MaterializedGradients | None, wanted: set
    ) -> None:
        """Refuse a parameter that received a gradient outside any hooked layer call: it would go unclipped."""
        covered = {p for _, call in calls for p in call.module.parameters(recurse=False)}
        if fallback is not None:
            covered |= set(fallback.per_param)
        names = {p: n for n, p in self.module.named_parameters()}
        for p in wanted - covered:
            if p.grad is not None and bool(p.grad.any()):
                raise RuntimeError(
                    f"parameter {names.get(p, '?')} received a gradient outside its layer's forward call, so the "
                    "fast engine cannot attribute it to examples; use grad_sample_mode='vmap' for this model"
                )

    def discard(self) -> None:
        self._calls = []
        for sampler, _ in self.fallbacks:
            sampler.discard()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for sampler, _ in self.fallbacks:
            sampler.detach()
        self._calls = []
