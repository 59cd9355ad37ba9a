"""Hugging Face <-> megatron-core conversion, checked against transformers itself.

Tiny random models of every supported family are built from configs here and saved with
``save_pretrained``. The references are independent of the converter: Hugging Face's own forward
logits, the ``safetensors`` library's reader, and megatron-core's own checkpoint loading and saving.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sampo_megatron.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from sampo_megatron.convert.safetensors_io import TensorEntry, read_header, read_tensor, write_safetensors
from sampo_megatron.convert.torch_dist_reader import TorchDistReader

from helpers import (
    ARCHITECTURES,
    CASES,
    LLAMA3_ROPE,
    REPO_ROOT,
    TOKENIZER,
    VOCAB,
    hf_logits,
    make_hf_model,
    run_torchrun,
)

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

PAIRS = REPO_ROOT / "examples" / "data" / "tiny_pairs.jsonl"
SEQ = 32  # long enough that Llama 3.1 RoPE scaling changes the logits (see test_rope_scaling_matters)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TOLERANCE = 1e-4


def safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, read with the safetensors library."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """root/<case>/hf (source) and root/<case>/mg_tp{1,2} (converted for TP 1 and 2)."""
    root = tmp_path_factory.mktemp("convert")
    for case in CASES:
        hf = make_hf_model(root / case / "hf", case)
        for tp in (1, 2):
            convert_hf_to_megatron(str(hf), str(root / case / f"mg_tp{tp}"), tensor_model_parallel_size=tp, emit=None)
    torch.save(torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0)), root / "tokens.pt")
    return root


@pytest.fixture(scope="module")
def megatron_runs(converted) -> Path:
    """One 4-process launch: every case at every TP x PP layout, plus megatron-sharded re-saves."""
    run_torchrun("convert_logits_worker.py", 4, "--root", str(converted), "--cases", ",".join(CASES),
                 "--resave", "llama3,pythia", timeout=900)  # fmt: skip
    return converted


# ----------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("case", CASES)
def test_round_trip_gives_identical_tensors_and_config(converted, tmp_path, case):
    source = converted / case / "hf"
    back = tmp_path / "back"
    convert_megatron_to_hf(str(converted / case / "mg_tp2"), str(back), emit=None)

    original, exported = safetensors_dir(source), safetensors_dir(back)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    for name in ("config.json", "generation_config.json"):
        if (source / name).exists():
            assert json.loads((back / name).read_text()) == json.loads((source / name).read_text()), name
    for f in TOKENIZER.iterdir():
        assert (back / f.name).read_bytes() == f.read_bytes()

    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not any(info.values()), info


def test_pytorch_bin_weights_and_dtype_conversion(converted, tmp_path):
    """A ``pytorch_model.bin`` source (old hub checkpoints) converts like safetensors; ``dtype``
    casts on import and export."""
    source = tmp_path / "bin"
    shutil.copytree(converted / "pythia" / "hf", source)
    original = safetensors_dir(source)
    (source / "model.safetensors").unlink()
    torch.save(original, source / "pytorch_model.bin")
    convert_hf_to_megatron(str(source), str(tmp_path / "mg"), dtype=torch.bfloat16, emit=None)
    convert_megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), dtype=torch.bfloat16, emit=None)
    exported = safetensors_dir(tmp_path / "back")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[n], t.to(torch.bfloat16)) for n, t in original.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_without_source_config_writes_an_equivalent_config(converted, tmp_path):
    """A model with no Hugging Face source (e.g. trained from scratch) gets its config.json built
    from the architecture; transformers must then compute the same logits."""
    for case in ("llama3", "pythia", "qwen2", "mistral"):
        ckpt = tmp_path / case
        shutil.copytree(converted / case / "mg_tp1", ckpt)
        arch = json.loads((ckpt / "sampo_model.json").read_text())
        arch["hf"] = None
        (ckpt / "sampo_model.json").write_text(json.dumps(arch))
        (ckpt / "manifest.json").unlink()  # as a checkpoint written without a manifest (the edit is not damage)
        convert_megatron_to_hf(str(ckpt), str(tmp_path / f"{case}_hf"), emit=None)
        assert json.loads((tmp_path / f"{case}_hf" / "config.json").read_text())["architectures"] == [ARCHITECTURES[case]]
        tokens = torch.load(converted / "tokens.pt")
        diff = (hf_logits(tmp_path / f"{case}_hf", tokens) - hf_logits(converted / case / "hf", tokens)).abs().max()
        assert diff == 0.0, (case, diff)


# ----------------------------------------------------------------------------------- logits
@pytest.mark.parametrize("case", CASES)
def test_megatron_logits_equal_hf_logits_at_every_layout(megatron_runs, case):
    tokens = torch.load(megatron_runs / "tokens.pt")
    reference = hf_logits(megatron_runs / case / "hf", tokens)
    for tp, pp in LAYOUTS:
        logits = torch.load(megatron_runs / case / f"logits_tp{tp}_pp{pp}.pt")
        assert logits.shape == (2, SEQ, {1: 384, 2: 512}[tp])  # the TP padding, never a prediction
        diff = (logits[..., :VOCAB] - reference).abs().max().item()
        assert diff <= TOLERANCE, (case, tp, pp, diff)


def test_rope_scaling_matters_at_this_sequence_length(converted):
    """The Llama 3.1 RoPE scaling changes the logits by much more than the tolerance, so the
    logits test above would catch a converter that dropped it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = converted / "llama3" / "hf"
    tokens = torch.load(converted / "tokens.pt")
    config = AutoConfig.from_pretrained(source)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    unscaled = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    unscaled.load_state_dict(AutoModelForCausalLM.from_pretrained(source).state_dict())
    with torch.no_grad():
        diff = (unscaled(tokens).logits - hf_logits(source, tokens)).abs().max().item()
    assert diff > 50 * TOLERANCE


