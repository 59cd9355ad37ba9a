"""The resolved run plan (sampo_megatron/plan.py): settled once per process, frozen, every problem
together; nothing downstream re-derives or writes back."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sampo_megatron.config import parse_config
from sampo_megatron.models.architecture import CheckpointArchitecture, write_architecture
from sampo_megatron.plan import RunPlan, resolve
from sampo_megatron.validation import ConfigError

from helpers import BASE, REPO_ROOT, SHIPPED
from pool import pool

TOKENIZER = str(REPO_ROOT / "examples" / "data" / "tiny_tokenizer")
TINY = ["--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"), "--tensor-model-parallel-size", "1",
        "--data-path", str(SHIPPED), "--tokenizer-model", TOKENIZER, "--train-iters", "2", "--save", ""]  # fmt: skip


def test_the_plan_is_frozen_and_its_input_untouched(tmp_path):
    ckpt = tmp_path / "converted"
    ckpt.mkdir()
    write_architecture(str(ckpt), CheckpointArchitecture(model={"num_layers": 3, "hidden_size": 48, "vocab_size": 500},
                                                          tokenizer=TOKENIZER))  # fmt: skip
    (ckpt / "metadata.json").write_text("{}")  # a torch_dist checkpoint directory (resolve_checkpoint)
    # no architecture flags (tiny_cpu.yaml sets some): the checkpoint sets them
    cfg = parse_config(["--load", str(ckpt), "--data-path", str(SHIPPED), "--tokenizer-model", TOKENIZER, "--train-iters", "2"])
    before = dataclasses.asdict(cfg)
    plan = resolve(cfg, world_size=1)
    assert isinstance(plan, RunPlan)
    # the decisions are in the plan ...
    assert (plan.config.model.num_layers, plan.config.model.hidden_size) == (3, 48)
    assert plan.vocab_size == 500 and plan.padded_vocab_size == 512  # padded to a multiple of 128 x TP 1
    assert plan.pack_sequences is True and plan.config.training.pack_sequences is True  # the local spec's default
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp, plan.virtual_pipeline_size) == (1, 1, 1, None)
    assert plan.architecture is not None and plan.tokenizer is not None
    # ... not in what it was resolved from
    assert dataclasses.asdict(cfg) == before and cfg.training.pack_sequences is None
    # and nothing can change them afterwards
    for section, name, value in (("training", "pack_sequences", False), ("model", "num_layers", 4),
                                 ("data", "tokenizer_model", "other"), ("loss", "beta", 0.5), ("precision", "bf16", True)):  # fmt: skip
        with pytest.raises(dataclasses.FrozenInstanceError, match="resolved plan is frozen"):
            setattr(getattr(plan.config, section), name, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.config.training = cfg.training
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.vocab_size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layout.tp = 2
    # a variant is a new configuration, not a change of the plan's
    variant = dataclasses.replace(plan.config.optimizer, lr=0.5)
    variant.lr = 0.25
    assert plan.config.optimizer.lr != 0.25


def test_every_problem_is_reported_together_one_line_each():
    cfg = parse_config([*TINY, "--tensor-model-parallel-size", "3", "--bf16", "--fp16", "--seq-length", "100",
                        "--sliding-window", "64", "--num-layers-per-virtual-pipeline-stage", "1"])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        resolve(cfg, world_size=2)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid configuration:" and all(line.startswith("  - ") for line in lines[1:])
    text = str(err.value)
    for expected in ("--bf16 and --fp16 are exclusive", "exceeds the model's attention window",
                     "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1",
                     "not divisible by --tensor-model-parallel-size 3", "is not a multiple of TP 3"):  # fmt: skip
        assert expected in text, text


def test_the_tokenizer_must_fit_the_model():
    with pytest.raises(ConfigError, match=r"--tokenizer-model .*: the tokenizer has \d+ ids but the model's vocabulary has only 10"):
        resolve(parse_config([*TINY, "--vocab-size", "10"]), world_size=1)


def test_each_rule_is_written_once():
    """The three rules the trainer once checked twice (in the model builders and in validation) are
    checked only in sampo_megatron/validation.py."""
    package = REPO_ROOT / "sampo_megatron"
    checks = {
        "bf16/fp16": r"\.bf16 and \w+\.fp16",
        "virtual pipeline divisibility": r"per_stage\s*%",
        "attention window": r"seq_length\s*<=\s*\w+\.sliding_window",
    }
    for name, pattern in checks.items():
        where = sorted(str(p.relative_to(REPO_ROOT)) for p in package.rglob("*.py") if re.search(pattern, p.read_text()))
        assert where == ["sampo_megatron/validation.py"], (name, where)


def test_the_trainer_takes_a_plan():
    from sampo_megatron.training.trainer import Trainer

    with pytest.raises(TypeError, match=r"Trainer takes a RunPlan, got RunConfig: Trainer\(resolve\(cfg\)\)"):
        Trainer(parse_config(TINY))


@pytest.mark.multiprocess
def test_a_run_resolves_its_plan_once_per_process(tmp_path):
    argv = [*BASE, "--save", "", "--metrics-file", str(tmp_path / "metrics.jsonl"), "--train-iters", "1"]
    results, output = pool(2).run("pool_jobs:count_resolves", argv, timeout=300)
    assert results == [1, 1], output
    assert Path(tmp_path / "metrics.jsonl").exists()
