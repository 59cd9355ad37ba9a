"""FP8 and recomputation flags reach megatron-core's TransformerConfig (what Transformer Engine's
layers and megatron's FP8 context read), and FP8 fails clearly where it cannot run."""

import subprocess
import sys

import pytest

from sampo_megatron.config import parse_config
from sampo_megatron.models.gpt import transformer_config
from sampo_megatron.validation import config_problems, fp8_unavailable_reason

from helpers import REPO_ROOT, torchrun_env

FP8 = ["--num-layers", "6", "--bf16", "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid",
       "--fp8-recipe", "tensorwise", "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "1",
       "--num-layers-at-end-in-bf16", "2"]  # fmt: skip


def build(flags):
    cfg = parse_config(flags)
    return cfg, transformer_config(cfg.model, cfg.parallel, cfg.precision, cfg.recompute)


def test_fp8_flags_reach_the_transformer_config():
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    _, config = build(FP8 + ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"])
    assert config.fp8 == "hybrid" and config.fp8_recipe == Fp8Recipe.tensorwise
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == ("full", "block", 2)
    # megatron-core's own rule for which layers skip the FP8 context: first 1 and last 2 of 6
    assert [is_first_last_bf16_layer(config, i) for i in range(6)] == [True, False, False, False, True, True]
    _, e4m3 = build(["--bf16", "--fp8-format", "e4m3"])
    assert e4m3.fp8 == "e4m3" and e4m3.fp8_recipe == Fp8Recipe.delayed  # Megatron-LM's default recipe
    _, plain = build([])
    assert plain.fp8 is None and plain.recompute_granularity is None


def test_the_reference_replica_is_built_from_the_same_config():
    """The trainer builds policy and replica with ``transformer_config`` from the same run config;
    two calls give equal FP8 / recompute fields (the Trainer-level check with a real replica, for
    recomputation, is in tests/test_plan_memory.py)."""
    cfg, policy = build(FP8)
    reference = transformer_config(cfg.model, cfg.parallel, cfg.precision, cfg.recompute)
    keys = ("fp8", "fp8_recipe", "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")
    assert {k: getattr(reference, k) for k in keys} == {k: getattr(policy, k) for k in keys}


def test_megatron_rejects_bf16_edge_layers_with_delayed_scaling():
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer in BF16"):
        build(["--bf16", "--fp8-format", "hybrid", "--fp8-recipe", "delayed", "--first-last-layers-bf16"])
    with pytest.raises(ValueError, match="recompute_method must be"):
        build(["--recompute-granularity", "full"])


def test_fp8_unavailable_reasons():
    cfg = parse_config(FP8)
    assert "needs a CUDA GPU" in fp8_unavailable_reason(cfg.model, cfg.precision, cuda=False, transformer_engine=False)
    assert "needs Transformer Engine" in fp8_unavailable_reason(cfg.model, cfg.precision, cuda=True, transformer_engine=False)
    assert fp8_unavailable_reason(cfg.model, cfg.precision, cuda=True, transformer_engine=True) is None
    local = parse_config(FP8 + ["--transformer-impl", "local"])
    assert "--transformer-impl transformer_engine" in fp8_unavailable_reason(local.model, local.precision, True, True)
    no_bf16 = parse_config(FP8 + ["--no-bf16"])
    assert "needs --bf16" in fp8_unavailable_reason(no_bf16.model, no_bf16.precision, True, True)
    assert fp8_unavailable_reason(parse_config([]).model, parse_config([]).precision, False, False) is None


@pytest.mark.multiprocess
def test_trainer_refuses_fp8_on_cpu_with_a_clear_error():
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "pretrain_sampo.py"), "--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"),
           "--bf16", "--fp8-format", "hybrid", "--train-iters", "1", "--save", "", "--metrics-file", ""]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--fp8-format hybrid needs a CUDA GPU" in proc.stderr


def test_every_recipe_parses_with_the_trainers_parser():
    recipes = sorted((REPO_ROOT / "examples" / "recipes").glob("*.yaml"))
    assert len(recipes) == 12
    for recipe in recipes:
        cfg = parse_config(["--config", str(recipe)])
        transformer_config(cfg.model, cfg.parallel, cfg.precision, cfg.recompute)  # megatron-core's own validation
        if recipe.stem.endswith("_tdpo2"):  # the paper's token-level baseline, run as the authors did
            assert (cfg.loss.loss_type, cfg.loss.tdpo_alpha, cfg.loss.length_debias) == ("tdpo2", 0.5, "none"), recipe.name
            assert not [p for p in config_problems(cfg, world_size=8, purpose="dry_run") if "TDPO" in p], recipe.name
            continue
        assert cfg.loss.length_debias == "sampo", recipe.name
        assert cfg.reference.ref_update == ("epoch" if recipe.stem.endswith("_iterative") else "none"), recipe.name
    by_name = {r.stem: parse_config(["--config", str(r)]) for r in recipes}
    assert by_name["pythia-2.8b_hh-rlhf"].loss.beta == 0.05 and by_name["pythia-2.8b_tldr"].loss.beta == 0.5
    llama = by_name["llama3-8b_ultrafeedback"]
    assert (llama.optimizer.lr, llama.loss.beta, llama.training.train_epochs, llama.training.seq_length) == (4e-7, 0.1, 3, 8192)
    assert by_name["tulu2-13b_ultrafeedback"].optimizer.lr == 1e-6
    assert by_name["qwen1.5-72b_ultrafeedback_fp8"].precision.fp8_format == "hybrid"
    assert by_name["pythia-2.8b_tldr_tdpo2"].loss.beta == 0.5 and by_name["llama3-8b_ultrafeedback_tdpo2"].optimizer.lr == 4e-7
