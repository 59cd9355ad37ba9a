"""Public preference-data layouts, each mapped to one canonical form: :class:`PreferenceText`.

- ``generic``: ``prompt``, ``chosen``, ``rejected``; the prompt is a string or a list of chat
  messages (``{"role", "content"}``), each response a string or a message list ending with the
  assistant turn (optionally preceded by the prompt's messages, as TRL's conversational format).
- ``hh-rlhf``: Anthropic HH-RLHF: ``chosen`` and ``rejected`` are whole dialogues
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) sharing everything up to the last assistant turn; that
  prefix becomes the prompt (as messages), the last assistant turn the response.
- ``ultrafeedback``: UltraFeedback-binarized: ``chosen`` / ``rejected`` are message lists of the whole
  conversation; everything before the last (assistant) message is the prompt.
- ``tldr``: OpenAI TL;DR comparisons: ``info`` (``subreddit``, ``title``, ``post``), two
  ``summaries`` (``text``) and ``choice``; the prompt is
  ``"SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:"`` as in the DPO and TRL recipes.

Responses come out as their content (no role markers, outer whitespace stripped for the
dialogue layouts); how prompt and response are joined is the template's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import BadRecord

LAYOUTS = ("generic", "hh-rlhf", "ultrafeedback", "tldr")
DATA_FORMATS = ("auto", *LAYOUTS)
ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

Message = dict[str, str]


@dataclass
class PreferenceText:
    """One pair before tokenisation."""

    prompt: str | list[Message]
    """A plain string, or chat messages ending with a user (or system) turn."""
    chosen: str
    """Content of the preferred response."""
    rejected: str
    """Content of the dispreferred response."""


def _bad(reason: str, detail: str, field: str | None = None) -> BadRecord:
    return BadRecord(None, reason, detail, field)


def _object(record: Any, fields: tuple[str, ...]) -> dict:
    if not isinstance(record, dict):
        raise _bad("wrong_type", f"expected a JSON object with fields {', '.join(fields)}, got {type(record).__name__}")
    return record


def _get(record: dict, field: str, name: str | None = None) -> Any:
    if field not in record or record[field] is None:
        raise _bad("missing_field", "is missing", name or field)
    return record[field]


def _string(record: dict, field: str, name: str | None = None) -> str:
    value = _get(record, field, name)
    if not isinstance(value, str):
        raise _bad("wrong_type", f"must be a string, got {type(value).__name__}", name or field)
    return value


def _messages(value: Any, field: str, what: str = "a list of chat messages") -> list[Message]:
    """Validates a chat-message list; returns copies holding only ``role`` and ``content``."""
    if not isinstance(value, list):
        raise _bad("wrong_type", f"must be {what}, got {type(value).__name__}", field)
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            # A list of plain strings is the usual mistake: name the field itself, not element i.
            raise _bad(
                "wrong_type", f"must be {what} ({{'role', 'content'}} objects), got a list holding {type(m).__name__}", field
            )
        role = _string(m, "role", f"{where}.role")
        if role not in ROLES:
            raise _bad("wrong_type", f"must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        out.append({"role": role, "content": _string(m, "content", f"{where}.content")})
    return out


def _string_or_messages(record: dict, field: str) -> str | list[Message]:
    value = _get(record, field)
    if isinstance(value, str):
        return value
    what = "a string or a list of chat messages"
    if isinstance(value, list):
        return _messages(value, field, what)
    raise _bad("wrong_type", f"must be {what}, got {type(value).__name__}", field)


def _as_messages(prompt: str | list[Message]) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _last_assistant(messages: list[Message], field: str) -> str:
    if not messages or messages[-1]["role"] != "assistant":
        raise _bad("wrong_type", "must end with an assistant message", field)
    return messages[-1]["content"]


def generic(record: Any) -> PreferenceText:
    """``prompt`` / ``chosen`` / ``rejected`` as strings or chat messages."""
    record = _object(record, ("prompt", "chosen", "rejected"))
    prompt = _string_or_messages(record, "prompt")
    responses = []
    for field in ("chosen", "rejected"):
        value = _string_or_messages(record, field)
        if isinstance(value, list):
            content = _last_assistant(value, field)
            # A conversation may repeat the prompt before the answer; it must be this record's prompt.
            if value[:-1] and value[:-1] != _as_messages(prompt):
                raise _bad("mismatched_prompt", "continues a conversation other than the prompt", field)
            value = content
        responses.append(value)
    return PreferenceText(prompt, responses[0], responses[1])


def _hh_messages(text: str, field: str) -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> messages; text before the first marker is not allowed."""
    messages: list[Message] = []
    pos = 0
    markers = ((HH_HUMAN, "user"), (HH_ASSISTANT, "assistant"))
    while pos < len(text):
        starts = [(text.find(m, pos), m, role) for m, role in markers]
        found = [s for s in starts if s[0] >= 0]
        nxt = min(found)[0] if found else len(text)
        chunk = text[pos:nxt]
        if messages:
            messages[-1]["content"] += chunk
        elif chunk.strip():
            raise _bad("wrong_type", f"must be an HH-RLHF dialogue starting with {HH_HUMAN!r}", field)
        if not found:
            break
        start, marker, role = min(found)
        messages.append({"role": role, "content": ""})
        pos = start + len(marker)
    for m in messages:
        m["content"] = m["content"].strip()
    return messages


