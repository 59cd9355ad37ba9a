"""The repository passes the linter configured in pyproject.toml ([tool.ruff])."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is missing: it comes with the dev extra (pip install -e '.[dev]')")
    result = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the sampo_megatron modules ``path`` imports (relative imports resolved)."""
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("sampo_megatron")}


def test_nothing_below_the_command_lines_imports_them():
    offenders = [f"{p.relative_to(ROOT)} imports {name}" for p in sorted((ROOT / "sampo_megatron").rglob("*.py"))
                 if p.parent.name != "cli" for name in sorted(_imported_modules(p)) if name.startswith("sampo_megatron.cli")]  # fmt: skip
    assert offenders == []


def test_every_package_directory_is_a_package_the_wheel_holds():
    """setup.py's find_packages takes directories with an __init__.py only: one without it is left
    out of the wheel while an editable install still imports it from the checkout."""
    from setuptools import find_packages

    found = set(find_packages(str(ROOT), include=["sampo_megatron", "sampo_megatron.*"]))
    with_code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sampo_megatron").rglob("*.py")}
    assert with_code - found == set()


def test_the_planner_imports_and_plans_without_torch():
    code = (
        "import sys\nsys.modules['torch'] = None  # import torch raises ImportError\n"
        "from sampo_megatron.config import ModelConfig\n"
        "from sampo_megatron.planning import Layout, plan_memory\n"
        "from sampo_megatron.planning.presets import shape_from_model_config\n"
        "shape = shape_from_model_config(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4), 8000)\n"
        "assert shape.ffn_hidden_size == 256 and plan_memory(shape, Layout()).total > 0\n"
        "assert not [m for m in sys.modules if m.startswith(('megatron', 'transformers'))]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
