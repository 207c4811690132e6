"""Chat and instruction records -> token ids and a per-token loss mask, through the tokenizer's own chat template.

Records (JSONL lines or parquet rows):
    messages           {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
                        "tools": [...] (optional, passed to the template)}
    prompt-completion  {"prompt": str | [messages], "completion": str | [assistant messages]}: a str prompt is one
                       user message, a str completion one assistant message; then rendered like `messages`.

The template is the tokenizer's (`transformers`' `apply_chat_template`, the library that defines these templates),
so BOS, turn markers and end-of-turn tokens are exactly what the model's authors render. The rendered text is
tokenised without added special tokens (the template writes them), as `apply_chat_template(tokenize=True)` does.

Loss mask, read off prefix renderings (the standard way): for each assistant message i, the tokens between
render(messages[:i], add_generation_prompt=True) and render(messages[:i + 1]) are trained: the reply, its
end-of-turn token and whatever the template closes the turn with. Everything else (system, user and tool turns,
template scaffolding, the generation prompt) is not. Each prefix rendering must be a prefix of the whole
conversation's tokens; a template that rewrites earlier turns (e.g. drops past reasoning) is refused by name.
"""
from __future__ import annotations

import hashlib
import os
import sys
from array import array
from pathlib import Path
from typing import Any, Optional, Sequence

from .tokenizer import HFTokenizer, load_tokenizer

KINDS = ("text", "messages", "prompt-completion")
"""Record kinds: plain text (one document per record), chat messages, prompt / completion pairs."""
ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"


def record_kind(keys: Sequence[str], text_key: str, messages_key: str) -> Optional[str]:
    """The kind a record with these keys holds: messages first, then prompt + completion, then text; None: none."""
    if messages_key in keys:
        return "messages"
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion"
    if text_key in keys:
        return "text"
    return None


def _as_messages(value: Any, where: str, what: str) -> list[dict]:
    """value checked to be a non-empty list of {role, content} objects (content text)."""
    example = '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]'
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else f"{type(value).__name__} {_short(value)}"
        raise ValueError(f"{where}: {what} is {got}, not a list of {{role, content}} objects; write e.g. {example}")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"{where}: {what}[{j}] is {_short(m)}, not a {{role, content}} object (role a string); "
                             f"write each message as e.g. {{\"role\": \"user\", \"content\": \"Hi\"}}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: {what}[{j}] (role {m['role']!r}) has content of type "
                             f"{type(m['content']).__name__} {_short(m['content'])}; content must be text")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def record_messages(record: dict, kind: str, where: str, messages_key: str = "messages") -> list[dict]:
    """The conversation a messages or prompt-completion record holds, checked to be {role, content} objects."""
    if kind == "messages":
        if messages_key not in record:
            raise ValueError(f"{where}: no key {messages_key!r} (found {sorted(record)}): every record of a chat "
                             f"dataset needs {messages_key!r}, a list of {{role, content}} objects; fix or drop the "
                             "record (or pass --messages-key naming the field)")
        return _as_messages(record[messages_key], where, repr(messages_key))
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise ValueError(f"{where}: no key {missing[0]!r} (found {sorted(record)}): every record of a "
                         "prompt-completion dataset needs 'prompt' and 'completion'; fix or drop the record")
    prompt, completion = record["prompt"], record["completion"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_messages(prompt, where,
                                                                                                 "'prompt'")
    if isinstance(completion, str):
        return prompt + [{"role": "assistant", "content": completion}]
    completion = _as_messages(completion, where, "'completion'")
    roles = sorted({m["role"] for m in completion} - {"assistant"})
    if roles:
        raise ValueError(f"{where}: 'completion' holds a message with role {roles[0]!r}; a completion is what is "
                         "trained: assistant messages only (put other turns in 'prompt')")
    return prompt + completion


def record_tools(record: dict, where: str) -> Optional[list]:
    """The record's optional 'tools' (tool schemas the template renders), checked to be a list."""
    tools = record.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"{where}: 'tools' is {type(tools).__name__}, not a list of tool schemas; give a list "
                         "(or leave the key out)")
    return tools or None


def load_chat_tokenizer(spec: str):
    """The `transformers` tokenizer of a folder saved with save_pretrained (or of the folder of a tokenizer.json)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(f"chat records are rendered with the tokenizer's chat template by transformers: pip install "
                          f"transformers (or pip install megalysses[hf]); tokenizer = {spec!r}") from e
    path = Path(spec)
    folder = path if path.is_dir() else path.parent
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"tokenizer = {spec!r} has no chat template ({folder / 'tokenizer_config.json'} is missing): "
                         "chat records are rendered with the tokenizer's own template; pass the folder the chat "
                         "model's tokenizer was saved to (save_pretrained: tokenizer.json, tokenizer_config.json)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"tokenizer = {spec!r}: transformers cannot load {folder} ({type(e).__name__}: {first}); "
                         "pass a folder saved with save_pretrained") from e


def template_text(tokenizer) -> str:
    """The tokenizer's chat template source ('' when it has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    return template if isinstance(template, str) else ""


