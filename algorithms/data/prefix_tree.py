"""Shared prefixes: run the tokens that several documents of a batch have in common once.

The ``G`` completions of a GRPO prompt start with the same prompt tokens, and so do the chosen
and rejected rows of a DPO pair. In a causal model the hidden states of a prefix depend only on
the prefix, so documents that start alike (same tokens at the same rotary positions) can share
one computation of it: the documents become a tree whose nodes are runs of tokens, each node
attending to its ancestors' keys and values, then causally to its own. Forward, backward and
every output are those of the documents run apart, with ``1 - (tree tokens / document tokens)``
of the decoder's work saved.

:func:`plan` builds the tree (a radix tree over each document's ``(start, tokens...)``) for the
padding-free paths of both backends. Shared runs shorter than ``min_shared`` tokens are given
back to their children (an attention call per node costs more than a few tokens save).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .batching import document_spans


@dataclasses.dataclass(frozen=True)
class Node:
    row: int        # a row holding this node's tokens ...
    start: int      # ... from this position (also the first rotary position)
    length: int
    parent: int     # index of the parent node, -1 for a root
    at: int         # first index of the node in the flat layout


@dataclasses.dataclass
class Plan:
    """The flat layout of a batch's documents as a prefix tree.

    ``nodes`` are laid end to end (parents before children): ``input_ids`` / ``positions``
    ``[M]``. ``gather [N]``: for each real token of the batch, in :func:`document_spans` order,
    its index in the flat layout (what a padding-free path without sharing would hold there).
    """

    nodes: list[Node]
    input_ids: np.ndarray
    positions: np.ndarray
    gather: np.ndarray

    def ancestors(self, i: int) -> list[int]:
        """Indices of node ``i``'s ancestors, root first."""
        out = []
        parent = self.nodes[i].parent
        while parent >= 0:
            out.append(parent)
            parent = self.nodes[parent].parent
        return out[::-1]

    @property
    def shared(self) -> bool:
        """True if some node has a parent (some tokens are computed once for several docs)."""
        return any(n.parent >= 0 for n in self.nodes)


class _Trie:
    __slots__ = ("children", "depth", "docs")

    def __init__(self, depth: int) -> None:
        self.children: dict[int, _Trie] = {}
        self.docs: list[int] = []  # documents passing through this token
        self.depth = depth


def plan(input_ids: np.ndarray, segment_ids: np.ndarray, min_shared: int = 16) -> Plan:
    """The prefix tree of the batch's documents (module docstring)."""
    return plan_spans(input_ids, document_spans(segment_ids), min_shared)


def plan_spans(input_ids: np.ndarray, spans: list[tuple[int, int, int]],
               min_shared: int = 16) -> Plan:
    """The prefix tree of the documents ``(row, start, length)``; ``gather`` in their order."""
    ids = np.asarray(input_ids)
    roots: dict[int, _Trie] = {}  # by document start: a token is shared at equal positions only
    for d, (r, s, n) in enumerate(spans):
        node = roots.setdefault(s, _Trie(0))
        for token in ids[r, s:s + n].tolist():
            node = node.children.setdefault(token, _Trie(node.depth + 1))
            node.docs.append(d)
    nodes: list[Node] = []
    # each document's token -> index in the flat layout, filled while walking
    where = [np.zeros(n, np.int64) for _, _, n in spans]
    at = 0
    # walk: each stack item is (trie node whose children start new runs, parent node index)
    stack = [(trie, -1, s, 0) for s, trie in sorted(roots.items(), reverse=True)]
    while stack:
        trie, parent, start, carried = stack.pop()
        for child in reversed(list(trie.children.values())):
            # follow the run while exactly the same documents continue
            run, end = child, child
            while len(end.children) == 1:
                nxt = next(iter(end.children.values()))
                if len(nxt.docs) != len(end.docs):
                    break
                end = nxt
            length = end.depth - run.depth + 1
            docs = run.docs
            continuing = sum(len(c.docs) for c in end.children.values())
            if len(docs) > 1 and length + carried < min_shared and continuing == len(docs):
                # too short to share (and no document ends in it): its tokens go to each
                # child run instead
                stack.append((end, parent, start, carried + length))
                continue
            first = spans[docs[0]]
            begin = start + run.depth - 1 - carried
            node = Node(first[0], begin, length + carried, parent, at)
            nodes.append(node)
            for d in docs:
                lo = begin - spans[d][1]
                hi = min(lo + node.length, spans[d][2])
                where[d][lo:hi] = np.arange(at, at + hi - lo)
            at += node.length
            stack.append((end, len(nodes) - 1, start, 0))
    flat_ids = np.concatenate([ids[n.row, n.start:n.start + n.length] for n in nodes]) \
        if nodes else np.zeros(0, np.int64)
    positions = np.concatenate([np.arange(n.start, n.start + n.length) for n in nodes]) \
        if nodes else np.zeros(0, np.int64)
    gather = np.concatenate(where) if where else np.zeros(0, np.int64)
    return Plan(nodes, flat_ids, positions, gather)
