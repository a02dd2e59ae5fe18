"""Validation hold-out and weighted mixing of several sources: pure functions of data and seed.

Hold-out (``--valid-fraction``, for a source that has no validation split of its own): a
fraction ``f < 1`` holds out ``round(f * n)`` of the source's ``n`` examples, a number
``>= 1`` that many (shared over the sources that need one, in proportion to their sizes). The
held-out examples are those whose row keys (a hash of each row's content, see
:func:`.parallel.row_key`) sort first: the same rows on every run, whatever the seed, the row
order or the machine, and identical rows never straddle the split (a run of equal keys stays on
the training side when the cut would fall inside it). At least one example always trains.

Mixing (``--data a:0.7 b:0.3``): with ``N`` the total number of training examples over the
sources and ``p_i = w_i / sum(w)``, source ``i`` contributes ``k_i = p_i * N`` examples
(largest-remainder rounding, so the ``k_i`` add up to ``N``): every example ``k_i // n_i``
times, plus ``k_i mod n_i`` distinct ones drawn with ``numpy.random.default_rng([seed, 7919,
i])``. Without weights the sources are concatenated (``k_i = n_i``). The result depends only on
the sources' examples, the weights, their order and ``--seed``.
"""

from __future__ import annotations

import math

import numpy as np

MIX_STREAM = 7919  # separates the mixing draws from every other use of the seed


def largest_remainder(shares: list[float], total: int) -> list[int]:
    """Integers proportional to ``shares`` that add up to ``total`` (Hamilton's method)."""
    whole = sum(shares)
    exact = [total * s / whole for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def holdout_counts(sizes: list[int], amount: float) -> list[int]:
    """How many examples each source holds out for validation (module doc)."""
    if amount <= 0:
        return [0] * len(sizes)
    if amount < 1:
        return [min(round(amount * n), n - 1) for n in sizes]
    counts = largest_remainder([float(n) for n in sizes], int(amount))
    return [min(k, n - 1) for k, n in zip(counts, sizes)]


def hold_out(keys: list[str], count: int) -> tuple[list[int], list[int]]:
    """(train indices, valid indices), both ascending: the ``count`` rows whose keys sort first
    (shortened so that a run of equal keys is not cut)."""
    n = len(keys)
    count = max(0, min(count, n - 1))
    order = sorted(range(n), key=lambda i: (keys[i], i))
    while 0 < count < n and keys[order[count - 1]] == keys[order[count]]:
        count -= 1
    return sorted(order[count:]), sorted(order[:count])


def draw(sizes: list[int], weights: list[float | None], seed: int) -> list[np.ndarray]:
    """For each source, the indices of its examples in the mix, in order (module doc)."""
    if all(w is None for w in weights):
        return [np.arange(n) for n in sizes]
    counts = largest_remainder([float(w) for w in weights], sum(sizes))
    out = []
    for i, (n, k) in enumerate(zip(sizes, counts)):
        full, rest = divmod(k, n)
        rng = np.random.default_rng([seed, MIX_STREAM, i])
        extra = np.sort(rng.choice(n, size=rest, replace=False))
        out.append(np.concatenate([np.tile(np.arange(n), full), extra]).astype(np.int64))
    return out
