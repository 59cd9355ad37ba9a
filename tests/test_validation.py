"""One validation (sampo_megatron/validation.py): every rule once, one line per problem in the flags'
own words, before megatron-core is imported or any data is read; the same lines from the trainer,
--dry-run and the converter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sampo_megatron.config import ConfigFileError, ModelConfig, parse_config
from sampo_megatron.validation import ConfigError, config_problems, split_rule_problems, validate_or_raise

from helpers import REPO_ROOT, torchrun_env

TINY = ["--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml")]
LAUNCH = REPO_ROOT / "launch" / "pretrain_sampo.py"


@pytest.mark.parametrize(
    "flags, line",
    [
        (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
        (["--train-iters", "0"], "--train-iters must be >= 1, got 0"),
        (["--train-iters", "-3"], "--train-iters must be >= 1, got -3"),
        (["--seq-length", "0"], "--seq-length must be >= 1, got 0"),
        (["--save-interval", "-1"], "--save-interval must be >= 1, got -1"),
        (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1], got 1.5"),
        (["--bf16", "--fp16"], "--bf16 and --fp16 are exclusive"),
        (["--global-batch-size", "10"], "--global-batch-size 10 not divisible by --micro-batch-size 4 x data-parallel size 1"),
        (["--ref-mode", "cache", "--save", ""], "--ref-mode cache needs --ref-cache-dir or --save"),
        (["--data-path", "/nonexistent.jsonl"], "--data-path /nonexistent.jsonl: no such file or directory"),
        (["--tensor-model-parallel-size", "3"], "attention heads (4) not divisible by --tensor-model-parallel-size 3"),
        (["--context-parallel-size", "2"], "--context-parallel-size > 1 needs --transformer-impl transformer_engine"),
        (["--eval-interval", "5"], "--eval-interval needs --eval-prompts (lengths) and/or --eval-data-path"),
        (["--eval-rewards-output", "r.jsonl"], "--eval-rewards-output needs --eval-interval and --eval-data-path"),
    ],
)
def test_each_bad_flag_is_one_line_naming_it(flags, line):
    problems = config_problems(parse_config([*TINY, *flags]), world_size=2)
    assert line in "\n".join(problems), problems


def test_fp8_rules_for_a_gpu_run_planned_anywhere():
    """--dry-run plans for a GPU machine: only the configuration's FP8 rules apply."""
    problems = config_problems(parse_config([*TINY, "--fp8-format", "hybrid"]), world_size=2, purpose="dry_run")
    assert "--fp8-format hybrid needs --transformer-impl transformer_engine" in "\n".join(problems)
    problems = config_problems(parse_config([*TINY, "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine"]),
                               world_size=2, purpose="dry_run")  # fmt: skip
    assert "--fp8-format hybrid needs --bf16" in "\n".join(problems)


def test_every_problem_is_listed_at_once():
    cfg = parse_config([*TINY, "--micro-batch-size", "0", "--train-iters", "0", "--seq-length", "0", "--save-interval", "-1"])
    with pytest.raises(ConfigError) as err:
        validate_or_raise(cfg, world_size=2)
    assert str(err.value).count("\n  - ") == 4


def test_one_rule_for_query_groups_and_tensor_parallelism():
    """One key/value head at TP 2 is fine (megatron-core replicates it); the trainer, --dry-run and the
    converter now agree."""
    one_group = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=1)
    assert split_rule_problems(one_group, tp=2, pp=1, vpp_layers=None) == []
    assert config_problems(parse_config([*TINY, "--num-query-groups", "1"]), world_size=2) == []
    three_groups = ModelConfig(num_layers=2, hidden_size=96, num_attention_heads=6, num_query_groups=3, ffn_hidden_size=128)
    assert split_rule_problems(three_groups, tp=2, pp=1, vpp_layers=None) == [
        "query groups (3) and --tensor-model-parallel-size 2: one must divide the other"
    ]


