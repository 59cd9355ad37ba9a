"""The reference log-prob cache across runs: tools/precompute_reference.py builds it without
training, a run at another layout reads it (same losses as a replica run), and a run over other
data or with another tokenizer refuses it, naming what changed (training/reference_cache.py)."""

from __future__ import annotations

import json

import pytest

from sampo_megatron.training.reference import with_progress
from sampo_megatron.training.reference_cache import CacheMismatchError, ReferenceCache, describe_mismatch

from helpers import BASE, REPO_ROOT, SHIPPED, TOKENIZER, assert_same_steps, run_torchrun, train

PRECOMPUTE = REPO_ROOT / "tools" / "precompute_reference.py"
TP2 = ["--tensor-model-parallel-size", "2"]


def test_a_cache_of_another_run_is_refused_with_what_changed(tmp_path):
    cache = ReferenceCache(str(tmp_path), num_pairs=4, seq_length=8)
    ours = {"pairs": "aa", "num_pairs": 4, "tokenizer": "t1", "seq_length": 8, "reference": "init:seed=1"}
    assert not cache.is_complete(0, ours)  # nothing there yet
    (tmp_path / "ref_logps_v0.npy").write_bytes(b"")
    (tmp_path / "ref_logps_v0.json").write_text(json.dumps({"shape": [4, 2, 8], "version": 0, "fingerprint": ours}))
    assert cache.is_complete(0, ours)
    theirs = {**ours, "tokenizer": "t2", "seq_length": 16}
    with pytest.raises(CacheMismatchError, match=r"changed: --seq-length: 8 -> 16; the tokenizer \(--tokenizer-model\): 't1' -> 't2'"):
        cache.is_complete(0, theirs)
    assert "has no fingerprint" in describe_mismatch("x.npy", None, ours)


def test_the_cache_computation_shows_its_progress():
    lines = []
    assert list(with_progress(iter("abcd"), 4, lines.append, every_s=0.0)) == list("abcd")
    assert lines[0].startswith("reference cache: 1/4 steps (25%), ETA 0:00:0") and len(lines) == 4
    assert lines[-1].startswith("reference cache: 4 steps in 0:00:0")


@pytest.mark.multiprocess
def test_precomputed_cache_serves_another_layout_and_refuses_other_data_or_tokenizer(tmp_path):
    cache = tmp_path / "shared_cache"
    flags = ["--ref-mode", "cache", "--ref-cache-dir", str(cache)]
    out = run_torchrun(PRECOMPUTE, 1, *BASE, "--tensor-model-parallel-size", "1", "--ref-cache-dir", str(cache),
                       "--save", str(tmp_path / "pre"))  # fmt: skip
    assert "reference cache complete" in out and (cache / "ref_logps_v0.json").exists()
    assert "reference cache: 32 steps in" in out  # the epoch: 256 pairs at 8 per step
    assert not (tmp_path / "pre" / "latest_checkpointed_iteration.txt").exists()  # nothing trained

    replica, _ = train(tmp_path, "replica", 2, *TP2)
    cached, out = train(tmp_path, "cached", 2, *TP2, *flags)
    assert "computing reference log-probs" not in out  # read, not recomputed
    assert_same_steps(cached, replica, rel=1e-5)

    # one pair's chosen response changed: its tokens (and so the data hash) differ
    lines = SHIPPED.read_text().splitlines(keepends=True)
    record = json.loads(lines[5])
    record["chosen"] = record["chosen"] + " and more"
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(lines[:5] + [json.dumps(record) + "\n"] + lines[6:]))
    proc = train(tmp_path, "changed_data", 2, *TP2, *flags, "--data-path", str(changed), check=False)[1]
    assert proc.returncode != 0
    assert "error: reference cache" in proc.stderr and "changed: the tokenised pairs" in proc.stderr, proc.stderr[-2000:]
    # one line, from rank 0, and no rank's traceback (torchrun adds its own banner for the failed ranks)
    assert proc.stderr.count("error: reference cache") == 1 and "sampo_megatron/training" not in proc.stderr

    # the tokenizer gains a word: the same ids for this data, but another tokenizer
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for f in TOKENIZER.iterdir():
        (tokenizer / f.name).write_text(f.read_text())
    spec = json.loads((tokenizer / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zzz-new-word"] = max(spec["model"]["vocab"].values()) + 1
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    proc = train(tmp_path, "changed_tokenizer", 2, *TP2, *flags, "--tokenizer-model", str(tokenizer), check=False)[1]
    assert proc.returncode != 0
    # (its vocabulary grew, so the randomly initialised reference's architecture changed too)
    assert "the tokenizer (--tokenizer-model): '" in proc.stderr and "the tokenised pairs" not in proc.stderr, proc.stderr[-2000:]
