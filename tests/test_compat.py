"""The megatron-core version check and the version-keyed compatibility layer (sampo_megatron/compat)."""

from __future__ import annotations

import sys
import warnings

import pytest

from sampo_megatron.compat import cpu, version
from sampo_megatron.compat.version import RELEASE_LINES, UnsupportedMegatronError, parse_version, release_line


@pytest.mark.parametrize("text, line", [("0.16.1", "0.16"), ("0.16.7", "0.16"), ("0.19.2", "0.19"), ("0.19.9rc1", "0.19"),
                                        ("0.19.3+nv25.10", "0.19")])  # fmt: skip
def test_tested_versions_map_to_their_line(text, line):
    assert release_line(text, allow_untested=False).name == line


@pytest.mark.parametrize("text", ["0.15.3", "0.16.0", "0.17.1", "0.18.2", "0.19.1", "0.20.0", "1.0.0"])
def test_untested_version_is_a_clear_error(text):
    with pytest.raises(UnsupportedMegatronError) as err:
        release_line(text, allow_untested=False)
    message = str(err.value)
    assert f"megatron-core {text} is outside" in message
    assert "megatron-core>=0.16.1,<0.17 (tested on Python 3.11)" in message
    assert "megatron-core>=0.19.2,<0.20 (tested on Python 3.12)" in message
    assert "pip install 'megatron-core>=0.19.2,<0.20'" in message and version.ALLOW_UNTESTED_ENV in message


