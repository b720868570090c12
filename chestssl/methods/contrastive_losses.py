"""The contrastive losses, as pure functions on embeddings: SimCLR's NT-Xent and MoCo's InfoNCE with a queue.

Legend: ``N`` samples (pairs of views), ``M`` anchor samples, ``B`` queries, ``K`` queued keys, ``E`` embedding
width. Both compare cosine similarities divided by a temperature, in float32 with autocast off (a bf16 logit at
temperature 0.1 is off by several hundredths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(view1: torch.Tensor, view2: torch.Tensor, temperature: float = 0.5,
            anchors: slice | None = None) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (Chen et al. 2020, eq. 1).

    Each of the 2N embeddings is an anchor; its positive is the other view of its sample, its negatives the
    other 2N - 2 embeddings: ``-log(exp(sim_ij / t) / sum_{k != i} exp(sim_ik / t))`` with ``sim`` the cosine,
    averaged over the anchors. For N identical embeddings every similarity is equal and the loss is log(2N - 1).

    Args:
        view1, view2: (N, E) embeddings (not necessarily normalised); row i of both comes from sample i.
        temperature: t.
        anchors: the samples whose two views are anchors (default: all N). The others are only negatives, as
            when the rows are a batch gathered from every process and each process takes its own share.

    Returns:
        The mean over the 2M anchors, a scalar.
    """
    if view1.shape != view2.shape or view1.ndim != 2:
        raise ValueError(f"nt_xent needs two (N, E) embeddings of one shape, got {tuple(view1.shape)} and "
                         f"{tuple(view2.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    count = view1.shape[0]
    with torch.autocast(device_type=view1.device.type, enabled=False):
        embeddings = F.normalize(torch.cat([view1, view2]).float(), dim=1)  # (2N, E)
        rows = torch.arange(count, device=view1.device)[anchors if anchors is not None else slice(None)]  # (M,)
        anchor_rows = torch.cat([rows, rows + count])  # (2M,): first views, then second views
        positive_rows = torch.cat([rows + count, rows])
        logits = embeddings[anchor_rows] @ embeddings.T / temperature  # (2M, 2N)
        itself = torch.zeros_like(logits, dtype=torch.bool)
        itself[torch.arange(len(anchor_rows), device=logits.device), anchor_rows] = True
        logits = logits.masked_fill(itself, float("-inf"))  # an anchor is not its own negative
        return F.cross_entropy(logits, positive_rows)


def info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2,
             excluded: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with a queue of negatives (He et al. 2020, eq. 1; MoCo v2's temperature is 0.2).

    ``-log(exp(q.k+ / t) / (exp(q.k+ / t) + sum_j exp(q.k_j / t)))`` with cosine similarities, where ``k+`` is
    the key of the query's own sample and ``k_j`` the queued keys, averaged over the queries. Gradients flow
    into whatever requires them: MoCo passes keys and queue without.

    Args:
        query: (B, E) queries.
        key: (B, E) their positive keys, row for row.
        queue: (K, E) negative keys.
        temperature: t.
        excluded: optional bool (B, K), True where a queued key must not count as query i's negative (an older
            key of the same sample).

    Returns:
        The mean over the B queries, a scalar.
    """
    if query.shape != key.shape or query.ndim != 2 or queue.ndim != 2 or queue.shape[1] != query.shape[1]:
        raise ValueError(f"info_nce needs (B, E) query and key and a (K, E) queue, got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(queue.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with torch.autocast(device_type=query.device.type, enabled=False):
        query, key = F.normalize(query.float(), dim=1), F.normalize(key.float(), dim=1)
        queue = F.normalize(queue.float(), dim=1)
        positive = (query * key).sum(dim=1, keepdim=True)  # (B, 1)
        negative = query @ queue.T  # (B, K)
        if excluded is not None:
            negative = negative.masked_fill(excluded, float("-inf"))
        logits = torch.cat([positive, negative], dim=1) / temperature  # (B, 1 + K), the positive first
        return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))
