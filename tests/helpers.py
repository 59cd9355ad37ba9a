"""Helpers the tests share: torchrun launches on CPU (gloo), trainer runs and their comparison,
SamPO mask layouts, and random Hugging Face models of every supported family."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from sampo_megatron.losses.debias import DebiasInputs

from pool import RankError, pool

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def torchrun_command(script: Path, nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script), *args]


def torchrun_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra)
    return env


# Variables a pooled job can take (set for the job's duration): test hooks that change numbers, not
# the process (SAMPO_TEST_KILL_BEFORE_MARKER SIGKILLs the rank: a real launch).
POOLED_ENV = {"SAMPO_TEST_NAN_GRAD_AT"}


def run_torchrun(worker: str | Path, nproc: int, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None,
                 launch: bool = False):  # fmt: skip
    """Run ``tests/workers/<worker>`` (or a script path) on ``nproc`` ranks: on the session's
    persistent pool of that size (tests/pool.py), or under a real ``torchrun --standalone``
    launch when the test's subject is the process (``launch=True``: signals, kills, the launcher,
    exit codes) or it needs an environment of its own (``env``, beyond :data:`POOLED_ENV`).

    Returns:
        The combined output (``check=True``: raises AssertionError with its tail when any rank
        fails), or the CompletedProcess when ``check=False`` (from the pool: the ranks' streams
        in rank order, and return code 1 when any rank exited non-zero, as torchrun's).
    """
    script = worker if isinstance(worker, Path) else WORKERS / worker
    usual = torchrun_env()
    extra = {k: v for k, v in (env or {}).items() if usual.get(k) != v}
    if not launch and set(extra) <= POOLED_ENV:
        ranks = pool(nproc)
        results, output = ranks.run("pool:run_script", str(script), list(args), extra, timeout=timeout, raise_errors=False)
        codes = [1 if isinstance(r, RankError) else r for r in results]  # an exception: status 1, as a process
        if not check:
            return subprocess.CompletedProcess([str(script), *args], int(any(codes)), *ranks.last_streams)
        if any(codes):
            raise AssertionError(f"{script.name} x{nproc} (pool) failed, exit codes {codes}:\n{output[-6000:]}")
        return output
    cmd = torchrun_command(script, nproc, *args)
    # Own session + files instead of pipes: a SIGKILLed rank can leave helper processes (megatron's
    # checkpoint writer Manager) that would hold pipes open; the whole session is killed afterwards.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        popen = subprocess.Popen(cmd, env=env or torchrun_env(), cwd=REPO_ROOT, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = popen.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    output = proc.stdout + proc.stderr
    if not check:
        return proc
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script.name} x{nproc} failed ({proc.returncode}):\n{output[-6000:]}")
    return output


class RunsCodeWhenUnpickled:
    """A pickle that runs ``touch PROOF`` when it is unpickled: a checkpoint from elsewhere that
    would run code (the proof file tells whether it did)."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


# ----------------------------------------------------------------------------------- trainer runs
LAUNCH = REPO_ROOT / "launch" / "pretrain_sampo.py"
SHIPPED = REPO_ROOT / "examples" / "data" / "tiny_pairs.jsonl"

# A tiny model; 4 layers so that PP=2 with interleaving (1 layer per virtual stage) is possible.
# Unpacked (--no-pack-sequences), although packing is the default with the local spec: on a model
# this small the per-sequence attention calls of a packed row cost more than the little padding
# they remove (one CI run with packing on: the training tests ran about a third longer than the run
# before, the tests that do not train a fifth). tests/test_packing.py runs packed, and compares
# packed with unpacked.
# Layouts differ only by fp32 summation order. A large learning rate makes the rewards O(0.1-1) (so
# a relative comparison means something), and Adam's eps 1e-3 keeps the update a smooth function of
# the gradient (with eps 1e-8, a parameter whose gradient is ~0 moves by +-lr on its sign alone).
BASE = [
    "--config", str(REPO_ROOT / "examples" / "tiny_cpu.yaml"),
    "--num-layers", "4", "--hidden-size", "64", "--seq-length", "96",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
    "--lr", "0.05", "--adam-eps", "1e-3", "--lr-warmup-fraction", "0", "--length-debias", "sampo", "--log-interval", "1",
    "--save-interval", "1000", "--no-pack-sequences",
]  # fmt: skip

COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards_full/margins", "logps/chosen", "grad_norm")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train(tmp: Path, name: str, nproc: int, *flags: str, env=None, check=True, launch=False, save=False):
    """``launch/pretrain_sampo.py`` with :data:`BASE` and ``flags``, its metrics in
    ``<tmp>/<name>/metrics.jsonl`` (run as :func:`run_torchrun` decides: on the pool unless ``env``
    or ``launch``).

    Args:
        save: ``--save <tmp>/<name>/ckpt``, for a test that reads the checkpoint, resumes, or needs
            the directory (its lock, the reference cache or W&B files under it). Without it the run
            writes no checkpoint (a save costs more than a step of these models).
    """
    run_dir = tmp / name
    metrics = run_dir / "metrics.jsonl"
    # "--save ''": no checkpoint (BASE's config file names one in the repository)
    args = [*BASE, "--save", str(run_dir / "ckpt") if save else "", "--metrics-file", str(metrics), *flags]
    out = run_torchrun(LAUNCH, nproc, *args, env=env, check=check, launch=launch)
    return (read_metrics(metrics) if metrics.exists() else []), out


# A reward is beta x a difference of two sums of ~100 log-probs (|sum| ~ 70 here): fp32 rounding of
# those sums (summation order differs between layouts and micro-batch widths) is ~1e-6 absolute on
# a margin of ~0.1, i.e. ~1e-5 relative, so rewards get an absolute floor of that size.
REWARD_ABS = 3e-6


def assert_same_steps(actual: list[dict], expected: list[dict], rel: float, keys=COMPARED):
    assert [m["iteration"] for m in actual] == [m["iteration"] for m in expected]
    for a, e in zip(actual, expected):
        for key in keys:
            floor = REWARD_ABS if key.startswith("rewards") and rel > 1e-6 else 1e-7
            assert a[key] == pytest.approx(e[key], rel=rel, abs=floor), (a["iteration"], key, a[key], e[key])


def small_dataset(tmp: Path, pairs: int) -> Path:
    path = tmp / f"pairs_{pairs}.jsonl"
    path.write_text("".join(SHIPPED.read_text().splitlines(keepends=True)[:pairs]))
    return path


# ----------------------------------------------------------------------------------- mask layouts
def mask_layout(chosen_lens, rejected_lens, prompt_len=3, pad_to=None):
    """Rows: chosen then rejected; each row is prompt, response, padding."""
    lengths = torch.tensor(list(chosen_lens) + list(rejected_lens))
    seq = pad_to or prompt_len + int(lengths.max()) + 2
    positions = torch.arange(seq)[None, :] - prompt_len
    mask = (positions >= 0) & (positions < lengths[:, None])
    return mask, torch.where(mask, positions, -1), lengths


def debias_inputs(chosen_lens, rejected_lens, sample_ids, *, seed=7, epoch=0, mode="shared", logratios=None):
    mask, index, lengths = mask_layout(chosen_lens, rejected_lens)
    b = len(chosen_lens)
    ids = torch.tensor(sample_ids)
    return DebiasInputs(
        response_mask=mask,
        response_index=index,
        lengths=lengths,
        partner_lengths=torch.cat([lengths[b:], lengths[:b]]),
        sample_ids=torch.cat([ids, ids]),
        roles=torch.tensor([0] * b + [1] * b),
        logratios=logratios,
        seed=seed,
        epoch=epoch,
        sampo_mask=mode,
    )


# ----------------------------------------------------------------------------------- Hugging Face models
TOKENIZER = REPO_ROOT / "examples" / "data" / "tiny_tokenizer"
VOCAB = 300  # padded to 384 for TP=1 and 512 for TP=2 (make_vocab_size_divisible_by 128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip


def hf_configs() -> dict:
    from transformers import GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB)
    return {
        # Llama 3 (GQA, rope_theta 5e5, Llama 3.1 RoPE scaling); config.json rewritten with legacy keys.
        "llama3": LlamaConfig(**small, num_key_value_heads=2, intermediate_size=96, max_position_embeddings=16384,
                              rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}, bos_token_id=1, eos_token_id=2),
        # Llama 2 / Tulu 2: multi-head attention, rope_theta 1e4.
        "llama2": LlamaConfig(**small, num_key_value_heads=4, intermediate_size=96),
        # Qwen2 / Qwen1.5: QKV bias, tied embeddings.
        "qwen2": Qwen2Config(**small, num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True),
        # Mistral: GQA, head_dim 32 != hidden / heads, a sliding window longer than the sequences.
        "mistral": MistralConfig(**small, num_key_value_heads=2, head_dim=32, intermediate_size=96, sliding_window=4096),
        # Pythia: parallel residual, partial rotary, LayerNorm with bias, biases, GELU, untied embed_out.
        "pythia": GPTNeoXConfig(**small, intermediate_size=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.25}),
        # GPT-NeoX with a sequential residual and tanh GELU; config.json rewritten with legacy keys.
        "neox_sequential": GPTNeoXConfig(**small, intermediate_size=128, use_parallel_residual=False, hidden_act="gelu_new",
                                         rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                                                          "partial_rotary_factor": 0.5}),
    }  # fmt: skip