def hh_rlhf(record: Any) -> PreferenceText:
    """Two full dialogues sharing a prefix: split at the last ``"\\n\\nAssistant:"``."""
    record = _object(record, ("chosen", "rejected"))
    split = {}
    for field in ("chosen", "rejected"):
        text = _string(record, field)
        cut = text.rfind(HH_ASSISTANT)
        if cut < 0:
            raise _bad("wrong_type", f"has no {HH_ASSISTANT!r} turn", field)
        split[field] = (text[: cut + len(HH_ASSISTANT)], text[cut + len(HH_ASSISTANT) :].strip())
    if split["chosen"][0] != split["rejected"][0]:
        raise _bad("mismatched_prompt", "differs from 'chosen' before the last assistant turn", "rejected")
    prompt = _hh_messages(split["chosen"][0], "chosen")[:-1]  # the last one is the empty final Assistant turn
    if not prompt:
        raise _bad("wrong_type", f"has no {HH_HUMAN!r} turn before the last assistant turn", "chosen")
    return PreferenceText(prompt, split["chosen"][1], split["rejected"][1])


def ultrafeedback(record: Any) -> PreferenceText:
    """Whole conversations as message lists; the shared part before the last message is the prompt."""
    record = _object(record, ("chosen", "rejected"))
    chosen = _messages(_get(record, "chosen"), "chosen")
    rejected = _messages(_get(record, "rejected"), "rejected")
    contents = [_last_assistant(chosen, "chosen"), _last_assistant(rejected, "rejected")]
    if chosen[:-1] != rejected[:-1]:
        raise _bad("mismatched_prompt", "differs from 'chosen' before the last assistant message", "rejected")
    prompt: str | list[Message] = chosen[:-1]
    if not prompt:
        prompt = _string(record, "prompt")  # responses given alone: the prompt field holds the question
    return PreferenceText(prompt, *contents)


def tldr(record: Any) -> PreferenceText:
    """OpenAI TL;DR comparisons: a Reddit post and two summaries, ``choice`` the preferred one."""
    record = _object(record, ("info", "summaries", "choice"))
    info = _get(record, "info")
    if not isinstance(info, dict):
        raise _bad("wrong_type", f"must be an object, got {type(info).__name__}", "info")
    parts = {k: _string(info, k, f"info.{k}") for k in ("subreddit", "title", "post")}
    summaries = _get(record, "summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise _bad("wrong_type", "must be a list of two summaries", "summaries")
    texts = []
    for i, s in enumerate(summaries):
        if not isinstance(s, dict):
            raise _bad("wrong_type", f"must be an object with 'text', got {type(s).__name__}", f"summaries[{i}]")
        texts.append(_string(s, "text", f"summaries[{i}].text").strip())
    choice = _get(record, "choice")
    if type(choice) is not int or choice not in (0, 1):
        raise _bad("wrong_type", f"must be 0 or 1, got {choice!r}", "choice")
    prompt = f"SUBREDDIT: r/{parts['subreddit']}\n\nTITLE: {parts['title']}\n\nPOST: {parts['post']}\n\nTL;DR:"
    return PreferenceText(prompt, texts[choice], texts[1 - choice])


READERS: dict[str, Callable[[Any], PreferenceText]] = {
    "generic": generic,
    "hh-rlhf": hh_rlhf,
    "ultrafeedback": ultrafeedback,
    "tldr": tldr,
}


def detect_layout(record: Any) -> str | None:
    """The layout ``record`` unambiguously has, else ``None``."""
    if not isinstance(record, dict):
        return None
    if "info" in record and "summaries" in record and "choice" in record:
        return "tldr"
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" in record:
        uf_markers = ("score_chosen", "score_rejected", "prompt_id", "messages")
        if isinstance(chosen, list) and any(k in record for k in uf_markers):
            return "ultrafeedback"
        return "generic"
    if isinstance(chosen, str) and isinstance(rejected, str) and HH_ASSISTANT in chosen:
        return "hh-rlhf"
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "ultrafeedback"
    return None
