"""Writes the study's data and tokenizer (``python examples/length_bias/assets.py --out-dir DIR``).

    DIR/tokenizer/           word-level Hugging Face tokenizer of the task's words
    DIR/sft.jsonl            SFT warm-up examples (prompt, chosen; rejected unused)
    DIR/pairs_all.jsonl      preference pairs, chosen longer in --long-chosen-share of them
    DIR/pairs_long.jsonl     pairs whose chosen response is the longer one (the paper's "long" subset)
    DIR/pairs_short.jsonl    pairs whose chosen response is the shorter one ("short" subset)
    DIR/heldout.jsonl        held-out pairs for the monitor's implicit rewards (same share as pairs_all)
    DIR/eval_prompts.jsonl   held-out prompts, each --samples-per-prompt times (sampled generations)

Held-out pairs and prompts ask for no list (as a multiset) that the SFT or preference data asks for.
"""

from __future__ import annotations

import argparse
import json
import os

from sampo_megatron.data.wordlevel import save_hf_dir, train_tokenizer

import task  # this script's directory is on the path (python examples/length_bias/assets.py; pytest's pythonpath)


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_assets(out_dir: str, seed: int = 0, long_chosen_share: float = 0.7, num_pairs: int = 1024,
                 num_sft: int = 4096, num_heldout: int = 256, num_eval_prompts: int = 100,
                 samples_per_prompt: int = 2) -> dict[str, str]:
    """Write every file of the study into ``out_dir``; returns name -> path."""
    if not 0.0 <= long_chosen_share <= 1.0:
        raise ValueError(f"--long-chosen-share must be in [0, 1], got {long_chosen_share}")
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name + ".jsonl") for name in
             ("sft", "pairs_all", "pairs_long", "pairs_short", "heldout", "eval_prompts")}  # fmt: skip
    records = {
        "sft": task.sft_records(seed, num_sft),
        "pairs_all": task.preference_records(seed + 1, num_pairs, long_chosen_share),
        "pairs_long": task.preference_records(seed + 2, num_pairs, 1.0),
        "pairs_short": task.preference_records(seed + 3, num_pairs, 0.0),
    }
    # Held out means unseen: no list (in any order) that any training file asks for.
    seen = frozenset(task.list_key(r["prompt"]) for recs in records.values() for r in recs)
    records["heldout"] = task.preference_records(seed + 4, num_heldout, long_chosen_share, exclude=seen)
    records["eval_prompts"] = [{"prompt": p} for p in task.eval_prompts(seed + 5, num_eval_prompts, exclude=seen)
                               for _ in range(samples_per_prompt)]  # fmt: skip
    tokenizer = train_tokenizer(task.vocabulary_lines())
    unk = tokenizer.token_to_id("<unk>")
    for name, recs in records.items():
        for record in recs:
            for text in record.values():
                if unk in tokenizer.encode(text).ids:
                    raise AssertionError(f"{name}: out-of-vocabulary word in {text!r}")
        _write_jsonl(paths[name], recs)
    paths["tokenizer"] = os.path.join(out_dir, "tokenizer")
    save_hf_dir(tokenizer, paths["tokenizer"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the length-bias study's data and tokenizer")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-chosen-share", type=float, default=0.7, help="share of pairs_all whose chosen response is longer")
    args = parser.parse_args()
    paths = write_assets(args.out_dir, args.seed, args.long_chosen_share)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
