"""Flags, YAML configs and model-configuration logic (no processes launched)."""

import subprocess
import sys

import pytest
import torch

from sampo_megatron.config import ModelConfig, parse_config
from sampo_megatron.models.gpt import ffn_hidden_size, layer_spec, padded_vocab_size


def test_flags_override_the_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tensor-model-parallel-size: 2\nlr: 1\nlength_debias: sampo\nbeta: 0.5\n")
    cfg = parse_config(["--config", str(path), "--beta", "0.2", "--seed", "9"])
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.loss.length_debias == "sampo" and cfg.loss.beta == 0.2
    assert cfg.loss.seed == 9 and cfg.training.seed == 9  # one --seed for init, data and draws


def test_bad_config_files_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tensor-model-paralel-size: 2\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown key 'tensor_model_paralel_size'"):
        parse_config(["--config", str(path)])
    path.write_text("seq-length: long\n")
    with pytest.raises(ValueError, match="seq_length must be int"):
        parse_config(["--config", str(path)])
    path.write_text("length-debias: shortest\n")
    with pytest.raises(ValueError, match="length_debias must be one of"):
        parse_config(["--config", str(path)])


def test_bad_flag_values_exit_with_usage():
    with pytest.raises(SystemExit):
        parse_config(["--loss-type", "dpo++"])


def test_help_shows_every_flags_default():
    from sampo_megatron.config.parsing import _flag_fields, build_parser

    text = " ".join(build_parser().format_help().split())
    assert text.count("(default: ") == len(list(_flag_fields())) > 100
    assert "Peak learning rate. (default: 1e-06)" in text and "Neither flag: on with the local spec" in text


def test_vocab_padding_and_llama_ffn():
    assert padded_vocab_size(403, 64, 2) == 512
    assert padded_vocab_size(152064, 128, 8) == 152576  # a multiple of 128 x TP
    assert ffn_hidden_size(ModelConfig(hidden_size=4096, swiglu=True)) == 11008  # Llama-2-7B
    assert ffn_hidden_size(ModelConfig(hidden_size=64, swiglu=False)) == 256


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_transformer_engine_spec_fails_clearly_on_cpu():
    with pytest.raises(RuntimeError, match="transformer_engine needs a CUDA GPU"):
        layer_spec(ModelConfig(transformer_impl="transformer_engine"))


def test_help_answers_without_importing_torch():
    # --help in about a second: parsing needs neither torch nor megatron-core (the loss names come
    # from sampo_megatron/losses/names.py)
    code = (
        "import sys\nfrom sampo_megatron.cli.train import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch loaded:', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--length-debias" in out and out.strip().endswith("torch loaded: False")


def test_registry_holds_exactly_the_listed_names():
    from sampo_megatron.losses.registry import Registry

    registry = Registry("thing", ("a", "b"))
    registry.register("a")(object())
    with pytest.raises(ValueError, match="'c' is not listed in sampo_megatron/losses/names.py"):
        registry.register("c")
    with pytest.raises(ValueError, match=r"\['b'\] listed in sampo_megatron/losses/names.py but never registered"):
        registry.check_complete()
