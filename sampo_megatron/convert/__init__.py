"""Hugging Face <-> megatron-core checkpoint conversion (Llama 2/3, Mistral, Qwen2/Qwen1.5,
GPT-NeoX/Pythia). Needs ``models/``, never ``training/``; see docs/conversion.md."""

from .errors import ConversionError
from .families import FAMILIES
from .hf_to_megatron import convert_hf_to_megatron
from .megatron_to_hf import convert_megatron_to_hf

__all__ = ["FAMILIES", "ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf"]
