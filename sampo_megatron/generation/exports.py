"""Prompt sets and output records of the standard evaluators (AlpacaEval, MT-Bench), for
``tools/generate.py --output-format`` (docs/evaluation.md)."""

from __future__ import annotations

import hashlib
import json
import os
import time

from .prompts import read_prompts


def _json_records(path: str) -> list[tuple[str, dict]]:
    """``(where, record)`` of a JSON list file or a JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        return [(f"{path} (record {i})", r) for i, r in enumerate(data)]
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return records


def read_eval_prompts(path: str, output_format: str) -> list[dict]:
    """The prompt records for ``output_format``.

    Returns:
        jsonl: ``{"prompt"}`` per prompt (:func:`~.prompts.read_prompts`'s formats); alpaca_eval:
        ``{"prompt", "instruction", "dataset"?}`` from records with ``instruction`` (AlpacaEval's
        evaluation set) or ``prompt`` (a string); mt_bench: ``{"question_id", "turns"}``.

    Raises:
        FileNotFoundError / ValueError naming the file, record and field.
    """
    if output_format == "jsonl":
        return [{"prompt": p} for p in read_prompts(path)]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {path}")
    records = []
    for where, record in _json_records(path):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        if output_format == "alpaca_eval":
            instruction = record.get("instruction", record.get("prompt"))
            if not isinstance(instruction, str) or not instruction:
                raise ValueError(f"{where}: field 'instruction' (or a string 'prompt') is missing or empty")
            entry = {"prompt": instruction, "instruction": instruction}
            if "dataset" in record:
                entry["dataset"] = record["dataset"]
            records.append(entry)
        elif output_format == "mt_bench":
            turns = record.get("turns")
            if "question_id" not in record:
                raise ValueError(f"{where}: field 'question_id' is missing")
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise ValueError(f"{where}: field 'turns' must be a non-empty list of strings")
            records.append({"question_id": record["question_id"], "turns": turns})
        else:
            raise ValueError(f"unknown output format {output_format!r}")
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def alpaca_eval_records(prompts: list[dict], responses: list[str], generator: str) -> list[dict]:
    """AlpacaEval's model outputs: ``instruction`` and ``output`` strings and the ``generator`` name
    (``dataset`` carried over from the evaluation set when it has one)."""
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        record = {"instruction": prompt["instruction"], "output": response, "generator": generator}
        if "dataset" in prompt:
            record["dataset"] = prompt["dataset"]
        out.append(record)
    return out


def answer_turns(questions: list[dict], respond, decode) -> tuple[list[list[str]], list]:
    """Answer every turn of multi-turn questions: turn ``k`` of each question is asked in the
    conversation so far (its earlier turns and the model's own answers to them), all questions
    that have a turn ``k`` in one call.

    Args:
        questions: ``{"turns": [...]}`` records.
        respond: chat conversations (lists of messages) -> their generations, in order.
        decode: token ids -> text.

    Returns:
        The answers per question and turn, and every generation made (for token counts).
    """
    answers: list[list[str]] = [[] for _ in questions]
    generations = []
    for turn in range(max(len(q["turns"]) for q in questions)):
        asked = [i for i, q in enumerate(questions) if turn < len(q["turns"])]
        conversations = []
        for i in asked:
            messages = []
            for k in range(turn):
                messages += [
                    {"role": "user", "content": questions[i]["turns"][k]},
                    {"role": "assistant", "content": answers[i][k]},
                ]
            conversations.append(messages + [{"role": "user", "content": questions[i]["turns"][turn]}])
        out = respond(conversations)
        for i, g in zip(asked, out):
            answers[i].append(decode(g.response_ids))
        generations += out
    return answers, generations


def mt_bench_records(questions: list[dict], answers: list[list[str]], model_id: str) -> list[dict]:
    """MT-Bench answers as FastChat's ``gen_model_answer`` writes them. ``answer_id`` is derived from
    the model and question (reproducible); ``tstamp`` is the time of writing."""
    now = time.time()
    out = []
    for question, turns in zip(questions, answers, strict=True):
        answer_id = hashlib.sha256(f"{model_id}/{question['question_id']}".encode()).hexdigest()[:22]
        out.append({"question_id": question["question_id"], "answer_id": answer_id, "model_id": model_id,
                    "choices": [{"index": 0, "turns": turns}], "tstamp": now})  # fmt: skip
    return out