def test_untested_version_runs_with_the_opt_out(monkeypatch):
    monkeypatch.setenv(version.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(UserWarning, match="outside the versions sampo-megatron is tested with"):
        assert release_line("0.18.2").name == "0.19"
    with pytest.warns(UserWarning):
        assert release_line("0.17.0").name == "0.16"
    monkeypatch.setenv(version.ALLOW_UNTESTED_ENV, "0")
    with pytest.raises(UnsupportedMegatronError):
        release_line("0.18.2")


def test_missing_megatron_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(version, "installed_megatron_version", lambda: None)
    with pytest.raises(UnsupportedMegatronError, match="megatron-core is not installed"):
        release_line()


def test_parse_version():
    assert parse_version("0.19.2") == (0, 19, 2) and parse_version("0.16.1rc0+abc") == (0, 16, 1)
    with pytest.raises(ValueError):
        parse_version("main")


def test_each_python_leg_runs_its_tested_line():
    """The installed megatron-core is the one setup.py gives this Python (the two CI legs)."""
    line = release_line(allow_untested=False)
    assert line.name == ("0.16" if sys.version_info < (3, 12) else "0.19")
    assert line.python == f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_start_up_check_refuses_a_fake_untested_version(monkeypatch):
    """apply_cpu_compat (called by the trainer, generation and the tools at start-up) checks first."""
    monkeypatch.setattr(version, "installed_megatron_version", lambda: "0.17.1")
    monkeypatch.delenv(version.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(UnsupportedMegatronError, match="megatron-core 0.17.1 is outside"):
        cpu.apply_cpu_compat()


def test_every_site_is_surveyed_for_every_line():
    for entry in cpu._SHIMMED_MODULES:
        assert set(entry.lines) == {line.name for line in RELEASE_LINES}, entry.module
    for fn in cpu._CUDA_VIEW_FUNCTIONS:
        assert set(fn.lines) == {line.name for line in RELEASE_LINES}, fn.path


def test_sites_exist_in_the_installed_release():
    cpu._check_sites(release_line().name)
    from sampo_megatron.compat.optimizer_state import check_sites

    check_sites()


def test_a_moved_site_fails_loudly(monkeypatch):
    """A patched call that megatron no longer makes, or a function that moved, is an error naming it."""
    line = release_line().name
    entry = cpu._SHIMMED_MODULES[0]
    moved = cpu.ShimmedModule(entry.module, entry.why, ("torch.cuda.no_such_call()",), entry.lines)
    monkeypatch.setattr(cpu, "_SHIMMED_MODULES", (moved, *cpu._SHIMMED_MODULES[1:]))
    with pytest.raises(cpu.CompatError, match=r"no longer calls \['torch.cuda.no_such_call\(\)'\]"):
        cpu._check_sites(line)
    monkeypatch.undo()
    fn = cpu._CUDA_VIEW_FUNCTIONS[0]
    gone = cpu.CudaViewFunction(fn.module, "DistributedOptimizer.no_such_method", fn.why, fn.lines)
    monkeypatch.setattr(cpu, "_CUDA_VIEW_FUNCTIONS", (gone, *cpu._CUDA_VIEW_FUNCTIONS[1:]))
    with pytest.raises(cpu.CompatError, match="DistributedOptimizer.no_such_method does not exist"):
        cpu._check_sites(line)


def test_parallel_residual_uses_no_private_method_of_megatron():
    """The GPT-NeoX layer overrides only public names (its numerics are tested against Hugging Face
    in tests/test_convert.py)."""
    import inspect

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sampo_megatron.models import parallel_residual

    import ast
    import re

    tree = ast.parse(inspect.getsource(parallel_residual))
    private = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and re.match(r"_[a-z]", node.attr)}
    assert private == {"_parallel_residual_input"}  # the layer's own attribute, nothing of megatron's


def test_expected_notices_are_dropped_and_nothing_else():
    import logging

    from sampo_megatron.compat.notices import expected_notices, quiet_expected_notices

    quiet_expected_notices()  # checks each message still exists in the installed module
    quiet_expected_notices()  # idempotent
    for notice in expected_notices():
        logger = logging.getLogger(notice.logger)
        keep = logging.LogRecord(notice.logger, logging.WARNING, __file__, 1, "something else", None, None)
        drop = logging.LogRecord(notice.logger, logging.WARNING, __file__, 1, notice.message + " and more", None, None)
        assert logger.filter(keep) and not logger.filter(drop), notice
        assert len(logger.filters) == 1


def test_expected_warnings_are_dropped_and_a_reworded_one_fails_loudly(monkeypatch):
    import warnings

    from sampo_megatron.compat import notices

    with warnings.catch_warnings():
        notices.quiet_expected_notices()  # each message is checked in its module's installed source
        for expected in notices.expected_warnings():
            with warnings.catch_warnings(record=True) as seen:
                warnings.warn(expected.message + " and more", UserWarning, stacklevel=1)
                warnings.warn("something else entirely", UserWarning, stacklevel=1)
            assert [str(w.message) for w in seen] == ["something else entirely"], expected
    gone = notices.ExpectedWarning("megatron.core.transformer.transformer_config", "a message no release prints", "test")
    monkeypatch.setattr(notices, "_WARNINGS_ON_EVERY_LINE", (gone,))
    with pytest.raises(cpu.CompatError, match="transformer_config no longer says 'a message no release prints'"):
        notices.quiet_expected_notices()


def test_the_local_spec_sites_exist():
    from sampo_megatron.compat.local_spec import SITES, check_local_spec

    assert release_line().name in SITES
    check_local_spec()


# ------------------------------------------------------------------- compat/torch_compile.py
def test_the_jit_fuser_is_disabled_only_without_cuda():
    import types

    from sampo_megatron.compat import torch_compile

    def fake_jit():
        jit = types.SimpleNamespace(noop_decorator=lambda fn: fn, jit_fuser="torch.compile")
        jit.disable_jit_fuser = lambda: setattr(jit, "jit_fuser", jit.noop_decorator)
        return jit

    on_gpu, on_cpu = fake_jit(), fake_jit()
    assert torch_compile.disable_jit_fuser(on_gpu, cuda_available=True) is False and on_gpu.jit_fuser == "torch.compile"
    assert torch_compile.disable_jit_fuser(on_cpu, cuda_available=False) is True and on_cpu.jit_fuser is on_cpu.noop_decorator
    with pytest.raises(cpu.CompatError, match="has no \\['disable_jit_fuser'\\]"):
        torch_compile.disable_jit_fuser(types.SimpleNamespace(noop_decorator=None), cuda_available=False)


def test_the_router_loads_with_torch_compile_as_the_identity_and_torch_compile_comes_back():
    import torch

    from sampo_megatron.compat import torch_compile

    real, seen = torch.compile, []

    def load():
        seen.append(torch.compile)
        raise RuntimeError("the module failed to load")

    compiles_at_import = release_line().name in torch_compile.ROUTER_SITES
    with pytest.raises(RuntimeError, match="failed to load"):
        torch_compile.load_router_uncompiled(load, "    @torch.compile\n    def f(x): ...", cuda_available=False)
    assert torch.compile is real  # restored although loading failed
    if compiles_at_import:  # 0.19
        fn = lambda x: x  # noqa: E731
        assert seen[0] is not real and seen[0](fn) is fn and seen[0](fullgraph=True)(fn) is fn
        with pytest.raises(cpu.CompatError, match="no longer decorates with @torch.compile"):
            torch_compile.load_router_uncompiled(lambda: None, "def f(x): ...", cuda_available=False)
    else:  # 0.16 compiles nothing there: loaded as it is
        assert seen == [real]
    seen.clear()
    with pytest.raises(RuntimeError):
        torch_compile.load_router_uncompiled(load, "    @torch.compile\n", cuda_available=True)
    assert seen == [real]  # with CUDA: untouched