def test_tdpo_needs_the_replica_and_response_logits():
    problems = "\n".join(config_problems(parse_config([*TINY, "--loss-type", "tdpo1", "--ref-mode", "cache"]), world_size=2))
    assert (
        "--loss-type tdpo1 (TDPO) needs the reference's full-vocabulary distribution at every response position; "
        "--ref-mode cache stores per-token log-probs only: use --ref-mode replica" in problems
    )
    problems = "\n".join(
        config_problems(parse_config([*TINY, "--loss-type", "tdpo2", "--no-response-logits-only"]), world_size=2)
    )
    assert "drop --no-response-logits-only" in problems
    assert config_problems(parse_config([*TINY, "--loss-type", "tdpo2"]), world_size=2) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("train-iters: true\n", "train_iters must be int, got True (line 1)"),
        (
            "seq-length: 64\nlr: 1e-6\n",
            "lr must be float; YAML reads '1e-6' as a string: write it with a dot, e.g. 1.0e-6 (line 2)",
        ),
        ("lr: [0.1\n", "not valid YAML"),
        ("micro-batch-size: 2\n  global-batch-size: 4\n", "not valid YAML"),
    ],
)
def test_yaml_mistakes_name_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as err:
        parse_config(["--config", str(path)])
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def _errors_of(*args: str, **env: str) -> list[str]:
    proc = subprocess.run([sys.executable, str(LAUNCH), *TINY, *args], cwd=REPO_ROOT, env=torchrun_env(**env), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    return [line for line in proc.stderr.splitlines() if line.startswith(("error:", "  - "))]


def test_trainer_and_dry_run_give_the_same_error_for_a_bad_layout():
    bad = ["--tensor-model-parallel-size", "3", "--global-batch-size", "10"]
    trainer = _errors_of(*bad, RANK="0", WORLD_SIZE="3")  # as rank 0 of a 3-process launch; it stops before the rendezvous
    dry_run = _errors_of(*bad, "--dry-run", "--world-size", "3")
    assert trainer == dry_run and trainer[0] == "error: invalid configuration:"
    assert "  - attention heads (4) not divisible by --tensor-model-parallel-size 3" in trainer


def test_a_bad_flag_answers_before_megatron_is_imported():
    code = (
        "import sys\nfrom sampo_megatron.cli.train import main\n"
        f"try:\n    main({[*TINY, '--micro-batch-size', '0']!r})\nexcept SystemExit as e:\n    assert e.code == 1\n"
        "assert not any(m.startswith('megatron') for m in sys.modules), 'megatron was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=torchrun_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "error: invalid configuration:\n  - --micro-batch-size must be >= 1, got 0" in proc.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beta", "0"], "beta must be > 0, got 0.0"),
        (["--length-debias", "ld_dpo"], "--length-debias ld_dpo needs --ld-alpha"),
        (
            ["--length-debias", "sampo", "--ld-alpha", "0.5"],
            "--ld-alpha is the weight of the ld_dpo transform; it does not combine with --length-debias sampo",
        ),  # fmt: skip
        (["--length-debias", "ld_dpo", "--ld-alpha", "2"], "ld_alpha must be in [0, 1], got 2.0"),
    ],
)
def test_loss_settings_that_cannot_run_are_named(flags, message):
    with pytest.raises(ConfigFileError) as err:
        parse_config([*TINY, *flags])
    assert str(err.value).startswith("invalid configuration: ") and message in str(err.value)


def test_a_bad_loss_setting_is_one_line_without_a_traceback():
    proc = subprocess.run([sys.executable, str(LAUNCH), *TINY, "--length-debias", "ld_dpo", "--dry-run"], cwd=REPO_ROOT,
                          env=torchrun_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: invalid configuration: --length-debias ld_dpo needs --ld-alpha "
                                                "(the weight in [0, 1] of the tokens past the public prefix)"]  # fmt: skip


def test_generation_refuses_an_interleaved_pipeline_with_the_reason():
    vpp = [*TINY, "--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    problems = config_problems(parse_config([*vpp, "--load", "ckpt"]), world_size=2, purpose="generate")
    assert any("drop --num-layers-per-virtual-pipeline-stage (the checkpoint reshards)" in p for p in problems), problems
    with_monitor = parse_config([*vpp, "--eval-interval", "5", "--eval-prompts", str(TINY[1])])
    assert any(
        "the verbosity monitor's --eval-prompts need a layout without" in p for p in config_problems(with_monitor, world_size=2)
    )
    assert not any("interleaved" in p for p in config_problems(parse_config(vpp), world_size=2))  # training alone is fine
