"""make install's decision (tools/setup_venv.py): keep a container's CUDA stack, else CPU torch first."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("setup_venv", ROOT / "tools" / "setup_venv.py")
setup_venv = importlib.util.module_from_spec(spec)
sys.modules["setup_venv"] = setup_venv  # dataclasses look their module up there
spec.loader.exec_module(setup_venv)


def test_container_with_cuda_torch_keeps_its_stack():
    base = setup_venv.BaseInterpreter(
        "3.12", torch_cuda="12.8",
        installed={"torch": "2.8.0a0+5228986c39.nv25.06", "transformer_engine": "2.4.0+3cd6870", "apex": "0.1"},
    )  # fmt: skip
    plan = setup_venv.plan_install(base, "2.13.0")
    assert plan.system_site_packages and plan.cpu_torch is None
    assert plan.constraints == ["apex==0.1", "torch==2.8.0a0+5228986c39.nv25.06", "transformer_engine==2.4.0+3cd6870"]


def test_no_torch_or_cpu_torch_gets_a_plain_venv_with_cpu_torch_first():
    for installed in ({}, {"torch": "2.13.0+cpu"}):
        plan = setup_venv.plan_install(setup_venv.BaseInterpreter("3.11", torch_cuda=None, installed=installed), "2.13.0")
        assert not plan.system_site_packages and plan.cpu_torch == "2.13.0" and plan.constraints == []


def _fake_distribution(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_probe_sees_a_cuda_torch_in_the_base_interpreter(tmp_path):
    """The real probe, run by an interpreter whose path holds a fake CUDA torch, TE and apex (as an
    NGC container's site-packages would)."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("class version:\n    cuda = '12.8'\n")
    _fake_distribution(site, "torch", "2.8.0a0+nv25.06")
    _fake_distribution(site, "transformer_engine", "2.4.0")
    _fake_distribution(site, "apex", "0.1")
    cmd = [sys.executable, "-S", str(ROOT / "tools" / "setup_venv.py"), "--plan-only"]
    out = subprocess.run(cmd, env={"PYTHONPATH": str(site)}, capture_output=True, text=True, check=True).stdout
    plan = json.loads(out)
    assert plan["system_site_packages"] is True and plan["cpu_torch"] is None
    assert plan["constraints"] == ["apex==0.1", "torch==2.8.0a0+nv25.06", "transformer_engine==2.4.0"]


def test_plan_of_this_machine():
    """This CI machine's base interpreters have no CUDA torch: a plain venv, CPU torch first."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "setup_venv.py"), "--plan-only"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    plan = json.loads(out)
    probe = setup_venv.probe()
    assert plan["system_site_packages"] == (probe.torch_cuda is not None)
