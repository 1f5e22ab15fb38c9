"""The fast engine: per-example norms and clipped sums from the user's single backward pass (book-keeping).

Forward hooks keep each supported layer's input and a hook on its output keeps the output gradient. Per-example
squared norms come from the layer rules in ``dptrain.grad.layers`` (ghost norm where cheaper, without materialising
per-example gradients); once every example's total norm is known, each layer's clipped sum is formed from the same
kept tensors with the per-example clip factors (Bu et al., ICML 2023): no second backward pass.

nn.MultiheadAttention runs as its pieces (``layers/attention.py``) so that its projections are linear calls with
their own hooks. A module without a rule that owns parameters gets the built-in layers' rules for its functional
calls on them (``F.linear``, ``F.layer_norm``, ...: ``functional.py``); otherwise it falls back to torch.func
per-example gradients for that module only (nn.LSTM/GRU, custom layers, attention configurations the decomposition
does not cover). A parameter
used by several layer calls (tied embeddings, a layer applied twice) gets cross terms between the calls' factored
gradients (``LayerRule.factors``), or, for layers without a factored form, per-example gradients summed over calls.

Which dimension of a layer's input carries the examples is found at every call, from the batch size (a model may
transpose batch-first data to (T, B, ...) inside); a call the engine cannot attribute by itself gets its gradients
from a torch.func replay of the whole model. A parameter that receives gradient outside its layers' calls is refused.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad.base import (
    GradSampler,
    MaterializedGradients,
    PerExampleGradients,
    ReplayGuard,
)
from dptrain.grad.layers import (
    MATERIALISED,
    LayerCall,
    LayerRule,
    rule_for,
)
from dptrain.grad.layers.attention import attention_forward, can_decompose
from dptrain.grad.example_dims import EXPANDED, UNBATCHED, ExampleDimensions, ForwardProbe, expand_to_batch
from dptrain.grad.fast_gradients import FastGradients
from dptrain.grad.attribution import check_attribution, outside_use_error
from dptrain.grad.functional import FunctionalLayers, FunctionalOwner
from dptrain.grad.vmap import VmapGradSampler

#: Layers whose forward uses their children's parameters directly (not by calling the children), so the whole
#: subtree must be one unit.
COMPOSITE_LAYERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _batch_first_of(module: nn.Module, default: bool) -> bool:
    return bool(getattr(module, "batch_first", default)) if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)) else default


_UNTAGGED = object()  # the tag of a call recorded while the engine had no ``batch_tag``


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


class FastGradSampler(FunctionalLayers, ExampleDimensions, GradSampler):
    """Book-keeping per-example clipping with per-layer rules and a per-layer torch.func fallback.

    At each call of a rule layer, the dimension of its input that carries the examples is the one leading dimension
    (``leading_dims``) of the batch size; it is moved to dim 0 (a model may work in (T, B, ...) inside). A leading
    1 in a batch of several (position ids broadcast over the batch) gets a per-example view of the layer's output.
    When several dimensions fit (T == B at some step), the dimension the layer's examples were on at an earlier
    step with only one is used; without one, that step's gradients of the layer come from a torch.func replay of
    the whole model, exact whatever the code does with the layer's output. So do, from then on, those of a layer
    whose input has no dimension of the batch size (an input shared by all examples).
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
        self._batch_tag = None
        # (rule, call, index of its forward pass, batch tag at that forward) for each call since the last collect.
        self._calls: list[tuple[LayerRule, LayerCall, int, object]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.fallbacks: list[tuple[VmapGradSampler, list[nn.Parameter]]] = []
        self.fast_layers: list[str] = []
        self._batch_size: int | None = None
        self._forwards = 0  # forward passes of the module so far (a call's forward pass is the latest)
        self._step_first = 1  # the first forward pass since the last collect
        self._checked_attribution = not check_attribution
        # After the first step's attribution check (and never under DDP, which expects every .grad), autograd's own
        # weight gradients of rule layers are not computed: the clipped sum replaces them. Saves a matmul per layer.
        self._skip_autograd_weight_grads = False
        self._may_skip_autograd_weight_grads = check_attribution
        self._suspended: dict[nn.Module, list[nn.Parameter]] = {}
        self._tap_anchor = torch.zeros((), requires_grad=True)
        # The example dimension of each (layer, input rank): from calls where only one dimension fitted, or found
        # by a probe of the forward pass (``_probe``), whose verdicts for the current pass are kept.
        self._learned: dict[tuple[nn.Module, int], int] = {}
        self._verdicts: tuple[int, dict[tuple[nn.Module, int], int]] = (0, {})
        self.probe = ForwardProbe(self.guard, self.batch_dim)
        # The current forward pass's (args, kwargs) and their leaves (their batch dimension is the declared one).
        self._root_call: tuple[tuple, dict] | None = None
        self._root_inputs: list = []
        # Layers replayed from now on (inputs without a batch dimension); the replay records passes from _replay_from.
        self._unbatched_layers: set[nn.Module] = set()
        self._replay_from: int | None = None
        # Parameters of rule layers that received an autograd gradient while those are suspended: an outside use.
        self._outside_use: set[nn.Parameter] = set()
        self._decomposed: list[nn.Module] = []
        # Modules without a rule that own parameters (``dptrain.grad.functional``), their stand-ins' owners, and the
        # parameters of those that went to their fallback.
        self._functional: list[tuple[FunctionalOwner, VmapGradSampler]] = []
        self._standin_owner: dict[nn.Module, FunctionalOwner] = {}
        self._fallen_back: set[nn.Parameter] = set()
        # Hooks are closures that check the module they were registered on: a deep copy of the model shares them
        # (copy.deepcopy does not copy functions), and they leave the copy alone.
        before, after = self._root_forward_hook(module)
        self._handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        watched: dict[nn.Parameter, None] = {}
        self._plan(module, "", batch_first, watched)
        # After the layers' hooks: a model that is itself a rule layer still sees its input as the model's input.
        self._handles.append(module.register_forward_hook(after, always_call=True))
        # After the layers' hooks: a model that is itself a rule layer can enable the replay in its own forward hook.
        self._root_replay = VmapGradSampler(
            module, batch_first=batch_first, loss_reduction=loss_reduction, guard=self.guard, enabled=False
        )
        if check_attribution:
            fallback_params = {p for _, owned in self.fallbacks for p in owned}
            for p in watched:
                if p not in fallback_params:  # a fallback layer's own forward legitimately accumulates it
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_accumulated))

    @property
    def batch_tag(self):
        """Returns the current physical chunk's id (set by the engine); passed on to the torch.func samplers."""
        return self._batch_tag

    @batch_tag.setter
    def batch_tag(self, tag) -> None:
        self._batch_tag = tag
        for sampler in (self._root_replay, *(sampler for sampler, _ in self.fallbacks)):
            sampler.batch_tag = tag

    def _plan(self, module: nn.Module, path: str, batch_first: bool, watched: dict[nn.Parameter, None]) -> None:
        rule = rule_for(module)
        if rule is not None and not _needs_fallback(module):
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if params:
                self._handles.append(module.register_forward_pre_hook(self._suspend_hook(module)))
                self._handles.append(module.register_forward_hook(self._fast_hook(rule, module), always_call=True))
                self.fast_layers.append(path)
                watched.update(dict.fromkeys(params))
            return
        if isinstance(module, COMPOSITE_LAYERS):
            params = [p for p in module.parameters() if p.requires_grad]
            if params and type(module) is nn.MultiheadAttention and can_decompose(module):
                self._decompose_attention(module, path)
                watched.update(dict.fromkeys(params))
            elif params:
                self._add_fallback(module, params, batch_first)
            return
        direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if direct:
            self._add_functional(module, direct, batch_first)
            watched.update(dict.fromkeys(direct))
        for name, child in module.named_children():
            self._plan(child, f"{path}.{name}" if path else name, batch_first, watched)

    def _add_fallback(self, module: nn.Module, params: list[nn.Parameter], batch_first: bool) -> None:
        self.fallbacks.append((self._fallback_sampler(module, batch_first, enabled=True), params))

    def _fallback_sampler(self, module: nn.Module, batch_first: bool, enabled: bool) -> VmapGradSampler:
        kwarg_dims, arg_dims = None, None
        if isinstance(module, nn.MultiheadAttention):
            # key_padding_mask is (B, S) whatever the layout; attn_mask is shared (L, S) or (B*heads, L, S).
            kwarg_dims = {"key_padding_mask": 0, "attn_mask": None}
        elif isinstance(module, nn.RNNBase):
            arg_dims = {1: 1}  # the initial state hx is (layers, B, H) whatever the layout
        return VmapGradSampler(
            module,
            batch_first=_batch_first_of(module, batch_first),
            loss_reduction="mean" if self.scale_by_batch else "sum",
            guard=self.guard,
            kwarg_batch_dims=kwarg_dims,
            arg_batch_dims=arg_dims,
            enabled=enabled,
        )

    def _root_forward_hook(self, root: nn.Module):
        def on_root_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if module is not root or self.guard.active:
                return
            self._forwards += 1
            self._root_call = (args, kwargs)
            self._root_inputs = torch.utils._pytree.tree_flatten((args, kwargs))[0]
            for leaf in self._root_inputs:
                if isinstance(leaf, torch.Tensor) and leaf.dim() > self.batch_dim:
                    self._batch_size = leaf.shape[self.batch_dim]
                    return

        def after_root_forward(module: nn.Module, args: tuple, output) -> None:
            if module is root and not self.guard.active:
                self._root_call, self._root_inputs = None, []

        return on_root_forward, after_root_forward

    def _suspend_hook(self, layer: nn.Module):
        def suspend(module: nn.Module, args: tuple) -> None:
            """Before a rule layer's forward: stop autograd from also building the layer's parameter gradients (the
            clipped sum replaces them); the forward hook makes sure the backward pass still reaches the output."""
            skip = self._skip_autograd_weight_grads and not self.guard.active and torch.is_grad_enabled()
            if module is not layer or not skip:
                return
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            for p in params:
                p.requires_grad_(False)
            self._suspended[module] = params

        return suspend

    def _on_accumulated(self, p: nn.Parameter) -> None:
        """A rule layer's parameter got an autograd gradient: while those are suspended, from a use outside the
        layer's calls (refused at collect, unless the parameter is replayed)."""
        if self._skip_autograd_weight_grads and not self.guard.active and p not in self._fallen_back:
            self._outside_use.add(p)

    def _fast_hook(self, rule: LayerRule, layer: nn.Module):
        def on_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if module is not layer:
                return None
            suspended = self._suspended.pop(module, ())
            for p in suspended:  # runs even when forward raised (always_call)
                p.requires_grad_(True)
            if self.probe.running and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                return self.probe.seen(module, args[0], output)
            return self._after_layer_call(rule, module, args[0] if args else None, output, bool(suspended))

        return on_forward

    def _after_layer_call(
        self, rule: LayerRule, module: nn.Module, given: object, output: object, suspended: bool
    ) -> torch.Tensor | None:
        """A rule layer's call ran (``given``: its input): record it; the output to use instead, if any."""
        if self.guard.active or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        replaced = None
        if not output.requires_grad:
            if not suspended:
                return None
            # The input carries no gradient (a first layer) and the parameters were suspended: route the
            # output through a tap so that the backward pass still delivers its gradient.
            replaced = output = _OutputGradientTap.apply(output, self._tap_anchor)
        batch_size = self._batch_size
        if batch_size is None or module in self._unbatched_layers:
            return replaced
        if not isinstance(given, torch.Tensor):  # called with keywords: the replay attributes it
            self._replay_whole_model(module)
            return replaced
        activation = given.detach()
        dim = self._example_dim(module, given, batch_size, rule)
        if dim is None:
            return replaced
        if dim == UNBATCHED and batch_size == 1:  # the one example's: a batch dimension for the rule only
            activation = activation.unsqueeze(0)
        elif dim in EXPANDED:
            # Give each example its own view of the output, so that the backward pass yields per-example output
            # gradients; broadcasting sees the same values (checked by the probe).
            activation = expand_to_batch(activation, dim, batch_size)
            replaced = output = expand_to_batch(output, dim, batch_size)
            dim = 0
        elif dim != 0:
            activation = activation.movedim(dim, 0)
        self._record(rule, module, activation, output, dim)
        return replaced

    def _record(
        self, rule: LayerRule, module: nn.Module, activation: torch.Tensor, output: torch.Tensor, batch_dim: int
    ) -> None:
        """Keep ``activation`` (batch first) and, once the backward pass reaches it, the gradient of ``output``;
        the call's forward pass and batch tag are those of now."""
        forward = self._forwards
        tag = self._batch_tag() if self._batch_tag is not None else _UNTAGGED

        def on_output_grad(grad: torch.Tensor) -> None:
            g = grad.detach()
            if batch_dim == UNBATCHED:
                g = g.unsqueeze(0)
            elif batch_dim != 0:
                g = g.movedim(batch_dim, 0)
            call = LayerCall(module, activation, g)
            call_rule = rule
            if _materialise_now(rule, call):
                call.materialised = rule.per_example(call)
                call.activation = call.output_grad = None  # no longer needed: free them before step()
                call_rule = MATERIALISED
            self._calls.append((call_rule, call, forward, tag))

        output.register_hook(on_output_grad)

    def _replay_whole_model(self, module: nn.Module) -> None:
        """From now on, ``module``'s parameters get their per-example gradients from a replay of the whole model
        (a stand-in's: its owner's, with all the owner's stand-ins)."""
        owner = self._standin_owner.get(module)
        layers = set((owner.module if owner is not None else module).modules())
        for functional, _ in self._functional:
            if functional.module in layers:
                layers.update(functional.standins.values())
        self._unbatched_layers.update(layers)
        if self._replay_from is None:  # it records forward passes from the current one on
            self._replay_from = self._forwards
            self._root_replay.enabled = True

    def _recorded_linear(
        self, rule: LayerRule, module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """F.linear inside a decomposed layer (batch-first ``x``), recorded for ``rule`` like a rule layer's call."""
        skip = self._skip_autograd_weight_grads
        if skip:
            weight, bias = weight.detach(), (bias.detach() if bias is not None else None)
        output = F.linear(x, weight, bias)
        if skip and not output.requires_grad:
            output = _OutputGradientTap.apply(output, self._tap_anchor)
        if output.requires_grad:
            self._record(rule, module, x.detach(), output, 0)
        return output

    def _decompose_attention(self, module: nn.MultiheadAttention, path: str) -> None:
        """Run ``module`` as its pieces (``attention_forward``) so its projections go through the Linear rule.

        Calls the engine cannot attribute by themselves (unbatched inputs, another batch size) use the module's own
        forward and a replay of the whole model; so do replays, passes without gradient and deep copies.
        """
        original = nn.MultiheadAttention.forward

        def forward(attention: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    *args, **kwargs):
            skip = attention is not module or self.guard.active or not torch.is_grad_enabled()
            if skip or self._batch_size is None or attention in self._unbatched_layers:
                return original(attention, query, key, value, *args, **kwargs)
            batch = query.shape[0 if attention.batch_first else 1] if query.dim() == 3 else None
            if batch != self._batch_size:
                self._replay_whole_model(attention)
                return original(attention, query, key, value, *args, **kwargs)
            return attention_forward(attention, self._recorded_linear, query, key, value, *args, **kwargs)

        # An instance attribute, so nn.Module.__call__ runs it instead of the class's forward; a bound method, so a
        # deep copy of the model binds it to the copy (which then runs the class's forward).
        module.forward = types.MethodType(forward, module)
        self._decomposed.append(module)
        self.fast_layers.append(path)

    def collect(self, params: list[nn.Parameter]) -> PerExampleGradients | None:
        wanted = set(params)
        pending, self._calls = self._calls, []
        outside, self._outside_use = self._outside_use, set()
        replay_from, step_first = self._replay_from, self._step_first
        self._step_first = self._forwards + 1
        if not self._unbatched_layers:
            self._replay_from, self._root_replay.enabled = None, False
        else:
            self._replay_from = 0  # it records every forward pass of the next steps
        replayed = {p for m in self._unbatched_layers for p in m.parameters(recurse=False) if p in wanted}
        if outside & wanted - replayed:
            self.discard()
            names = {p: n for n, p in self.module.named_parameters()}
            raise outside_use_error(", ".join(sorted(names.get(p, "?") for p in outside & wanted - replayed)))
        # The replay gives the replayed parameters' whole gradient for the forward passes it recorded: the calls of
        # those passes do not contribute to them.
        calls, owned, tags = [], [], set()
        for rule, call, forward, tag in pending:
            if tag is not _UNTAGGED:
                tags.add(tag)
            late = replay_from is not None and forward >= replay_from
            owner = self._standin_owner.get(call.module)
            if owner is not None and owner.fallback_from is not None and forward >= owner.fallback_from:
                continue  # that forward pass of the owner is its fallback's
            if late and call.module in self._unbatched_layers:
                continue
            mine = {n: p for n, p in call.module.named_parameters(recurse=False) if p in wanted}
            calls.append((rule, call))
            owned.append({n: p for n, p in mine.items() if p not in replayed} if late else mine)
        tied = replayed.intersection(p for _, owned_params in self.fallbacks for p in owned_params)
        if tied and replay_from is not None and replay_from > step_first:
            self.discard()
            raise RuntimeError(
                "a parameter shared with a layer without a rule is used by a layer that needs the whole-model replay "
                "from the second of several forward passes before one optimizer.step(), which the replay cannot "
                "attribute; call optimizer.step() after each forward and backward pass, or use grad_sample_mode='vmap'"
            )
        fallback: MaterializedGradients | None = None
        units = [(sampler, owned) for sampler, owned in self.fallbacks]
        units.append((self._root_replay, list(replayed)))
        for sampler, owned_params in units:
            mine = [p for p in owned_params if p in wanted and (sampler is self._root_replay or p not in replayed)]
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
            return MaterializedGradients({p: p.new_zeros((0, *p.shape)) for p in params}, 0, tags)
        scale = float(batch_size) if self.scale_by_batch else 1.0
        grads = FastGradients(calls, owned, fallback, batch_size, scale, frozenset(tags))
        if not self._checked_attribution:
            check_attribution(grads, wanted, self.module, self.scale_by_batch)
            self._checked_attribution = True
        self._skip_autograd_weight_grads = self._may_skip_autograd_weight_grads
        return grads

    def discard(self) -> None:
        """Drop pending calls and records. Layers replayed for this step stay so until collect: the backward pass
        of a forward pass that ran before the discard still delivers to the replay, not to the layers' calls."""
        self._calls = []
        self._outside_use = set()
        self._root_replay.discard()
        for sampler, _ in self.fallbacks:
            sampler.discard()

    def pending_forward_passes(self) -> int:
        replays = [self._root_replay] + [sampler for sampler, _ in self.fallbacks]
        return max([len({forward for _, _, forward, _ in self._calls})] + [r.pending_forward_passes() for r in replays])

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._decomposed:
            del module.forward
        self._decomposed = []
        self._root_replay.detach()
        for sampler in [sampler for sampler, _ in self.fallbacks] + [sampler for _, sampler in self._functional]:
            sampler.detach()  # twice for a functional layer that fell back: harmless
        self._calls = []
