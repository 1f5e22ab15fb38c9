"""The fast engine: per-example norms and clipped sums from the user's single backward pass (book-keeping).

Forward hooks keep each supported layer's input and a hook on its output keeps the output gradient. Per-example
squared norms come from the layer rules in ``dptrain.grad.layers`` (ghost norm where cheaper, without materialising
per-example gradients); once every example's total norm is known, each layer's clipped sum is formed from the same
kept tensors with the per-example clip factors (Bu et al., ICML 2023): no second backward pass.

nn.MultiheadAttention runs as its pieces (``layers/attention.py``) so that its projections are linear calls with
their own hooks. Layers without a rule that own parameters fall back to torch.func per-example gradients for that
layer only (nn.LSTM/GRU, custom layers, attention configurations the decomposition does not cover). A parameter
used by several layer calls (tied embeddings, a layer applied twice) gets cross terms between the calls' factored
gradients (``LayerRule.factors``), or, for layers without a factored form, per-example gradients summed over calls.
"""

from __future__ import annotations

import types
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad.base import (
    GradSampler,
    MaterializedGradients,
    PerExampleGradients,
    ReplayGuard,
    per_example_squared_norms,
    per_example_weighted_sums,
)
from dptrain.grad.layers import (
    MATERIALISED,
    LayerCall,
    LayerRule,
    cross_term,
    rule_for,
)
from dptrain.grad.layers.attention import attention_forward, can_decompose
from dptrain.grad.vmap import VmapGradSampler

#: Layers whose forward uses their children's parameters directly (not by calling the children), so the whole
#: subtree must be one unit.
COMPOSITE_LAYERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _batch_first_of(module: nn.Module, default: bool) -> bool:
    return bool(getattr(module, "batch_first", default)) if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) else default


def _has_broadcast_batch(activation: torch.Tensor, batch_size: int) -> bool:
    """A leading dimension of 1 in a batch of several: one input broadcast over the batch (GPT-2's position ids)."""
    return batch_size > 1 and activation.dim() > 0 and activation.shape[0] == 1


def _lacks_batch_dimension(activation: torch.Tensor, batch_size: int) -> bool:
    """No leading batch-sized dimension (and not a (T, B, ...) layout): an input shared by all examples."""
    if activation.dim() == 0:
        return True
    return activation.shape[0] != batch_size and not (activation.dim() >= 2 and activation.shape[1] == batch_size)


def _needs_fallback(module: nn.Module) -> bool:
    """Rule layers in a configuration their rule does not cover: an Embedding scaling by in-batch frequency."""
    return isinstance(module, nn.Embedding) and (module.scale_grad_by_freq or module.sparse)


def _materialise_now(rule: LayerRule, call: LayerCall) -> bool:
    """Form a call's per-example gradients during the backward pass when its rule materialises them for the norms
    anyway and they are no larger than the activation and output gradient book-keeping would keep until step():
    that saves memory, and the clipped sum becomes a weighted sum over examples instead of another matmul."""
    if call.batch_size == 0 or not rule.materialises(call):
        return False
    size = call.batch_size * sum(p.numel() for p in call.module.parameters(recurse=False) if p.requires_grad)
    return 0 < size <= call.activation.numel() + call.output_grad.numel()


def _per_example(rule: LayerRule, call: LayerCall) -> dict[str, torch.Tensor]:
    return call.materialised if call.materialised is not None else rule.per_example(call)