ARCHITECTURES = {"llama3": "LlamaForCausalLM", "llama2": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM", "pythia": "GPTNeoXForCausalLM", "neox_sequential": "GPTNeoXForCausalLM"}  # fmt: skip
CASES = list(ARCHITECTURES)


def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """O(1) activations and logits (the default init is too small for a meaningful comparison)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def write_legacy_config(path: Path, case: str) -> None:
    """Rewrite config.json with the pre-v5 RoPE keys real hub checkpoints carry."""
    config = json.loads(path.read_text())
    params = config.pop("rope_parameters")
    if case == "llama3":
        config["rope_theta"] = params["rope_theta"]
        config["rope_scaling"] = LLAMA3_ROPE
    else:
        config["rotary_emb_base"] = int(params["rope_theta"])
        config["rotary_pct"] = params["partial_rotary_factor"]
    path.write_text(json.dumps(config, indent=2))


def make_hf_model(directory: Path, case: str, config=None, seed: int = 0) -> Path:
    """Save a random model of ``case`` (and the tiny tokenizer) to ``directory``."""
    from transformers import AutoModelForCausalLM

    config = config or hf_configs()[case]
    config.architectures = [ARCHITECTURES[case]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model, seed + 1)
    model.save_pretrained(directory)
    if case in ("llama3", "neox_sequential"):
        write_legacy_config(directory / "config.json", case)
    for f in TOKENIZER.iterdir():
        shutil.copyfile(f, directory / f.name)
    return directory


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


class BackgroundRun:
    """A trainer run under torchrun in the background, in its own session (to signal or kill it
    mid-run): ``<tmp>/<name>/`` holds ``ckpt/`` and ``metrics.jsonl``, ``<tmp>/<name>.log`` its output."""

    def __init__(self, tmp: Path, name: str, nproc: int, *flags: str) -> None:
        self.dir = tmp / name
        self.ckpt, self.metrics, self.log = self.dir / "ckpt", self.dir / "metrics.jsonl", tmp / f"{name}.log"
        args = [*BASE, "--save", str(self.ckpt), "--metrics-file", str(self.metrics), *flags]
        with open(self.log, "w") as log:
            self.launcher = subprocess.Popen(torchrun_command(LAUNCH, nproc, *args), env=torchrun_env(), cwd=REPO_ROOT,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, condition, timeout: float = 300) -> None:
        """Poll ``condition()`` until true; fails with the run's output if the run ends first."""
        deadline = time.time() + timeout
        while not condition():
            assert self.launcher.poll() is None and time.time() < deadline, self.output()[-3000:]
            time.sleep(0.05)

    def marker(self) -> int:
        return int((self.ckpt / "latest_checkpointed_iteration.txt").read_text())

    def kill(self) -> None:
        """SIGKILL the launcher's process group (its ranks have sessions of their own), if alive."""
        if self.launcher.poll() is None:
            os.killpg(self.launcher.pid, signal.SIGKILL)
        self.launcher.wait()


def trainer_pids(needle: str, workers_only: bool = False) -> list[int]:
    """PIDs of processes running pretrain_sampo.py whose command line contains ``needle`` (a run's
    directory); ``workers_only``: the ranks, not their torchrun launcher."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmdline and "pretrain_sampo.py" in cmdline:
                if not (workers_only and ("torch.distributed.run" in cmdline or "torchrun" in cmdline.split(" ")[0])):
                    pids.append(int(entry.name))
    return pids
