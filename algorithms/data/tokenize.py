"""Tokenisation and loss masks: one validated record -> token ids + a per-token loss mask.

Token ids come from the Hugging Face tokenizer both backends share:

- ``text``: ``tokenizer(text) + [eos]``.
- ``prompt_completion`` (strings, no chat template, as TRL does):
  ``tokenizer(prompt) + tokenizer(completion, add_special_tokens=False) + [eos]``.
- chat formats: the chat template rendered to ONE string, tokenised once (``add_special_tokens
  =False``: the template writes any BOS itself).

``loss_mask[i] = 1`` iff token ``i`` is trained, i.e. is a target the model must predict (the
collator shifts it onto position ``i - 1``). By ``train_on``:

- ``auto`` / ``completion``: the completion tokens and the eos for ``prompt_completion``;
  everything after ``render(prompt, add_generation_prompt=True)`` for ``chat_prompt_completion``;
  every assistant turn for ``messages``. ``auto`` on ``text`` trains every token.
- ``all``: every token.

Assistant spans are found on the rendered STRING: turn ``i`` spans characters
``[len(render(m[:i], add_generation_prompt=True)), len(render(m[:i+1])))``, and both renderings
must be prefixes of the full rendering (else the template is not prefix-stable and we refuse to
guess). Whitespace the template writes after the end-of-turn token (the eos or another special
token) is not trained; the end-of-turn token is (``after_eot=True``, ``--train-after-eot``: that
whitespace is trained too, as TRL does). A token is trained iff its character offsets
overlap a trained span (so a token that merges the prompt's trailing space with the first word of
the reply is trained).

The first token of a document is never a target, so ``loss_mask[0] = 0`` always. Examples longer
than ``max_length`` keep their first ``max_length`` tokens; one left with no trained token is an
error (``fully_masked``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .formats import CHAT_PROMPT_COMPLETION, MESSAGES, PROMPT_COMPLETION, TEXT
from .records import DataError, Record

TRAIN_ON = ("auto", "completion", "all")


@dataclass(slots=True)
class Example:
    """One tokenised example: ``input_ids``, per-token ``loss_mask`` (0/1) and its ``source``."""

    input_ids: list[int]
    loss_mask: list[int]
    source: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def tokenize_record(record: Record, fmt: str, tokenizer: Any, train_on: str,
                    max_length: int, after_eot: bool = False) -> Example:
    """Tokenise one validated record of format ``fmt`` and build its loss mask (see module doc)."""
    data = record.data
    if fmt == TEXT:
        ids = _append_eos(_encode(tokenizer, data["text"], True), tokenizer)
        mask = [1] * len(ids)
    elif fmt == PROMPT_COMPLETION:
        prompt = _encode(tokenizer, data["prompt"], True)
        completion = _append_eos(_encode(tokenizer, data["completion"], False), tokenizer)
        ids = prompt + completion
        mask = [int(train_on == "all")] * len(prompt) + [1] * len(completion)
    elif fmt in (CHAT_PROMPT_COMPLETION, MESSAGES):
        ids, mask = _tokenize_chat(record, fmt, tokenizer, train_on, after_eot)
    else:  # pragma: no cover - formats.detect_format returns one of the four
        raise ValueError(fmt)
    if mask:
        mask[0] = 0
    n_tokens = len(ids)
    truncated = n_tokens > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        why = (f"fully masked after truncation to {max_length} tokens (it has {n_tokens}, and "
               "every trained token is past the cut); raise --max-length or shorten the prompt"
               if truncated else "has no token that carries loss")
        raise record.fail("fully_masked", why)
    return Example(ids, mask, record.source, truncated)


def render_chat(tokenizer: Any, messages: list, tools: list | None, kwargs: dict | None,
                add_generation_prompt: bool) -> str:
    """The chat template applied to ``messages`` as a string (no tokenisation)."""
    extra = dict(kwargs or {})
    if tools is not None:
        extra["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **extra)


def chat_spans(record: Record, fmt: str, tokenizer: Any,
               after_eot: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering of a chat example and the character spans that carry loss (with
    ``after_eot``, each span keeps the whitespace written after its end-of-turn token)."""
    messages = _conversation(record, fmt)
    if fmt == MESSAGES:  # "weight": 0 turns are context, not trained (formats.py)
        turns = [i for i, m in enumerate(messages)
                 if m["role"] == "assistant" and m.get("weight", 1) != 0]
    else:
        turns = [len(record.data["prompt"])]  # one span: from the end of the prompt to the end
    full = _render(record, tokenizer, messages, False)
    spans = []
    for i in turns:
        before = _render(record, tokenizer, messages[:i], True)
        last = fmt == CHAT_PROMPT_COMPLETION or i == len(messages) - 1  # renders as ``full``
        after = full if last else _render(record, tokenizer, messages[: i + 1], False)
        for part, what in ((before, f"messages[:{i}] with add_generation_prompt=True"),
                           (after, f"messages[:{i + 1}]")):
            if not full.startswith(part):
                raise record.fail("template_not_prefix_stable", (
                    f"the chat template is not prefix-stable: rendering {what} is not a prefix "
                    "of rendering the whole conversation, so the assistant tokens cannot be "
                    "located; use a template that renders earlier turns identically (or "
                    "--train-on all)"))
        end = len(after) if after_eot else _trim_after_eos(full, len(before), len(after), tokenizer)
        spans.append((len(before), end))
    return full, spans


