"""Validating and tokenising one source's rows, in several processes when the data is large.

Every row goes through the source's :class:`~.layouts.Layout` and then the family's processor
(``processor(record, context) -> (example, context)``), which checks the row against its
format's rules and tokenises it. ``context`` is what the first good row fixes for the rest (its
format, for the ``mixed_formats`` rule; its columns, for prompt data), so the first good row is
processed here, and the remaining rows, in order-preserving chunks, by a pool of worker
processes (forked on Linux, so nothing is pickled on the way in; spawned elsewhere).

The outcome equals a sequential pass: examples in row order; without ``skip_invalid`` the error
of the earliest bad row is raised; with it every bad row is counted by rule. Each example also
gets its row's content key (:func:`row_key`), which the validation split uses.

Workers: ``--data-workers N``; 0 picks one per idle core (the cores this process may use minus
the 1-minute load average, so a machine busy with other work gets fewer), and only as many as
give each at least :data:`ROWS_PER_WORKER` rows (a pool costs a few hundred ms to start, a
spawned one seconds).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .records import DataError, Record

ROWS_PER_WORKER = 2000
_JOB: tuple | None = None  # (records, layout, processor, context, skip_invalid) in the workers


@dataclass
class Processed:
    """A source split's examples (row order), their row keys, and what was skipped."""

    examples: list
    keys: list[str]
    context: Any = None
    skipped: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)


def row_key(record: Record) -> str:
    """A hash of the row's content as its format reads it (not its position, not the ``id`` /
    ``meta`` it passes through, not the columns it ignores)."""
    data = {k: v for k, v in record.data.items() if k not in ("id", "meta")}
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def worker_count(requested: int, n_rows: int) -> int:
    """Processes to use for ``n_rows`` rows (module doc)."""
    if requested > 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        idle = max(1, round(cpus - os.getloadavg()[0]))
    except (AttributeError, OSError):  # no load average (Windows)
        idle = cpus
    per_worker = ROWS_PER_WORKER if _start_method() == "fork" else 10 * ROWS_PER_WORKER
    return max(1, min(cpus, idle, n_rows // per_worker))


def process_records(records: list[Record], layout: Any, processor: Any, skip_invalid: bool,
                    workers: int = 1) -> Processed:
    """Every record through ``layout`` and ``processor`` (module doc)."""
    out = Processed([], [])
    start = 0
    while out.context is None and start < len(records):  # the first good row fixes the context
        record = records[start]
        start += 1
        try:
            record = layout.apply(record)
            example, out.context = processor(record, None)
        except DataError as e:
            _skip_or_raise(e, skip_invalid, out)
            continue
        out.examples.append(example)
        out.keys.append(row_key(record))
    rest = len(records) - start
    workers = min(workers, max(1, rest // 64))
    if workers <= 1:
        results = [_chunk(records[start:], layout, processor, out.context, skip_invalid)]
    else:
        results = _in_pool(records, start, layout, processor, out.context, skip_invalid, workers)
    for examples, keys, skipped, error in results:
        out.examples += examples
        out.keys += keys
        for rule, message in skipped:
            out.skipped[rule] += 1
            out.messages.append(message)
        if error is not None:
            message, rule, source = error
            raise DataError(message, rule=rule, source=source)
    return out


def _skip_or_raise(e: DataError, skip_invalid: bool, out: Processed) -> None:
    if not skip_invalid or e.rule == "file":
        raise e
    out.skipped[e.rule] += 1
    out.messages.append(str(e))


def _chunk(records: list[Record], layout: Any, processor: Any, context: Any,
           skip_invalid: bool) -> tuple[list, list, list, tuple | None]:
    """(examples, keys, skipped (rule, message) pairs, the first fatal error or None)."""
    examples, keys, skipped = [], [], []
    for record in records:
        try:
            record = layout.apply(record)
            example, _ = processor(record, context)
        except DataError as e:
            if not skip_invalid or e.rule == "file":
                return examples, keys, skipped, (str(e), e.rule, e.source)
            skipped.append((e.rule, str(e)))
            continue
        examples.append(example)
        keys.append(row_key(record))
    return examples, keys, skipped, None


def _start_method() -> str:
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _in_pool(records: list[Record], start: int, layout: Any, processor: Any, context: Any,
             skip_invalid: bool, workers: int) -> list:
    global _JOB
    n = len(records) - start
    size = -(-n // (workers * 4))  # four chunks per worker evens out uneven rows
    bounds = [(start + i, min(start + i + size, len(records))) for i in range(0, n, size)]
    method = _start_method()
    ctx = multiprocessing.get_context(method)
    if method == "fork":
        _JOB = (records, layout, processor, context, skip_invalid)
        try:
            with ctx.Pool(workers) as pool:
                return pool.map(_forked_chunk, bounds, chunksize=1)
        finally:
            _JOB = None
    with ctx.Pool(workers, initializer=_set_job,
                  initargs=((None, layout, processor, context, skip_invalid),)) as pool:
        return pool.map(_spawned_chunk, [records[a:b] for a, b in bounds], chunksize=1)


def _forked_chunk(bounds: tuple[int, int]) -> tuple:
    records, layout, processor, context, skip_invalid = _JOB
    return _chunk(records[bounds[0]:bounds[1]], layout, processor, context, skip_invalid)


def _set_job(job: tuple) -> None:
    global _JOB
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _JOB = job


def _spawned_chunk(records: list[Record]) -> tuple:
    _, layout, processor, context, skip_invalid = _JOB
    return _chunk(records, layout, processor, context, skip_invalid)