class _OutputGradientTap(torch.autograd.Function):
    """Identity on ``output`` that puts it on the autograd graph through ``anchor`` (a scalar leaf), so that the
    backward pass reaches a layer output that would otherwise need no gradient. Returns a copy, so in-place
    operations on the result (ReLU(inplace=True)) are allowed."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


class _FastGradients(PerExampleGradients):
    """Per-example norms and weighted sums over layer calls; a parameter used by several calls gets cross terms
    between the calls' factored gradients, or (layers without a factored form) materialised per-example gradients."""

    def __init__(
        self,
        calls: list[tuple[LayerRule, LayerCall]],
        fallback: MaterializedGradients | None,
        params: set[nn.Parameter],
        batch_size: int,
        scale: float = 1.0,
    ) -> None:
        """``scale`` multiplies the rule layers' output gradients (the batch size under a mean loss), applied to
        the results instead of the kept tensors."""
        self.scale = scale
        self.calls = calls
        self.fallback = fallback
        self.batch_size = batch_size
        # Each call's privatised parameters by name, looked up once (the training step's hot path uses them thrice).
        self.owned = [
            {name: p for name, p in call.module.named_parameters(recurse=False) if p in params} for _, call in calls
        ]
        uses = Counter(p for owned in self.owned for p in owned.values())
        fallback_params = set(fallback.per_param) if fallback is not None else set()
        uses.update(list(fallback_params))
        # A parameter used by several rule calls that all have a factored form (tied embedding and output head, a
        # Linear applied twice): its norm is the sum of each call's own term plus cross terms, nothing materialised.
        factored: dict[nn.Parameter, list] = {}
        for (rule, call), owned in zip(calls, self.owned):
            for name, p in owned.items():
                if uses[p] > 1 and p not in fallback_params:
                    factored.setdefault(p, []).append(rule.factors(call, name))
        self.factored = {p: fs for p, fs in factored.items() if all(f is not None for f in fs)}
        # Any other parameter used more than once has its per-example gradients materialised and summed (exact).
        self.shared: dict[nn.Parameter, torch.Tensor] = {}
        for (rule, call), owned in zip(calls, self.owned):
            if any(uses[p] > 1 and p not in self.factored for p in owned.values()):
                for name, g in _per_example(rule, call).items():
                    p = owned.get(name)
                    if p is not None and uses[p] > 1 and p not in self.factored:
                        g = g * scale
                        self.shared[p] = self.shared[p] + g if p in self.shared else g
        if fallback is not None:
            # A parameter used both by a rule layer and a fallback layer: sum its per-example gradients (exact).
            for p, g in fallback.per_param.items():
                if uses[p] > 1:
                    self.shared[p] = self.shared[p] + g
            rest = {p: g for p, g in fallback.per_param.items() if uses[p] == 1}
            self.fallback = MaterializedGradients(rest, fallback.batch_size) if rest else None

    def squared_norms(self) -> torch.Tensor:
        rule_terms = [
            sq
            for (rule, call), owned in zip(self.calls, self.owned)
            for name, sq in rule.squared_norms(call).items()
            if (p := owned.get(name)) is not None and p not in self.shared
        ]
        for factors in self.factored.values():
            for k, first in enumerate(factors):
                rule_terms += [2 * cross_term(first, second) for second in factors[k + 1 :]]
        other_terms = list(per_example_squared_norms(self.shared).values())
        if self.fallback is not None:
            other_terms.append(self.fallback.squared_norms())
        terms = rule_terms + other_terms
        if not terms:
            return torch.zeros(self.batch_size)
        device, dtype = terms[0].device, torch.promote_types(torch.float32, terms[0].dtype)

        def total(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([t.to(device, dtype) for t in tensors]).sum(0)

        norms = total(rule_terms) * self.scale**2 if rule_terms else torch.zeros(self.batch_size, device=device, dtype=dtype)
        return norms + total(other_terms) if other_terms else norms

    def _accumulate(self, weights: torch.Tensor, into: dict[nn.Parameter, torch.Tensor], release: bool) -> None:
        """``into[p] += sum_i weights[i] g_i``, call by call; with ``release`` each call's tensors are dropped as
        soon as its part is added (the record cannot be used again)."""
        scaled: dict[torch.device, torch.Tensor] = {}  # the weights times the output-gradient scale, per device
        for (rule, call), owned in zip(self.calls, self.owned):
            targets = {name: into[p] for name, p in owned.items() if p not in self.shared}
            if targets:
                if call.device not in scaled:
                    scaled[call.device] = weights.to(call.device) * self.scale
                rule.add_weighted_sum(call, scaled[call.device], targets)
            if release:
                call.activation = call.output_grad = call.materialised = None
        for p, g in per_example_weighted_sums(self.shared, weights).items():
            into[p].add_(g.to(into[p].dtype))
        if self.fallback is not None:
            self.fallback.add_weighted_sum(weights, into)

    def weighted_sum(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        params = {p for owned in self.owned for p in owned.values()} | set(self.shared)
        if self.fallback is not None:
            params |= set(self.fallback.per_param)
        out = {p: torch.zeros_like(p) for p in params}
        self._accumulate(weights, out, release=False)
        return out

    def add_weighted_sum(self, weights: torch.Tensor, into: dict[nn.Parameter, torch.Tensor]) -> None:
        """Add each layer's part to ``into`` as soon as it is formed (in place where the rule can), dropping that
        layer's kept tensors: the sums never exist next to all the activations and output gradients."""
        self._accumulate(weights, into, release=True)

    def materialize(self) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = dict(self.shared)
        for (rule, call), owned in zip(self.calls, self.owned):
            for name, g in _per_example(rule, call).items():
                p = owned.get(name)
                if p is not None and p not in self.shared:
                    out[p] = out[p] + g * self.scale if p in out else g * self.scale
        if self.fallback is not None:
            out.update(self.fallback.per_param)
        return out


class FastGradSampler(GradSampler):
    """Book-keeping per-example clipping with per-layer rules and a per-layer torch.func fallback.

    Two cases need more than a layer's own hooks. A layer applied to an input with a leading dimension of 1
    (position ids broadcast over the batch) gets a per-example view of its output. A layer applied to an input with
    no batch dimension at all has its parameters' per-example gradients computed by a torch.func replay of the
    whole model, which is exact whatever the code does with the layer's output.
    """

    def __init__(
        self, module: nn.Module, batch_first: bool = True, loss_reduction: str = "mean", check_attribution: bool = True
    ) -> None:
        """``check_attribution``: compare the first step's per-example gradients with autograd's batch gradient
        (off under DistributedDataParallel, whose gradients are averaged across ranks)."""
        self.module = module
        self.batch_dim = 0 if batch_first else 1
        self.scale_by_batch = loss_reduction == "mean"
        self.guard = ReplayGuard()
        self._calls: list[tuple[LayerRule, LayerCall]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.fallbacks: list[tuple[VmapGradSampler, list[nn.Parameter]]] = []
        self.fast_layers: list[str] = []
        self._batch_size: int | None = None
        self._checked_attribution = not check_attribution
        # After the first step's attribution check (and never under DDP, which expects every .grad), autograd's own
        # weight gradients of rule layers are not computed: the clipped sum replaces them. Saves a matmul per layer.
        self._skip_autograd_weight_grads = False
        self._may_skip_autograd_weight_grads = check_attribution
        self._suspended: dict[nn.Module, list[nn.Parameter]] = {}
        self._tap_anchor = torch.zeros((), requires_grad=True)
        # Layers seen applied to inputs without a batch dimension, handled by a replay of the whole model.
        self._unbatched_layers: set[nn.Module] = set()
        self._decomposed: list[nn.Module] = []
        self._root_replay = VmapGradSampler(
            module, batch_first=batch_first, loss_reduction=loss_reduction, guard=self.guard, enabled=False
        )
        self._handles.append(module.register_forward_pre_hook(self._on_root_forward, with_kwargs=True))
        self._plan(module, "", batch_first)

    def _plan(self, module: nn.Module, path: str, batch_first: bool) -> None:
        rule = rule_for(module)
        if rule is not None and not _needs_fallback(module):
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_pre_hook(self._suspend_weight_grads))
                self._handles.append(module.register_forward_hook(self._fast_hook(rule), always_call=True))
                self.fast_layers.append(path)
            return
        if isinstance(module, COMPOSITE_LAYERS):
            params = [p for p in module.parameters() if p.requires_grad]
            if params and type(module) is nn.MultiheadAttention and can_decompose(module):
                self._decompose_attention(module, path)
            elif params:
                self._add_fallback(module, params, batch_first)
            return
        direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if direct:
            self._add_fallback(module, direct, batch_first)
        for name, child in module.named_children():
            self._plan(child, f"{path}.{name}" if path else name, batch_first)

    def _add_fallback(self, module: nn.Module, params: list[nn.Parameter], batch_first: bool) -> None:
        kwarg_dims, arg_dims = None, None
        if isinstance(module, nn.MultiheadAttention):
            # key_padding_mask is (B, S) whatever the layout; attn_mask is shared (L, S) or (B*heads, L, S).
            kwarg_dims = {"key_padding_mask": 0, "attn_mask": None}
        elif isinstance(module, nn.RNNBase):
            arg_dims = {1: 1}  # the initial state hx is (layers, B, H) whatever the layout
        sampler = VmapGradSampler(
            module,
            batch_first=_batch_first_of(module, batch_first),
            loss_reduction="mean" if self.scale_by_batch else "sum",
            guard=self.guard,
            kwarg_batch_dims=kwarg_dims,
            arg_batch_dims=arg_dims,
        )
        self.fallbacks.append((sampler, params))

    def _on_root_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.guard.active:
            return
        for leaf in torch.utils._pytree.tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and leaf.dim() > self.batch_dim:
                self._batch_size = leaf.shape[self.batch_dim]
                return

    def _suspend_weight_grads(self, module: nn.Module, args: tuple) -> None:
        """Before a rule layer's forward: stop autograd from also building the layer's parameter gradients (the
        clipped sum replaces them); the forward hook makes sure the backward pass still reaches the output."""
        if not self._skip_autograd_weight_grads or self.guard.active or not torch.is_grad_enabled():
            return
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        self._suspended[module] = params

    def _fast_hook(self, rule: LayerRule):
        def on_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            suspended = self._suspended.pop(module, ())
            for p in suspended:  # runs even when forward raised (always_call)
                p.requires_grad_(True)
            if self.guard.active or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return None
            replaced = None
            if not output.requires_grad:
                if not suspended:
                    return None
                # The input carries no gradient (a first layer) and the parameters were suspended: route the
                # output through a tap so that the backward pass still delivers its gradient.
                replaced = output = _OutputGradientTap.apply(output, self._tap_anchor)
            activation = args[0].detach()
            if self.batch_dim != 0:
                activation = activation.movedim(self.batch_dim, 0)
            batch_size = self._batch_size
            if batch_size is None or module in self._unbatched_layers:
                return replaced
            broadcast = _has_broadcast_batch(activation, batch_size)
            if broadcast or _lacks_batch_dimension(activation, batch_size):
                if self.batch_dim != 0 or not broadcast:
                    # The output's gradient is summed over examples by whatever code broadcasts it: only a replay
                    # of the whole model can attribute it.
                    self._replay_whole_model(module)
                    return replaced
                # A leading 1 broadcast over the batch: give each example its own view of the output, so the
                # backward pass yields per-example output gradients; broadcasting sees the same values.
                activation = activation.expand(batch_size, *activation.shape[1:])
                replaced = output = output.expand(batch_size, *output.shape[1:])
            self._record(rule, module, activation, output, self.batch_dim)
            return replaced

        return on_forward

    def _record(
        self, rule: LayerRule, module: nn.Module, activation: torch.Tensor, output: torch.Tensor, batch_dim: int
    ) -> None:
        """Keep ``activation`` (batch first) and, once the backward pass reaches it, the gradient of ``output``."""

        def on_output_grad(grad: torch.Tensor) -> None:
            g = grad.detach()
            if batch_dim != 0:
                g = g.movedim(batch_dim, 0)
            call = LayerCall(module, activation, g)
            call_rule = rule
            if _materialise_now(rule, call):
                call.materialised = rule.per_example(call)
                call.activation = call.output_grad = None  # no longer needed: free them before step()
                call_rule = MATERIALISED
            self._calls.append((call_rule, call))

        output.register_hook(on_output_grad)

    def _replay_whole_model(self, module: nn.Module) -> None:
        """From now on, ``module``'s parameters get their per-example gradients from a replay of the whole model."""
        self._unbatched_layers.update(module.modules())
        self._root_replay.enabled = True

    def _recorded_linear(
        self, rule: LayerRule, module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """F.linear inside a decomposed layer (batch-first ``x``), recorded for ``rule`` like a rule layer's call."""
        if self._skip_autograd_weight_grads and x.requires_grad:
            weight, bias = weight.detach(), (bias.detach() if bias is not None else None)
        output = F.linear(x, weight, bias)
        if output.requires_grad:
            self._record(rule, module, x.detach(), output, 0)
        return output

    def _decompose_attention(self, module: nn.MultiheadAttention, path: str) -> None:
        """Run ``module`` as its pieces (``attention_forward``) so its projections go through the Linear rule.

        Calls the engine cannot attribute by themselves (unbatched inputs, another batch size) use the module's own
        forward and a replay of the whole model; so do replays and passes without gradient.
        """
        original = nn.MultiheadAttention.forward

        def forward(attention: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    *args, **kwargs):
            skip = self.guard.active or not torch.is_grad_enabled() or self._batch_size is None
            if skip or attention in self._unbatched_layers:
                return original(attention, query, key, value, *args, **kwargs)
            batch = query.shape[0 if attention.batch_first else 1] if query.dim() == 3 else None
            if batch != self._batch_size:
                self._replay_whole_model(attention)
                return original(attention, query, key, value, *args, **kwargs)
            return attention_forward(attention, self._recorded_linear, query, key, value, *args, **kwargs)

        # An instance attribute, so nn.Module.__call__ runs it instead of the class's forward; a bound method, so a
        # deep copy of the model binds it to the copy.
        module.forward = types.MethodType(forward, module)
        self._decomposed.append(module)
        self.fast_layers.append(path)

    def collect(self, params: list[nn.Parameter]) -> PerExampleGradients | None:
        wanted = set(params)
        calls = [(rule, call) for rule, call in self._calls if call.module not in self._unbatched_layers]
        self._calls = []
        replayed = {p for m in self._unbatched_layers for p in m.parameters(recurse=False) if p in wanted}
        fallback: MaterializedGradients | None = None
        units = [(sampler, owned) for sampler, owned in self.fallbacks]
        units.append((self._root_replay, list(replayed)))
        for sampler, owned in units:
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
        grads = _FastGradients(calls, fallback, wanted, batch_size, float(batch_size) if self.scale_by_batch else 1.0)
        if not self._checked_attribution:
            self._check_attribution(grads, wanted)
            self._checked_attribution = True
        self._skip_autograd_weight_grads = self._may_skip_autograd_weight_grads
        return grads

    def _check_attribution(self, grads: _FastGradients, wanted: set[nn.Parameter]) -> None:
        """On the first step, check that the per-example gradients add up to autograd's batch gradient.

        A parameter also used outside its layer's forward call (``F.linear(h, self.embed.weight)`` in a parent)
        would otherwise lose that part of its gradient silently, unclipped and unaccounted.
        """
        scale = 1.0 / grads.batch_size if self.scale_by_batch else 1.0
        ones = torch.full((grads.batch_size,), scale)
        totals = grads.weighted_sum(ones)
        names = {p: n for n, p in self.module.named_parameters()}
        # Replayed parameters are exact by construction (and an example's own gradient may legitimately differ
        # from its share of the batch gradient, e.g. Embedding(scale_grad_by_freq=True)).
        replayed = set(grads.fallback.per_param) if grads.fallback is not None else set()
        for p in wanted - replayed:
            if p.grad is None:
                continue
            total = totals.get(p)
            total = torch.zeros_like(p) if total is None else total.to(p.grad.dtype)
            tolerance = 1e-3 * max(float(p.grad.abs().max()), 1e-12) + 1e-6
            if not torch.allclose(total, p.grad, rtol=1e-3, atol=tolerance):
                raise RuntimeError(
                    f"parameter {names.get(p, '?')} receives gradient outside its layer's forward call (e.g. its "
                    "weight is used directly in another module's forward), so the fast engine cannot attribute it "
                    "to examples; use grad_sample_mode='vmap' for this model"
                )

    def discard(self) -> None:
        self._calls = []
        self._root_replay.discard()
        for sampler, _ in self.fallbacks:
            sampler.discard()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._decomposed:
            del module.forward
        self._decomposed = []
        self._root_replay.detach()
        for sampler, _ in self.fallbacks:
            sampler.detach()
        self._calls = []
