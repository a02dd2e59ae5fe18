"""From ``--data`` to a family's train / valid datasets: read, convert, tokenise, hold out, mix.

For each source (:mod:`.sources`) and each of its splits (:mod:`.readers`): look the split up in
the tokenisation cache (:mod:`.cache`); on a miss read its rows, choose its layout
(:mod:`.layout_choice`), validate and tokenise every row (:mod:`.parallel`, with the family's
processor) and store the result. Then a source without a validation split holds some rows out
(``--valid-fraction``), the training splits are mixed by weight and the validation splits
concatenated (:mod:`.mixing`), and the family builds its datasets and reports.

A family is one kind of data (SFT, paired or unpaired preference, RL prompts): its processor,
the settings that shape its tokens, how it builds a dataset from examples (:class:`Family`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import cache as data_cache
from .fingerprint import code_fingerprint, tokenizer_fingerprint
from .layout_choice import resolve_layout
from .layouts import check_family_format
from .mixing import draw, hold_out, holdout_counts
from .parallel import Processed, process_records, worker_count
from .readers import SplitSource, locate
from .records import DataError, nothing_usable
from .sources import SourceSpec, parse_sources


@dataclass(frozen=True)
class Family:
    """One kind of data: ``make_processor(tokenizer, cfg, label)`` validates and tokenises a row
    (see :mod:`.parallel`); ``settings(cfg)`` is what shapes its tokens (a cache key part);
    ``format_of(context)`` names a source's format; ``finish(processed)`` post-processes a source
    (KTO unpairs pairs); ``build(examples, parts, tokenizer, cfg)`` makes the dataset;
    ``layout`` names the family whose row layouts and formats it reads when not its own (GKD's
    data is SFT's)."""

    name: str
    make_processor: Callable[[Any, Any, str], Any]
    settings: Callable[[Any], dict]
    format_of: Callable[[Any], str]
    build: Callable[[list, list, Any, Any], Any]
    finish: Callable[[Processed], Processed] | None = None
    what: str = "examples"
    layout: str = ""

    @property
    def layout_family(self) -> str:
        return self.layout or self.name


@dataclass
class Part:
    """One source split as tokenised, and what holding out and mixing did to it."""

    label: str
    layout: str
    format: str
    examples: list
    keys: list[str]
    n_rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    cached: bool = False
    held_out: int = 0
    weight: float | None = None
    drawn: int | None = None

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def line(self) -> str:
        """One line of the per-source report printed before training."""
        layout = "" if self.layout == "native" else f"{self.layout} -> "
        text = (f"{self.label} ({layout}{self.format}): {self.n_rows:,} rows, "
                f"{len(self.examples) + self.held_out:,} kept")
        if self.n_skipped:
            rules = ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items()))
            text += f", {self.n_skipped:,} skipped ({rules})"
        if self.ignored:
            text += f"; columns not read: {', '.join(self.ignored)}"
        if self.held_out:
            text += f"; {self.held_out:,} held out for validation"
        if self.drawn is not None:
            ratio = self.drawn / max(1, len(self.examples))
            text += f"; weight {self.weight:g} -> {self.drawn:,} examples ({ratio:.2f}x)"
        return text + (" [cached]" if self.cached else "")


@dataclass
class SplitReport:
    """A split's per-source lines and its family report (attributes delegate to it)."""

    summary: Any
    sources: list[str]

    def __getattr__(self, name: str) -> Any:
        if name == "summary":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.summary, name)

    def __str__(self) -> str:
        lines = [f"  source: {line}" for line in self.sources]
        return "\n".join([str(self.summary), *lines])


def skipped_by_rule(parts: list[Part]) -> dict[str, int]:
    """The skipped-row counts of several parts, added up by rule (sorted)."""
    total: dict[str, int] = {}
    for part in parts:
        for rule, n in part.skipped.items():
            total[rule] = total.get(rule, 0) + n
    return dict(sorted(total.items()))


def parts_name(parts: list[Part]) -> str:
    """What a report calls a split's origin: its one source, or how many."""
    return parts[0].label if len(parts) == 1 else f"{len(parts)} sources"


