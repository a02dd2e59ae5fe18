"""``--chat-template``: a Jinja file or a built-in template, for models with none or another one.

    --chat-template chatml      # <|im_start|>role\\n...<|im_end|>\\n  (Qwen, SmolLM, Hermes)
    --chat-template llama3      # <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>
    --chat-template gemma       # <start_of_turn>user|model\\n...<end_of_turn>\\n
    --chat-template my.jinja    # any Jinja chat template (HF's apply_chat_template rules)

The template replaces the tokenizer's own for everything in the run (data rendering, generation,
rollouts) and is saved beside the adapters as ``chat_template.jinja``: the file name
transformers reads first, which ``converters fuse`` copies into the merged model, so generation
later renders prompts exactly as training did. The built-ins are prefix-stable (rendering the
first turns gives a prefix of rendering them all), as assistant-only loss masks need; a file is
checked for Jinja syntax before any model loads. A template whose markers are not single tokens
of the tokenizer still works (the model learns them as text), and the run says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .records import DataError

CHAT_TEMPLATE_FILE = "chat_template.jinja"

_TOOL_CALL = (  # one call as Hermes-style JSON: {"name": ..., "arguments": {...}}
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{{- '{\"name\": \"' + fn.name + '\", \"arguments\": ' + (fn.arguments if fn.arguments is "
    "string else (fn.arguments | tojson)) + '}' -}}"
)

CHATML = (
    "{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none -%}"
    "{%- if sys is not none or tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if sys is not none %}{{ sys }}{% endif -%}"
    "{%- if tools -%}"
    "{{- ('\\n\\n' if sys else '') + '# Tools\\n\\nYou may call these functions:\\n<tools>' -}}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each call, reply with <tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call>' -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message.role == 'system') -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string %}{{ message.content }}{% endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{- '\\n' if message.content or not loop.first else '' -}}"
    "{{- '<tool_call>\\n' -}}" + _TOOL_CALL + "{{- '\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)

LLAMA3 = (
    "{{- bos_token or '' -}}"
    "{%- if tools -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{%- if messages and messages[0].role == 'system' %}{{ messages[0].content | trim + "
    "'\\n\\n' }}{% endif -%}"
    "{{- 'You may call these functions; reply with {\"name\": <function-name>, \"arguments\": "
    "<args-json-object>} to call one.' -}}"
    "{%- for tool in tools %}{{ '\\n\\n' + (tool | tojson) }}{% endfor -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and tools and message.role == 'system') -%}"
    "{{- '<|start_header_id|>' + ('ipython' if message.role == 'tool' else message.role) + "
    "'<|end_header_id|>\\n\\n' -}}"
    "{%- if message.content is string %}{{ message.content | trim }}{% endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{- '\\n' if message.content or not loop.first else '' -}}" + _TOOL_CALL +
    "{%- endfor -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif -%}"
)

GEMMA = (  # roles user / model; a system message is prepended to the first turn, as Gemma does
    "{{- bos_token or '' -}}"
    "{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and sys is not none) -%}"
    "{{- '<start_of_turn>' + ('model' if message.role == 'assistant' else 'user') + '\\n' -}}"
    "{%- if sys is not none and loop.index0 == 1 %}{{ sys | trim + '\\n\\n' }}{% endif -%}"
    "{%- if message.content is string %}{{ message.content | trim }}{% endif -%}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{- '\\n' if message.content or not loop.first else '' -}}" + _TOOL_CALL +
    "{%- endfor -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif -%}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}
MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"),
           "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           "gemma": ("<start_of_turn>", "<end_of_turn>")}


def resolve_chat_template(value: str) -> str:
    """The template text of a built-in name or a Jinja file (syntax checked)."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"--chat-template {value}: neither a file nor a built-in template "
                        f"({', '.join(BUILTIN_TEMPLATES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--chat-template {path}: cannot be read ({e})") from None
    if not text.strip():
        raise DataError(f"--chat-template {path}: the file is empty")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(text)
    except TemplateSyntaxError as e:
        raise DataError(f"--chat-template {path}:{e.lineno}: not a valid Jinja template "
                        f"({e.message})") from None
    return text


def apply_chat_template(tokenizer: Any, value: str) -> list[str]:
    """Give ``tokenizer`` the template ``value`` names; returns warnings worth printing."""
    from .dataset import unwrap_tokenizer

    tokenizer = unwrap_tokenizer(tokenizer)
    tokenizer.chat_template = resolve_chat_template(value)
    split = [m for m in MARKERS.get(value, ())
             if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
    if not split:
        return []
    verb = "is not a single token" if len(split) == 1 else "are not single tokens"
    warning = (f"--chat-template {value}: {', '.join(split)} {verb} of this tokenizer; the model "
               "learns them as plain text (fine for a base model, slower to learn)")
    return [warning]


def save_chat_template(directory: str | Path, tokenizer: Any) -> None:
    """Write the tokenizer's chat template (the run's, after any override) as
    ``<directory>/chat_template.jinja``; nothing when it has none."""
    from .dataset import unwrap_tokenizer

    if tokenizer is None:
        return
    template = getattr(unwrap_tokenizer(tokenizer), "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str) and template:
        Path(directory, CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")


def template_for(chat_template: str, adapter_dir: str | Path | None) -> str:
    """The template a run on an adapter uses: ``--chat-template`` when given, else the
    ``chat_template.jinja`` the adapter was trained with (if saved), else "" (the model's)."""
    if chat_template:
        return chat_template
    if adapter_dir and Path(adapter_dir, CHAT_TEMPLATE_FILE).is_file():
        return str(Path(adapter_dir, CHAT_TEMPLATE_FILE))
    return ""
