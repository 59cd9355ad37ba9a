"""megatron-core model builders and weight helpers."""