def prepare_splits(cfg: Any, tokenizer: Any, family: Family) -> dict[str, Any]:
    """``{"train": dataset, "valid": dataset or None, "test": dataset or None}`` and their
    reports (module doc). The test split is never mixed or held out: it is every source's own
    test split, for evaluation."""
    specs = parse_sources(cfg.data, getattr(cfg, "data_split", "train"),
                          getattr(cfg, "data_config", ""), getattr(cfg, "data_format", "auto"),
                          getattr(cfg, "columns", ()))
    for spec in specs:
        check_family_format(family.layout_family, spec.format,
                            "--data-format" if len(specs) == 1 else f"--data {spec.path}: format")
    started = time.perf_counter()
    from .dataset import unwrap_tokenizer

    tokenizer = unwrap_tokenizer(tokenizer)
    tokenizer_fp = tokenizer_fingerprint(tokenizer) if getattr(cfg, "data_cache", False) else ""
    loaded = []
    for spec in specs:
        located = locate(spec)
        loaded.append((spec, {split: load_split(located[split], spec, family, tokenizer, cfg,
                                                tokenizer_fp)
                              for split in ("train", "valid", "test") if split in located}))
    _hold_out(loaded, float(getattr(cfg, "valid_fraction", 0.0) or 0.0))
    train_parts = [splits["train"] for _, splits in loaded]
    picks = draw([len(p.examples) for p in train_parts], [s.weight for s, _ in loaded],
                 int(getattr(cfg, "seed", 0)))
    weighted = any(s.weight is not None for s, _ in loaded)
    train = []
    for (spec, _), part, idx in zip(loaded, train_parts, picks):
        train += [part.examples[i] for i in idx]
        if weighted:
            part.weight, part.drawn = spec.weight, len(idx)
    valid_parts = [splits["valid"] for _, splits in loaded if "valid" in splits]
    valid = [e for p in valid_parts for e in p.examples]
    elapsed = time.perf_counter() - started
    if elapsed > 2 and getattr(cfg, "progress", True):
        print(f"data: prepared in {elapsed:.1f}s", file=sys.stderr)
    test_parts = [splits["test"] for _, splits in loaded if "test" in splits]
    test = [e for p in test_parts for e in p.examples]
    out = {"train": _built(family, train, train_parts, tokenizer, cfg, len(specs) > 1)}
    out["valid"] = (_built(family, valid, valid_parts, tokenizer, cfg, len(specs) > 1)
                    if valid else None)
    out["test"] = (_built(family, test, test_parts, tokenizer, cfg, len(specs) > 1)
                   if test else None)
    return out


def _built(family: Family, examples: list, parts: list[Part], tokenizer: Any, cfg: Any,
           several: bool) -> Any:
    dataset = family.build(examples, parts, tokenizer, cfg)
    informative = several or any(p.layout != "native" or p.ignored or p.held_out or
                                 p.drawn is not None for p in parts)
    dataset.split_report = SplitReport(dataset.report, [p.line() for p in parts]
                                       if informative else [])
    return dataset


def _hold_out(loaded: list, amount: float) -> None:
    """Split a validation part off every source that has none (see :mod:`.mixing`)."""
    needing = [splits for _, splits in loaded if "valid" not in splits]
    counts = holdout_counts([len(s["train"].examples) for s in needing], amount)
    for splits, count in zip(needing, counts):
        if count <= 0:
            continue
        part = splits["train"]
        train_idx, valid_idx = hold_out(part.keys, count)
        if not valid_idx:
            continue
        splits["valid"] = Part(f"{part.label}, held out", part.layout, part.format,
                               [part.examples[i] for i in valid_idx],
                               [part.keys[i] for i in valid_idx], len(valid_idx))
        part.examples = [part.examples[i] for i in train_idx]
        part.keys = [part.keys[i] for i in train_idx]
        part.held_out = len(valid_idx)


def load_split(source: SplitSource, spec: SourceSpec, family: Family, tokenizer: Any,
               cfg: Any, tokenizer_fp: str = "") -> Part:
    """One source split, validated and tokenised: from the cache, or read and processed."""
    from .dataset import unwrap_tokenizer

    tokenizer = unwrap_tokenizer(tokenizer)
    skip_invalid = bool(getattr(cfg, "skip_invalid", False))
    use_cache = bool(getattr(cfg, "data_cache", False))
    key = None
    if use_cache:
        options = {k: v for k, v in spec.describe().items() if k not in ("weight", "path")}
        key = data_cache.cache_key({
            "identity": source.identity, "label": source.label, "source": options,
            "family": family.name, "settings": family.settings(cfg),
            "skip_invalid": skip_invalid,
            "tokenizer": tokenizer_fp or tokenizer_fingerprint(tokenizer),
            "code": code_fingerprint()})
        hit = data_cache.load(key)
        if hit is not None:
            return Part(**hit, cached=True)
    rows = source.read()
    layout, ignored = resolve_layout(family.layout_family, spec.format, spec.columns, rows.records,
                                     rows.columns, source.label)
    processor = family.make_processor(tokenizer, cfg, source.label)
    workers = worker_count(int(getattr(cfg, "data_workers", 0) or 0), len(rows.records))
    processed = process_records(rows.records, layout, processor, skip_invalid, workers)
    if family.finish is not None:
        processed = family.finish(processed)
    if not processed.examples:
        raise nothing_usable(source.label, processed.skipped, processed.messages, family.what)
    part = Part(source.label, layout.name, family.format_of(processed.context),
                processed.examples, processed.keys, rows.n_rows,
                dict(sorted(processed.skipped.items())), processed.messages, ignored)
    if key is not None:
        data_cache.save(key, {k: getattr(part, k) for k in (
            "label", "layout", "format", "examples", "keys", "n_rows", "skipped", "messages",
            "ignored")})
    return part


def single_source_split(path: Any, split: str, tokenizer: Any, cfg: Any,
                        family: Family) -> Any:
    """``split`` ("train" / "valid") of one path as the family's dataset; None when absent.

    The API the tests and tools use for one file or directory (no mixing, no hold-out)."""
    if split not in ("train", "valid", "test"):
        raise DataError(f"unknown split {split!r}; expected train, valid or test")
    spec = parse_sources([str(path)], "train", "", getattr(cfg, "data_format", "auto"),
                         getattr(cfg, "columns", ()))[0]
    located = locate(spec)
    if split not in located:
        return None
    part = load_split(located[split], spec, family, tokenizer, cfg)
    return family.build(part.examples, [part], tokenizer, cfg)