@pytest.mark.parametrize("case", ["llama3", "pythia"])
def test_export_of_a_checkpoint_megatron_wrote_sharded(megatron_runs, tmp_path, case):
    """megatron-core itself saved these at TP=2 x PP=2 (TP shards as chunks); the export
    reassembles the original Hugging Face tensors bitwise."""
    convert_megatron_to_hf(str(megatron_runs / case / "resaved"), str(tmp_path / "back"), emit=None)
    original, exported = safetensors_dir(megatron_runs / case / "hf"), safetensors_dir(tmp_path / "back")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[n], t) for n, t in original.items())


def test_converted_checkpoint_pads_the_vocabulary_with_zero_rows(converted):
    reader = TorchDistReader(str(converted / "llama3" / "mg_tp2"))
    embedding = reader.read_full("embedding.word_embeddings.weight")
    assert embedding.shape == (512, 64)
    assert torch.equal(embedding[VOCAB:], torch.zeros(512 - VOCAB, 64))
    assert reader.shape("decoder.layers.self_attention.linear_qkv.weight") == (2, (4 + 2 * 2) * 16, 64)


# ----------------------------------------------------------------------------------- trainer
def test_trainer_trains_a_converted_checkpoint_as_policy_and_reference(tmp_path):
    from transformers import GPTNeoXConfig

    # Pythia-like, with a vocabulary larger than the tokenizer's 403 ids (as Pythia's 50304 > 50277).
    config = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=256, vocab_size=416,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                           bos_token_id=1, eos_token_id=2)  # fmt: skip
    hf = make_hf_model(tmp_path / "hf", "pythia", config)
    ckpt = tmp_path / "converted"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(hf), "--save", str(ckpt),
         "--tensor-model-parallel-size", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[hf->megatron] done" in proc.stderr

    tokens = torch.randint(0, 403, (2, SEQ), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    run, metrics = tmp_path / "run", tmp_path / "metrics.jsonl"
    # No architecture flag and no --tokenizer-model: the checkpoint carries both.
    run_torchrun(
        "convert_train_worker.py", 2, "--tokens", str(tmp_path / "tokens.pt"), "--out", str(tmp_path / "logits.pt"),
        "--load", str(ckpt), "--ref-load", str(ckpt), "--data-path", str(PAIRS), "--seq-length", "64",
        "--tensor-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
        "--lr", "1e-2", "--adam-eps", "1e-3", "--save", str(run), "--metrics-file", str(metrics), "--log-interval", "1",
        timeout=900,
    )  # fmt: skip

    loaded = torch.load(tmp_path / "logits.pt")
    reference = hf_logits(hf, tokens)
    assert loaded["vocab_size"] == 416
    for role in ("policy", "reference"):
        assert (loaded[role][..., :416] - reference).abs().max().item() <= TOLERANCE, role
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [s["iteration"] for s in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-6) and steps[0]["rewards/margins"] == 0.0
    assert steps[-1]["rewards/margins"] != 0.0 and math.isfinite(steps[-1]["loss"])

    # The trainer's checkpoint carries the architecture and exports with the source's config.
    saved = json.loads((run / "iter_0000003" / "sampo_model.json").read_text())
    assert saved["model"] == json.loads((ckpt / "sampo_model.json").read_text())["model"]
    convert_megatron_to_hf(str(run), str(tmp_path / "trained_hf"), emit=None)
    assert json.loads((tmp_path / "trained_hf" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    before, after = safetensors_dir(hf), safetensors_dir(tmp_path / "trained_hf")
    assert sorted(after) == sorted(before) and any(not torch.equal(after[n], before[n]) for n in before)
    assert (tmp_path / "trained_hf" / "tokenizer.json").exists()


def test_flags_that_disagree_with_the_checkpoint_are_refused(converted):
    from sampo_megatron.config import parse_config
    from sampo_megatron.plan import resolve

    ckpt = str(converted / "pythia" / "mg_tp1")
    base = ["--load", ckpt, "--data-path", str(PAIRS), "--train-iters", "1"]
    with pytest.raises(ValueError, match=r"--num-layers 3 \(checkpoint: 2\).*--normalization 'RMSNorm'"):
        resolve(parse_config([*base, "--num-layers", "3", "--normalization", "RMSNorm"]), world_size=1)
    other = str(converted / "llama2" / "mg_tp1")
    with pytest.raises(ValueError, match="hold different architectures"):
        resolve(parse_config([*base, "--ref-load", other]), world_size=1)


def test_architecture_fills_only_unset_fields():
    from sampo_megatron.config import ModelConfig
    from sampo_megatron.models.architecture import CheckpointArchitecture, adopt_architecture, write_architecture

    model = ModelConfig(num_layers=2, hidden_size=32)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_architecture(d, CheckpointArchitecture(model={"num_layers": 2, "hidden_size": 48, "vocab_size": 99}))
        adopt_architecture(model, frozenset({"num_layers"}), {"--load": d})
    assert (model.num_layers, model.hidden_size, model.vocab_size) == (2, 48, 99)


def test_sequences_longer_than_the_attention_window_are_refused():
    from sampo_megatron.config import parse_config
    from sampo_megatron.plan import resolve

    # resolved once, before any model is built (sampo_megatron/validation.py states the rule)
    with pytest.raises(ValueError, match="exceeds the model's attention window"):
        resolve(parse_config(["--sliding-window", "16", "--seq-length", "32", "--vocab-size", "128"]), world_size=1, purpose="model")


# ----------------------------------------------------------------------------------- errors
def _edited_copy(converted: Path, tmp_path: Path, case: str, edit) -> Path:
    target = tmp_path / f"{case}_edited"
    shutil.copytree(converted / case / "hf", target)
    edit(target)
    return target


def _set_config(**changes):
    def edit(directory: Path) -> None:
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps(config))

    return edit


def _rename_tensor(old: str, new: str):
    def edit(directory: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(directory / "model.safetensors")
        tensors[new] = tensors.pop(old)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})

    return edit


def _shard_with_missing_file(directory: Path) -> None:
    names = list(read_header(str(directory / "model.safetensors")))
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
    (directory / "model.safetensors").rename(directory / "model-00002-of-00002.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


ERRORS = {
    "unsupported architecture": ("llama2", _set_config(architectures=["GPT2LMHeadModel"]), {}, "unsupported architecture"),
    # the trainer's rules and words (sampo_megatron/validation.py); 2 query groups at TP 4 are fine (replicated)
    "tp vs heads": ("llama2", None, {"tensor_model_parallel_size": 3}, r"attention heads \(4\) not divisible by --tensor-model-parallel-size 3"),
    "pp vs layers": ("llama2", None, {"pipeline_model_parallel_size": 3}, r"layers \(2\) not divisible by --pipeline-model-parallel-size 3"),
    "vpp": ("llama2", None, {"pipeline_model_parallel_size": 2, "num_layers_per_virtual_pipeline_stage": 2}, "per pipeline stage"),
    "missing config": ("llama2", lambda d: (d / "config.json").unlink(), {}, "missing file: .*config.json"),
    "missing weights": ("llama2", lambda d: (d / "model.safetensors").unlink(), {}, "missing file: no weights"),
    "missing shard": ("llama2", _shard_with_missing_file, {}, "missing file: .*model-00001-of-00002.safetensors"),
    "missing tensor": ("llama2", _rename_tensor("model.norm.weight", "model.norm.scale"), {}, "lack 1 tensors"),
    "qwen sliding window": ("qwen2", _set_config(use_sliding_window=True), {}, "use_sliding_window"),
    "llama attention bias": ("llama2", _set_config(attention_bias=True), {}, "attention_bias"),
    "rope type": ("llama2", _set_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}), {}, "RoPE type 'yarn'"),
    "llama3 rope factors": ("llama3", _set_config(rope_scaling={**LLAMA3_ROPE, "low_freq_factor": 2.0}), {}, "low_freq_factor"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ERRORS))
