"""Prompt templates: how a prompt (string or chat messages) and a response become text.

A template renders a prompt as two parts, ``context`` and ``header``: the header is the assistant
turn's opening (``"<|im_start|>assistant\\n"``), which left truncation must never cut, because the
response is conditioned on it. Both are tokenised separately, so the header's token count is known.
The BOS token is not part of any rendering: the encoder adds it by id (``--add-bos``), which works
for tokenizers whose BOS cannot be written as text.

Built-ins (``--prompt-template``):

- ``plain``: a string prompt is used as it is; messages become an HH-RLHF style dialogue
  (``"\\n\\nHuman: ...\\n\\nAssistant:"``). The response follows after one space unless the prompt
  already ends with whitespace or the response starts with it.
- ``llama3``: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``.
- ``tulu``: Tulu 2's ``<|user|>\\ncontent\\n<|assistant|>\\n``; earlier assistant turns end with EOS.
- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen).
- ``tokenizer``: the tokenizer's own Jinja ``chat_template`` (``tokenizer_config.json``).
- ``auto`` (default): ``tokenizer`` when the tokenizer has a chat template, else ``plain``.

With a chat template a string prompt is one user message. Every response ends with the tokenizer's
EOS token (added by id), so the tokenizer's EOS should be the template's end-of-turn token, as it is
for Llama-3-Instruct (``<|eot_id|>``), Qwen chat (``<|im_end|>``) and Tulu 2 (``</s>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .layouts import Message
from .tokenizer import Tokenizer

PROMPT_TEMPLATES = ("auto", "tokenizer", "llama3", "tulu", "chatml", "plain")


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as text: ``context + header``."""

    context: str
    header: str
    """The assistant turn's opening; kept whole by truncation."""


class PromptTemplate:
    """Base class; subclasses implement :meth:`render_messages`."""

    name = "base"

    def render(self, prompt: str | list[Message]) -> RenderedPrompt:
        """The prompt as text; a string prompt is one user message."""
        return self.render_messages([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)

    def render_messages(self, messages: list[Message]) -> RenderedPrompt:
        raise NotImplementedError

    def response(self, rendered: RenderedPrompt, content: str) -> str:
        """The response text that follows ``rendered`` (its EOS is added by id, not here)."""
        return content


class PlainTemplate(PromptTemplate):
    """No chat markup: strings as they are, messages as an HH-RLHF dialogue."""

    name = "plain"
    ROLE_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}

    def render(self, prompt: str | list[Message]) -> RenderedPrompt:
        if isinstance(prompt, str):
            return RenderedPrompt(prompt, "")
        return self.render_messages(prompt)

    def render_messages(self, messages: list[Message]) -> RenderedPrompt:
        context = "".join(f"\n\n{self.ROLE_NAMES[m['role']]}: {m['content']}" for m in messages)
        return RenderedPrompt(context, "\n\nAssistant:")

    def response(self, rendered: RenderedPrompt, content: str) -> str:
        text = rendered.context + rendered.header
        # "...Assistant:" + " Sure." reads as the original HH-RLHF text; a BPE tokenizer then sees the
        # same word-initial tokens as in pretraining text.
        if text and not text[-1].isspace() and content and not content[0].isspace():
            return " " + content
        return content


class MarkupTemplate(PromptTemplate):
    """A chat format defined by per-role turn text; ``{content}`` and ``{eos}`` are substituted."""

    def __init__(self, name: str, turns: dict[str, str], header: str, eos_text: str = "", strip: bool = False) -> None:
        self.name = name
        self.turns = turns
        self.header = header
        self.eos_text = eos_text
        self.strip = strip

    def render_messages(self, messages: list[Message]) -> RenderedPrompt:
        parts = []
        for m in messages:
            content = m["content"].strip() if self.strip else m["content"]
            parts.append(self.turns[m["role"]].replace("{content}", content).replace("{eos}", self.eos_text))
        return RenderedPrompt("".join(parts), self.header)


def llama3() -> MarkupTemplate:
    """Llama 3 Instruct; like Meta's template, message contents are stripped."""
    turn = "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
    turns = {r: turn.replace("{role}", r) for r in ("system", "user", "assistant")}
    return MarkupTemplate("llama3", turns, "<|start_header_id|>assistant<|end_header_id|>\n\n", strip=True)


def tulu(eos_text: str) -> MarkupTemplate:
    """Tulu 2 (AllenAI): earlier assistant turns end with the EOS token's text and a newline."""
    turns = {"system": "<|system|>\n{content}\n", "user": "<|user|>\n{content}\n", "assistant": "<|assistant|>\n{content}{eos}\n"}
    return MarkupTemplate("tulu", turns, "<|assistant|>\n", eos_text=eos_text)


def chatml() -> MarkupTemplate:
    """ChatML (Qwen)."""
    turns = {r: f"<|im_start|>{r}\n{{content}}<|im_end|>\n" for r in ("system", "user", "assistant")}
    return MarkupTemplate("chatml", turns, "<|im_start|>assistant\n")


class TokenizerTemplate(PromptTemplate):
    """The tokenizer's own Jinja chat template, through ``transformers``' ``apply_chat_template``.

    The header is what ``add_generation_prompt=True`` appends; a leading BOS text is removed because
    the encoder adds BOS by id.
    """

    name = "tokenizer"

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--prompt-template tokenizer: {tokenizer!r} has no chat_template")
        self.tokenizer = tokenizer
        self.bos_text = tokenizer.decode([tokenizer.bos_id]) if tokenizer.bos_id is not None else ""

    def render_messages(self, messages: list[Message]) -> RenderedPrompt:
        context = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        full = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if full.startswith(context):
            header = full[len(context) :]
        else:  # a template whose two renderings differ earlier: protect nothing rather than guess
            context, header = full, ""
        if self.bos_text and context.startswith(self.bos_text):
            context = context[len(self.bos_text) :]
        return RenderedPrompt(context, header)


def get_template(name: str, tokenizer: Tokenizer) -> PromptTemplate:
    """The template called ``name`` (see :data:`PROMPT_TEMPLATES`) for ``tokenizer``."""
    if name not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template must be one of {PROMPT_TEMPLATES}, got {name!r}")
    if name == "auto":
        name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "plain"
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if name == "plain":
        return PlainTemplate()
    if name == "llama3":
        return llama3()
    if name == "tulu":
        return tulu(tokenizer.decode([tokenizer.eos_id]))
    return chatml()
