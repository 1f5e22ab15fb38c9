"""The language-modelling loss for DP training: each example's own mean token loss, then a mean over examples.

Why not the usual loss? Hugging Face's ``model(input_ids, labels=labels).loss`` (and ``F.cross_entropy`` over the
flattened batch) is the mean over *all non-ignored tokens of the batch*: example i's term is divided by the total
token count of the batch, so its gradient depends on how many tokens the *other* examples have. DP-SGD clips each
example's gradient and divides by the expected batch size, assuming a per-example loss whose gradient is a
function of that example alone; a batch-wide token mean breaks that (an example's clipped contribution would be
rescaled by the others' lengths, and adding or removing an example would change the others' gradients), so it does
not match what the engine clips. Here example i's loss is

    l_i = (1 / n_i) * sum_{t in tokens of i} -log p(x_{t+1} | x_{<=t}),

with n_i its own number of predicted tokens, and the batch loss is mean_i l_i (``reduction="mean"``, for
``loss_reduction="mean"`` in ``make_private``) or sum_i l_i (``"sum"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy, averaged over each example's own predicted tokens, then over examples.

    ``logits`` (B, T, V) are the model's outputs at positions 0..T-1; ``labels`` (B, T) the tokens (usually the
    ``input_ids``): position t's logits predict ``labels[:, t + 1]`` (the shift is done here, as in Hugging Face).
    A label equal to ``ignore_index``, or (with ``attention_mask``) at a position whose mask is 0 (padding), is not
    predicted. An example with no predicted token has loss 0. ``reduction``: "mean" (default) or "sum" over
    examples, or "none" for the per-example losses (B,). A batch of zero examples gives 0 (keeping the graph), as
    DP-SGD's empty Poisson batches need.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (batch, steps, vocab) and labels (batch, steps); got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    keep = targets != ignore_index
    if attention_mask is not None:
        if attention_mask.shape != labels.shape:
            raise ValueError(f"attention_mask must have the labels' shape {tuple(labels.shape)}")
        keep = keep & attention_mask[:, 1:].bool()
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), safe_targets, reduction="none")
    per_token = per_token * keep.to(per_token.dtype)
    counts = keep.sum(1)
    per_example = per_token.sum(1) / counts.clamp(min=1).to(per_token.dtype)
    if reduction == "none":
        return per_example
    if per_example.numel() == 0:
        return logits.sum() * 0.0
    return per_example.mean() if reduction == "mean" else per_example.sum()


def token_log_likelihoods(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(input_ids[:, t + 1] | input_ids[:, <= t]) for t = 0..T-2, shape (B, T-1); 0 where masked."""
    shifted = logits[:, :-1]
    if shifted.dtype in (torch.float16, torch.bfloat16):
        shifted = shifted.float()
    log_probs = torch.log_softmax(shifted, dim=-1)
    out = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    if attention_mask is not None:
        out = out * attention_mask[:, 1:].to(out.dtype)
    return out
