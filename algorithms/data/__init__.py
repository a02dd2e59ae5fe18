"""The data layer: JSONL -> validated examples -> tokens and loss masks -> numpy batches.

Backend-free (imports neither mlx nor torch). Modules, in data-flow order:

- :mod:`.records`: reading ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl``, ``DataError``.
- :mod:`.formats`: the four formats and every validation rule.
- :mod:`.tokenize`: token ids, chat-template assistant spans, loss masks, truncation.
- :mod:`.dataset`: ``prepare_dataset`` (+ ``--skip-invalid`` report), ``render_prompt``.
- :mod:`.batching`: padding / best-fit-decreasing packing, ``BatchPlan``, ``collate``.
"""

from .batching import Batch, BatchPlan, collate, epoch_rng, pack_best_fit_decreasing, position_ids
from .dataset import (
                      DatasetReport,
                      TokenizedDataset,
                      prepare_dataset,
                      render_prompt,
                      unwrap_tokenizer,
)
from .formats import (
                      CHAT_PROMPT_COMPLETION,
                      MESSAGES,
                      PROMPT_COMPLETION,
                      ROLES,
                      TEXT,
                      check_record,
                      detect_format,
)
from .prepared import PreparedData
from .records import DataError, Record, load_split, read_jsonl, split_path
from .tokenize import TRAIN_ON, Example, chat_spans, render_chat, tokenize_record

__all__ = [
                      "CHAT_PROMPT_COMPLETION",
                      "MESSAGES",
                      "PROMPT_COMPLETION",
                      "ROLES",
                      "TEXT",
                      "TRAIN_ON",
                      "Batch",
                      "BatchPlan",
                      "DataError",
                      "DatasetReport",
                      "Example",
                      "PreparedData",
                      "Record",
                      "TokenizedDataset",
                      "chat_spans",
                      "check_record",
                      "collate",
                      "detect_format",
                      "epoch_rng",
                      "load_split",
                      "pack_best_fit_decreasing",
                      "position_ids",
                      "prepare_dataset",
                      "read_jsonl",
                      "render_chat",
                      "render_prompt",
                      "split_path",
                      "tokenize_record",
                      "unwrap_tokenizer",
]