class ChatEncoder:
    """Renders conversations with a tokenizer's chat template into token ids and their loss mask."""

    def __init__(self, spec: str, eos_token: Optional[str] = None, max_tokens: Optional[int] = None,
                 too_long: str = "refuse"):
        self.base: HFTokenizer = load_tokenizer(spec, eos_token)  # ids, vocabulary, EOS (padding) and checksum
        self.tok = load_chat_tokenizer(spec)
        self.template = template_text(self.tok)
        if not self.template:
            raise ValueError(f"tokenizer = {spec!r} has no chat template (no chat_template in its "
                             "tokenizer_config.json, no chat_template.jinja): chat records are rendered with the "
                             "tokenizer's own template; use the chat / instruct model's tokenizer, or set "
                             "tokenizer.chat_template and save_pretrained it")
        self.spec, self.max_tokens, self.too_long = spec, max_tokens, too_long
        self.roles = ROLES + ((TOOL_ROLE,) if f"'{TOOL_ROLE}'" in self.template or f'"{TOOL_ROLE}"' in self.template
                              else ())
        self.template_sha256 = hashlib.sha256(self.template.encode()).hexdigest()

    def check_roles(self, messages: list[dict], where: str) -> None:
        """Refuse a role the template does not render, by name."""
        for j, m in enumerate(messages):
            if m["role"] in self.roles:
                continue
            if m["role"] == TOOL_ROLE:
                raise ValueError(f"{where}: message {j} has role 'tool', but the chat template of {self.spec} never "
                                 "mentions 'tool': it cannot render tool results; drop the message or use a "
                                 "tokenizer whose template handles tool turns")
            raise ValueError(f"{where}: message {j} has unknown role {m['role']!r}: roles are "
                             f"{', '.join(map(repr, self.roles))}; rename it (e.g. to 'user') or drop the message")

    def render(self, messages: list[dict], tools: Optional[list], generation_prompt: bool, where: str) -> list[int]:
        """Token ids of the template's rendering (no special tokens added beyond what the template writes)."""
        try:
            text = self.tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja2 and the template's raise_exception raise anything
            first = str(e).splitlines()[0] if str(e) else ""
            raise ValueError(f"{where}: the chat template of {self.spec} refused the conversation "
                             f"({type(e).__name__}: {first}); fix the record to the form the template expects "
                             "(e.g. alternating user / assistant turns) or drop it") from e
        return self.tok.encode(text, add_special_tokens=False)

    def encode(self, messages: list[dict], tools: Optional[list], where: str) -> tuple[list[int], bytearray]:
        """(token ids, mask: 1 on assistant turns and their end of turn, 0 elsewhere) of one conversation, whole."""
        self.check_roles(messages, where)
        ids = self.render(messages, tools, False, where)
        mask = bytearray(len(ids))
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self._prefix(messages[:i], tools, True, ids, where)
            end = self._prefix(messages[: i + 1], tools, False, ids, where)
            mask[start:end] = b"\x01" * (end - start)
        return ids, mask

    def _prefix(self, messages: list[dict], tools: Optional[list], generation_prompt: bool, ids: list[int],
                where: str) -> int:
        """The length of the rendering of a prefix of the conversation, checked to be a prefix of its ids."""
        part = self.render(messages, tools, generation_prompt, where) if messages or generation_prompt else []
        if ids[: len(part)] != part:
            k = next(k for k, (a, b) in enumerate(zip(part, ids + [-1] * len(part))) if a != b)
            raise ValueError(f"{where}: the chat template of {self.spec} renders the first {len(messages)} messages"
                             f"{' with the generation prompt' if generation_prompt else ''} as tokens that are not a "
                             f"prefix of the whole conversation's (they differ at token {k}): the loss mask is read "
                             "off prefix renderings, so a template that rewrites earlier turns is refused; use a "
                             "template whose turns only append")
        return len(part)

    def fits(self, n: int, where: str) -> bool:
        """Whether a conversation of n tokens is within max_tokens; a longer one is refused, unless too_long is
        'truncate' (then False: keep its first max_tokens tokens)."""
        if self.max_tokens is None or n <= self.max_tokens:
            return True
        if self.too_long == "truncate":
            return False
        raise ValueError(f"{where}: the conversation has {n} tokens, more than --max-tokens "
                         f"{self.max_tokens}: conversations are kept whole; raise --max-tokens, drop the record, or "
                         "pass --too-long truncate to keep its first --max-tokens tokens")

    def encode_conversations(self, items: Sequence[tuple[str, list[dict], Optional[list]]]
                             ) -> tuple[bytes, list[int], bytes, int]:
        """[(where, messages, tools)] -> (little-endian ids back to back, lengths, mask bytes, truncated count)."""
        ids = array("H" if self.base.dtype == "uint16" else "I")
        mask, lengths, truncated = bytearray(), [], 0
        for where, messages, tools in items:
            conv_ids, conv_mask = self.encode(messages, tools, where)
            if not self.fits(len(conv_ids), where):
                conv_ids, conv_mask = conv_ids[: self.max_tokens], conv_mask[: self.max_tokens]
                truncated += 1
            ids.extend(conv_ids)
            mask += conv_mask
            lengths.append(len(conv_ids))
        if sys.byteorder == "big":
            ids.byteswap()
        return ids.tobytes(), lengths, bytes(mask), truncated
