"""Evaluation helpers that need no model: length statistics of generated responses, and held-out
preference metrics split by length."""

from .lengths import LengthStats, length_difference, length_stats
from .stratified import length_stratified

__all__ = ["LengthStats", "length_difference", "length_stats", "length_stratified"]
