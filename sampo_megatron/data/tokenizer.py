"""Tokenizers behind one small interface: Hugging Face tokenizer directories and sentencepiece models.

The data layer needs only ``encode`` (never adding special tokens: BOS and EOS are placed explicitly
by :mod:`sampo_megatron.data.pairs`), ``decode`` and the special-token ids, so both backends are
wrapped in :class:`Tokenizer` rather than leaking their different APIs into the rest of the code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Protocol, runtime_checkable

TOKENIZER_TYPES = ("auto", "huggingface", "sentencepiece")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer."""

    eos_id: int
    """End-of-sequence id, appended to every response."""
    bos_id: int | None
    """Beginning-of-sequence id put in front of the prompt, or ``None`` if the tokenizer has none."""
    pad_id: int
    """Padding id (falls back to ``eos_id`` when the tokenizer defines no pad token)."""
    vocab_size: int
    """Number of ids the tokenizer can produce, special and added tokens included."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens added."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens are kept, so round trips are visible)."""
        ...

    def fingerprint(self) -> str:
        """A hash of everything that decides the ids (vocabulary, merges, normalisation, specials):
        data tokenised with one tokenizer must not be trained with another."""
        ...


class HuggingFaceTokenizer:
    """A ``transformers`` tokenizer loaded from a local directory (no network access).

    Args:
        path: Directory holding ``tokenizer.json`` / ``tokenizer_config.json`` (or the slow
            tokenizer files that ``AutoTokenizer`` understands).
    """

    def __init__(self, path: str) -> None:
        # Imported lazily: transformers is slow to import and sentencepiece-only users do not need it.
        from transformers import AutoTokenizer

        self.path = path
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        eos = self._tok.eos_token_id
        if eos is None:
            # Every response ends with EOS; guessing one silently would train the wrong stop token.
            raise ValueError(f"{path}: tokenizer defines no eos_token; set it in tokenizer_config.json")
        self.eos_id: int = int(eos)
        bos = self._tok.bos_token_id
        self.bos_id: int | None = None if bos is None else int(bos)
        pad = self._tok.pad_token_id
        # Llama-style tokenizers have no pad token; padded positions are masked out, so EOS is safe.
        self.pad_id: int = self.eos_id if pad is None else int(pad)
        # len() counts added tokens too, which vocab_size does not.
        self.vocab_size: int = len(self._tok)
        self.chat_template: str | None = getattr(self._tok, "chat_template", None) or None
        """The Jinja chat template from tokenizer_config.json, if any."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS or any post-processor template."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens included."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The tokenizer's own chat template rendered as text (not tokenised)."""
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def fingerprint(self) -> str:
        backend = getattr(self._tok, "backend_tokenizer", None)
        definition = backend.to_str() if backend is not None else json.dumps(sorted(self._tok.get_vocab().items()))
        specials = [self.vocab_size, self.bos_id, self.eos_id, self.pad_id]
        return hashlib.sha256((definition + json.dumps(specials)).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file.

    Args:
        path: Path of the ``.model`` file.
    """

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        # sentencepiece reports a disabled special token as -1.
        eos = self._sp.eos_id()
        if eos < 0:
            raise ValueError(f"{path}: sentencepiece model has no EOS piece (trained with eos_id=-1)")
        self.eos_id: int = int(eos)
        bos = self._sp.bos_id()
        self.bos_id: int | None = None if bos < 0 else int(bos)
        pad = self._sp.pad_id()
        self.pad_id: int = self.eos_id if pad < 0 else int(pad)
        self.vocab_size: int = int(self._sp.get_piece_size())
        self.chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (sentencepiece adds no BOS/EOS unless asked)."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        return self._sp.decode(list(ids))

    def fingerprint(self) -> str:
        return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str, tokenizer_type: str = "auto") -> Tokenizer:
    """Loads a tokenizer from local files.

    Args:
        path: A Hugging Face tokenizer directory or a sentencepiece ``.model`` file.
        tokenizer_type: ``"huggingface"``, ``"sentencepiece"`` or ``"auto"`` (a directory is loaded
            with ``transformers.AutoTokenizer``, a ``*.model`` file with sentencepiece).

    Returns:
        The wrapped tokenizer.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown ``tokenizer_type``, or ``auto`` cannot tell the kind from the path.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"tokenizer_type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if tokenizer_type == "auto":
        if os.path.isdir(path):
            tokenizer_type = "huggingface"
        elif path.endswith(".model"):
            tokenizer_type = "sentencepiece"
        else:
            raise ValueError(
                f"{path}: cannot tell the tokenizer type (expected a Hugging Face tokenizer directory "
                "or a sentencepiece *.model file); pass tokenizer_type explicitly"
            )
    if tokenizer_type == "huggingface":
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)


# Files that make up a tokenizer (Hugging Face fast/slow tokenizers, sentencepiece, tiktoken).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "qwen.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)


def tokenizer_files(directory: str) -> list[str]:
    """Names of the tokenizer files and folders present in ``directory``."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, n))]
    return names + [n for n in TOKENIZER_DIRS if os.path.isdir(os.path.join(directory, n))]


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files of ``src`` into ``dst`` (created); returns the names copied."""
    names = tokenizer_files(src)
    if names:
        os.makedirs(dst, exist_ok=True)
    for name in names:
        source = os.path.join(src, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(dst, name), dirs_exist_ok=True)
        else:
            shutil.copyfile(source, os.path.join(dst, name))
    return names


def copy_tokenizer_into(path: str, dst_dir: str) -> str:
    """Copy the tokenizer at ``path`` (a Hugging Face directory or a sentencepiece ``.model`` file)
    into the directory ``dst_dir``; returns the path that loads the copy (``dst_dir`` itself, or the
    copied ``.model`` file inside it).

    Raises:
        FileNotFoundError: ``path`` holds no tokenizer files.
    """
    if os.path.isdir(path):
        if not copy_tokenizer(path, dst_dir):
            raise FileNotFoundError(f"{path}: no tokenizer files to copy (expected e.g. tokenizer.json)")
        return dst_dir
    os.makedirs(dst_dir, exist_ok=True)
    target = os.path.join(dst_dir, os.path.basename(path))
    shutil.copyfile(path, target)
    return target
