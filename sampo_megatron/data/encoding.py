"""From a raw record to an :class:`~sampo_megatron.data.pairs.EncodedPair`: decode, apply the layout,
render the template, tokenise, and run the checks that need neither ``seq_length`` nor the model.

Preprocessing workers receive an :class:`EncoderSpec` (tokenizer path, layout, template name) and
build their own :class:`PairEncoder` from it, rather than having a tokenizer pickled to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import BadRecord, DataError
from .layouts import DATA_FORMATS, READERS, detect_layout
from .pairs import EncodedPair
from .sources import RawItem, decode_item
from .templates import get_template
from .tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that decides the token ids of a record; stored with an indexed dataset."""

    tokenizer_model: str
    tokenizer_type: str = "auto"
    layout: str = "generic"
    """A concrete layout (``auto`` is resolved by :func:`resolve_layout` first)."""
    prompt_template: str = "plain"
    """A concrete template name (``auto`` is resolved against the tokenizer first)."""
    add_bos: bool = True


class PairEncoder:
    """Encodes raw items; raises :class:`BadRecord` (with the item's location) for bad ones.

    Args:
        tokenizer: The tokenizer.
        layout: One of :data:`~sampo_megatron.data.layouts.LAYOUTS`.
        prompt_template: A template name; ``auto`` picks the tokenizer's own template when it has one.
        add_bos: Put the tokenizer's BOS in front of every prompt, when it has one.
    """

    def __init__(self, tokenizer: Tokenizer, layout: str, prompt_template: str = "auto", add_bos: bool = True) -> None:
        if layout not in READERS:
            raise ValueError(f"layout must be one of {tuple(READERS)}, got {layout!r}")
        self.tokenizer = tokenizer
        self.layout = layout
        self.read = READERS[layout]
        self.template = get_template(prompt_template, tokenizer)
        self.bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []

    @classmethod
    def from_spec(cls, spec: EncoderSpec) -> PairEncoder:
        return cls(load_tokenizer(spec.tokenizer_model, spec.tokenizer_type), spec.layout, spec.prompt_template, spec.add_bos)

    def encode(self, item: RawItem) -> EncodedPair:
        """The untruncated pair of ``item``."""
        try:
            return self._encode(decode_item(item))
        except BadRecord as bad:
            if bad.location is not None:
                raise
            raise bad.at(item.location) from None

    def _encode(self, record) -> EncodedPair:
        text = self.read(record)
        rendered = self.template.render(text.prompt)
        header = self.tokenizer.encode(rendered.header) if rendered.header else []
        prompt_ids = self.bos + self.tokenizer.encode(rendered.context) + header
        if not prompt_ids:
            # Without any prompt token there is no position from which to predict the first response token.
            raise BadRecord(None, "empty_response", "is empty and the tokenizer adds no BOS", "prompt")
        responses = []
        for field, content in (("chosen", text.chosen), ("rejected", text.rejected)):
            ids = self.tokenizer.encode(self.template.response(rendered, content)) if content.strip() else []
            if not ids:
                # An EOS-only response would be trained on as a real answer; refuse it instead.
                raise BadRecord(None, "empty_response", "is empty", field)
            responses.append(ids + [self.tokenizer.eos_id])
        if responses[0] == responses[1]:
            raise BadRecord(None, "identical_responses", "is identical to 'chosen'", "rejected")
        return EncodedPair(prompt_ids, responses[0], responses[1], keep_prefix=len(self.bos), keep_suffix=len(header))


def resolve_layout(data_format: str, items: Iterable[RawItem], path: str) -> str:
    """The layout to read ``path`` with: ``data_format`` itself, or (``auto``) the layout of the first
    record among ``items`` (e.g. the first 200) that shows one unambiguously. Records before it that
    do not decode or show none are read (and reported) under that layout like any other.

    Raises:
        ValueError: unknown format, or ``auto`` finds no record that tells.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"--data-format must be one of {DATA_FORMATS}, got {data_format!r}")
    if data_format != "auto":
        return data_format
    first = None
    for item in items:
        try:
            record = decode_item(item)
        except BadRecord:
            continue
        layout = detect_layout(record)
        if layout is not None:
            return layout
        if first is None:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            first = f"{item.location}: cannot tell the data layout from fields {fields}"
    raise DataError(
        f"{first or path + ': no readable record to detect the data layout from'}; pass --data-format "
        f"({', '.join(DATA_FORMATS[1:])})"
    )


def encode_items(encoder: PairEncoder, items: Iterable[RawItem]) -> Iterator[tuple[RawItem, EncodedPair | BadRecord]]:
    """``(item, pair or the BadRecord)`` in order; the caller decides what a bad record means."""
    for item in items:
        try:
            yield item, encoder.encode(item)
        except BadRecord as bad:
            yield item, bad