def _conversation(record: Record, fmt: str) -> list:
    data = record.data
    return data["messages"] if fmt == MESSAGES else data["prompt"] + data["completion"]


def _render(record: Record, tokenizer: Any, messages: list, add_generation_prompt: bool) -> str:
    data = record.data
    try:
        return render_chat(tokenizer, messages, data.get("tools"),
                           data.get("chat_template_kwargs"), add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in templates
        raise record.fail("template_error", "the chat template failed on this example: "
                          f"{type(e).__name__}: {e}") from None


def _trim_after_eos(full: str, start: int, end: int, tokenizer: Any) -> int:
    """Drop whitespace the template writes after the end-of-turn token from a trained span.

    The end-of-turn token is the eos or another special token (Gemma's ``<end_of_turn>``,
    Llama 3's ``<|eot_id|>``); a template whose turns end in plain text keeps its span whole.
    """
    stripped = full[start:end].rstrip()
    if len(stripped) == end - start:
        return end
    specials = {tokenizer.eos_token, *getattr(tokenizer, "all_special_tokens", [])} - {None, ""}
    if any(stripped.endswith(s) for s in specials):
        return start + len(stripped)
    return end


def _tokenize_chat(record: Record, fmt: str, tokenizer: Any, train_on: str,
                   after_eot: bool = False) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{record.file}: {fmt} data needs a tokenizer with a chat template; this "
                        "tokenizer has none (give one with --chat-template chatml, llama3, gemma "
                        "or a file; or use text or prompt/completion strings)", source=record.file)
    if train_on == "all":
        full = _render(record, tokenizer, _conversation(record, fmt), False)
        spans = [(0, len(full))]
    else:
        full, spans = chat_spans(record, fmt, tokenizer, after_eot)
    try:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(f"{record.file}: chat data needs a fast tokenizer (offsets mapping); "
                        f"{type(tokenizer).__name__} has none", source=record.file) from None
    return list(enc["input_ids"]), overlap_mask(enc["offset_mapping"], spans)


def overlap_mask(offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters ``[s, e)`` overlap a span (a zero-width token counts
    where it sits). One sweep: spans are sorted and disjoint, token starts non-decreasing."""
    spans = sorted(spans)
    mask, j, last = [], 0, -1
    for s, e in offsets:
        if s < last:  # offsets went backwards (never for byte-level BPE): start over
            j = 0
        last = s
        e = max(e, s + 1)
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        mask.append(int(j < len(spans) and spans[j][0] < e))
    return mask


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _append_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token, needed to end text and completions")
    return ids if ids and ids[-1] == eos else ids + [eos]
