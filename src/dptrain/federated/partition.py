"""Client partitions of real data: a Dirichlet(alpha) split over labels (Hsu et al. 2019), seeded; or one client per
user (the support-chat corpus of ``dptrain.lm``: each user's conversations on their own device or desk).

For each class, the class's examples are shuffled and cut among the K clients in proportions drawn from
Dirichlet(alpha, ..., alpha): small alpha gives clients few classes each (alpha = 0.5 is the common "non-IID"
setting), large alpha tends to an IID split. Draws are repeated until every client holds at least ``min_size``
examples, so no client is empty. The partition is a function of the labels and the seed only.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Subset, TensorDataset

from dptrain.datasets import load_digits_split

#: Draws tried before giving up on a partition where every client has ``min_size`` examples.
MAX_DRAWS = 1000


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float = 0.5, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Indices of each client's examples (disjoint, together every example, each sorted)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-d sequence, got shape {labels.shape}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha (the Dirichlet concentration) must be > 0, got {alpha!r}")
    if num_clients * min_size > labels.size:
        raise ValueError(f"{labels.size} examples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(int)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split in {MAX_DRAWS} draws gave each of {num_clients} clients {min_size} "
        "examples: use fewer clients or a larger alpha"
    )


def digits_clients(
    num_clients: int, alpha: float = 0.5, seed: int = 0
) -> tuple[list[Subset], TensorDataset]:
    """scikit-learn's digits (the 80% training split) cut among ``num_clients`` clients by :func:`dirichlet_partition`,
    and the held-out 20% test set (for the server's evaluation)."""
    train, test = load_digits_split(seed=seed)
    parts = dirichlet_partition(train.tensors[1].numpy(), num_clients, alpha, seed)
    return [Subset(train, part.tolist()) for part in parts], test


def partition_by_user(user_ids: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """Indices of each user's examples, one client per distinct user (users in ascending order)."""
    users = np.asarray(user_ids)
    if users.ndim != 1 or users.size == 0:
        raise ValueError(f"user_ids must be a non-empty 1-d sequence, got shape {users.shape}")
    return [np.flatnonzero(users == u) for u in np.unique(users)]


def support_chat_clients(tokenizer: Any, num_users: int = 50, max_length: int = 96, seed: int = 0) -> list[Subset]:
    """The support-chat corpus of ``dptrain.lm`` (``num_users`` training users), one client per user: each client's
    dataset holds that user's conversations as ``(input_ids, attention_mask)``."""
    # dptrain.lm loads transformers: only this function needs it
    from dptrain.lm import lm_dataset, support_chat_corpus

    corpus = support_chat_corpus(num_users=num_users, validation_users=0, seed=seed)
    data = lm_dataset(tokenizer, corpus.texts("train"), max_length)
    return [Subset(data, part.tolist()) for part in partition_by_user(corpus.user_ids("train"))]
