"""Length report of a generations file, and its difference from a second one (``sampo-length-report``).

    python tools/length_report.py runs/sampo/generations.jsonl [--against runs/sft/generations.jsonl]

Reads what ``tools/generate.py`` writes (JSONL: ``prompt``, ``response``, ``num_tokens``,
``stopped_at_eos``), the verbosity monitor's ``--eval-output`` (the same plus ``iteration``: the last
iteration unless ``--iteration``), or an AlpacaEval model-outputs JSON list (``instruction``,
``output``; token counts need ``--tokenizer-model``). Prints the mean, spread, percentiles and EOS
share; with ``--against``, the mean difference (this file minus the other) with a 95% bootstrap
interval, paired by prompt when both files answer the same prompts in the same order. The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from ..evaluation import length_difference, length_stats


class GenerationsFileError(ValueError):
    """A generations file that cannot be read; the message names the file and line."""


@dataclass
class Generations:
    prompts: list
    lengths: list[int]
    stopped_at_eos: list[bool] | None


def _records(path: str) -> list[tuple[int, dict]]:
    """``(line, record)`` pairs of a JSONL file, or of a JSON list (line 0: the file as a whole)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise GenerationsFileError(f"{path}: {err.strerror}") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise GenerationsFileError(f"{path}: not valid JSON: {err.msg} (line {err.lineno})") from None
        return [(0, record) for record in data]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise GenerationsFileError(f"{path}:{number}: not valid JSON: {err.msg}") from None
    return records


def read_generations(path: str, iteration: int | None = None, tokenizer=None) -> Generations:
    """The responses of one generations file (see the module docstring for the formats)."""
    records = _records(path)
    if not records:
        raise GenerationsFileError(f"{path}: no responses")
    for number, record in records:
        if not isinstance(record, dict):
            raise GenerationsFileError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    iterations = sorted({r["iteration"] for _, r in records if "iteration" in r})
    if iteration is not None and iteration not in iterations:
        raise GenerationsFileError(f"{path}: no responses of iteration {iteration} (it has {iterations or 'none'})")
    if iterations:
        chosen = iterations[-1] if iteration is None else iteration
        records = [(n, r) for n, r in records if r.get("iteration") == chosen]
        records.sort(key=lambda item: item[1].get("index", 0))
    prompts, lengths, eos = [], [], []
    for number, record in records:
        where = f"{path}:{number}" if number else f"{path} (record {len(lengths)})"
        prompts.append(record.get("prompt", record.get("instruction")))
        if "num_tokens" in record:
            if not isinstance(record["num_tokens"], int) or record["num_tokens"] < 0:
                raise GenerationsFileError(f"{where}: num_tokens must be a count, got {record['num_tokens']!r}")
            lengths.append(record["num_tokens"])
        else:
            text = record.get("response", record.get("output"))
            if not isinstance(text, str):
                raise GenerationsFileError(f"{where}: needs num_tokens, or a response / output text")
            if tokenizer is None:
                raise GenerationsFileError(f"{where}: no num_tokens; give --tokenizer-model to count the tokens of the text")
            lengths.append(len(tokenizer.encode(text)))
        eos.append(record.get("stopped_at_eos"))
    has_eos = all(isinstance(value, bool) for value in eos)
    return Generations(prompts, lengths, eos if has_eos else None)


def _format(name: str, stats) -> list[str]:
    p = stats.percentiles
    lines = [
        f"{name}: {stats.count} responses",
        f"  mean {stats.mean:.2f} tokens (sd {stats.std:.2f}), median {stats.median:g}, min {stats.minimum}, max {stats.maximum}",
        "  percentiles " + ", ".join(f"{k} {v:g}" for k, v in p.items()),
    ]
    if stats.eos_share is not None:
        lines.append(f"  ended with EOS: {100 * stats.eos_share:.1f}% (the rest hit the token limit)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("generations", help="generations file (JSONL from tools/generate.py or --eval-output, or AlpacaEval JSON)")
    p.add_argument("--against", default=None, help="a second file: report the mean difference (first minus this one)")
    p.add_argument("--iteration", type=int, default=None, help="the monitor iteration to read (default: the last)")
    p.add_argument("--tokenizer-model", default=None, help="count tokens of texts that carry no num_tokens")
    p.add_argument("--tokenizer-type", default="auto", help="as launch/pretrain_sampo.py's --tokenizer-type")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tokenizer = None
    if args.tokenizer_model:
        from ..data import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type)
    try:
        this = read_generations(args.generations, args.iteration, tokenizer)
        other = read_generations(args.against, args.iteration, tokenizer) if args.against else None
    except GenerationsFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    stats = length_stats(this.lengths, this.stopped_at_eos)
    report = {"file": args.generations, **stats.to_dict()}
    lines = _format(args.generations, stats)
    if other is not None:
        other_stats = length_stats(other.lengths, other.stopped_at_eos)
        paired = len(this.prompts) == len(other.prompts) and None not in this.prompts and this.prompts == other.prompts
        diff = length_difference(this.lengths, other.lengths, paired=paired)
        lines += _format(args.against, other_stats)
        relative = "" if diff["relative"] is None else f" ({100 * diff['relative']:+.1f}%)"
        lines.append(f"difference in mean length: {diff['difference']:+.2f} tokens{relative}, 95% interval "
                     f"[{diff['low']:+.2f}, {diff['high']:+.2f}] ({'paired by prompt' if paired else 'unpaired'} bootstrap)")  # fmt: skip
        report["against"] = {"file": args.against, **other_stats.to_dict()}
        report["difference"] = diff
    print("\n".join(lines))
    print(json.dumps(report))
    return 0