def test_clear_errors(converted, tmp_path, name):
    case, edit, kwargs, message = ERRORS[name]
    source = _edited_copy(converted, tmp_path, case, edit) if edit else converted / case / "hf"
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(str(source), str(tmp_path / "out"), emit=None, **kwargs)
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_export_errors(converted, tmp_path):
    with pytest.raises(ConversionError, match="no torch_dist checkpoint"):
        convert_megatron_to_hf(str(tmp_path), str(tmp_path / "out"), emit=None)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted / "llama2" / "mg_tp1", ckpt)
    (ckpt / "sampo_model.json").unlink()
    with pytest.raises(ConversionError, match="missing file sampo_model.json"):
        convert_megatron_to_hf(str(ckpt), str(tmp_path / "out"), emit=None)
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert_hf_to_megatron(str(converted / "llama2" / "hf"), str(converted / "llama2" / "mg_tp1"), emit=None)


def test_command_line_reports_errors_without_a_traceback(converted, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(converted / "llama2" / "hf"),
         "--save", str(tmp_path / "out"), "--tensor-model-parallel-size", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot use this parallel layout") and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------- safetensors
def test_streaming_safetensors_io_agrees_with_the_library(tmp_path):
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=gen).to(torch.bfloat16),
        "b": torch.randn(3, generator=gen),
        "c": torch.randint(0, 100, (4, 2, 3), generator=gen),
        "d": torch.randn(5, 4, generator=gen).to(torch.float16),
    }
    save_file(tensors, tmp_path / "lib.safetensors")
    header = read_header(str(tmp_path / "lib.safetensors"))
    for name, tensor in tensors.items():
        assert torch.equal(read_tensor(header[name]), tensor)
    assert torch.equal(read_tensor(header["a"], rows=(2, 6)), tensors["a"][2:6])

    entries = [TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    # "a" comes in row blocks, the others whole.
    produce = lambda e: iter(tensors["a"].split(3)) if e.name == "a" else tensors[e.name]  # noqa: E731
    write_safetensors(str(tmp_path / "ours.safetensors"), entries, produce)
    loaded = load_file(tmp_path / "ours.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
