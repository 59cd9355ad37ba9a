"""Memory planning and layout checks for a run: pure arithmetic over the model's shape and layout."""

from .layout import LayoutError, check_layout, layout_problems, search_layouts
from .memory import GIB, PARTS, MemoryPlan, format_plan, plan_memory
from .presets import PRESETS, load_shape, shape_from_hf_config
from .shapes import Layout, ModelShape

__all__ = [
    "GIB", "PARTS", "PRESETS", "Layout", "LayoutError", "MemoryPlan", "ModelShape", "check_layout",
    "format_plan", "layout_problems", "load_shape", "plan_memory", "search_layouts", "shape_from_hf_config",
]  # fmt: skip
