"""Nearest-neighbour search on volume embeddings and seeded reference choice.

Distances are computed for many queries at once with batched tensor ops (``torch.cdist`` or a
matrix product of unit vectors); ties are broken by index (stable sort) so results are exact
and reproducible.
"""

from __future__ import annotations

import torch

__all__ = ["METRICS", "pairwise_distances", "nearest_neighbours", "ReferenceSampler"]

METRICS = ("l2", "cosine")


def pairwise_distances(queries: torch.Tensor, embeddings: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Distances between every query and every embedding.

    Args:
        queries: ``(Q, D)``.
        embeddings: ``(N, D)``.
        metric: ``"l2"`` (Euclidean) or ``"cosine"`` (1 − cosine similarity).

    Returns:
        ``(Q, N)`` float tensor.

    Raises:
        ValueError: unknown metric or mismatched shapes.
    """
    if metric not in METRICS:
        raise ValueError(f"neighbour metric {metric!r} is not one of {METRICS}")
    if queries.ndim != 2 or embeddings.ndim != 2 or queries.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"embeddings must be (Q, D) and (N, D) with the same D, got {tuple(queries.shape)} and {tuple(embeddings.shape)}"
        )
    q, e = queries.double(), embeddings.double()  # float64 on (Q, N) only: exact ranks for near-ties
    if metric == "l2":
        return torch.cdist(q, e, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    q = torch.nn.functional.normalize(q, dim=1)
    e = torch.nn.functional.normalize(e, dim=1)
    return (1.0 - q @ e.T).clamp_min(0.0)


def nearest_neighbours(
    queries: torch.Tensor, embeddings: torch.Tensor, k: int, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest embeddings of every query, nearest first.

    Args:
        queries: ``(Q, D)`` (a single ``(D,)`` vector is accepted).
        embeddings: ``(N, D)``.
        k: neighbours per query, ``1 <= k <= N``.
        metric: see :func:`pairwise_distances`.

    Returns:
        ``(indices, distances)``, both ``(Q, k)``; equal distances are ordered by index.

    Raises:
        ValueError: ``k`` out of range.
    """
    if queries.ndim == 1:
        queries = queries[None]
    n = embeddings.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot take {k} nearest neighbours among {n} volumes; choose a number between 1 and {n}")
    distances = pairwise_distances(queries, embeddings, metric)
    sorted_d, order = torch.sort(distances, dim=1, stable=True)
    return order[:, :k], sorted_d[:, :k]


class ReferenceSampler:
    """Draws reference volumes in a seeded random order, never the same one twice.

    Args:
        num_volumes: the number of candidate references.
        seed: the permutation seed.
        used: indices already consumed (e.g. recorded in a manifest when resuming).
    """

    def __init__(self, num_volumes: int, seed: int, used: set[int] | None = None) -> None:
        self.num_volumes = num_volumes
        self.order = torch.randperm(num_volumes, generator=torch.Generator().manual_seed(seed)).tolist()
        self.used = set(used or ())

    def next(self) -> int:
        """The next unused reference index.

        Raises:
            ValueError: every volume has been used as a reference.
        """
        for index in self.order:
            if index not in self.used:
                self.used.add(index)
                return index
        raise ValueError(
            f"all {self.num_volumes} training volumes have been used as references; ask for fewer classes "
            "or relax the coordinate rules (borders, --max-dense-fraction, --min-distance, --max-outside-fraction; --lung-filter "
            "off for scans that are not chest CT)"
        )
