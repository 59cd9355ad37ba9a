"""The resolved configuration of a run: written with every checkpoint, compared on resume.

``iter_XXXXXXX/run_config.json`` holds every flag's resolved value (``RunConfig.to_dict()``) and a
few derived facts of the data (pair count, tokenizer fingerprint, a fingerprint of the tokenised
pairs). A resumed run compares them with its own and sorts each difference into:

- **objective** (the loss, its hyper-parameters, the reference's source) and **data** (the pairs,
  their order and the step -> pairs mapping): always an error, naming each field, old and new;
- **schedule** (learning-rate schedule and optimizer hyper-parameters): an error unless
  ``--override-opt-param-scheduler``, which makes the new values take effect;
- **applied**: everything else (layout, precision, logging, intervals, evaluation, paths whose
  contents are unchanged): applied and listed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from ..config import RunConfig
from ..config.schema import TRAINING_SPLIT

RUN_CONFIG_FILE = "run_config.json"
FORMAT = "sampo-run-config"

OBJECTIVE = frozenset({"reference.ref_load", "reference.ref_update"})
"""Objective fields besides every ``loss.*`` field."""
DATA = frozenset({"training.seq_length", "training.seed", "training.global_batch_size", "derived.num_pairs",
                  "derived.data_fingerprint", "derived.tokenizer_fingerprint"})  # fmt: skip
SCHEDULE = frozenset(
    {"training.train_iters", "training.train_epochs"}
    | {f"optimizer.{name}" for name in ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")}
    | {f"schedule.{name}" for name in ("min_lr", "lr_warmup_fraction", "lr_decay_style")}
)


class ConfigChangeError(ValueError):
    """A resumed run changes what the checkpoint's run was computing."""


def data_fingerprint(pairs, samples: int = 256) -> str:
    """A hash of up to ``samples`` evenly spaced tokenised pairs (prompt, chosen, rejected ids) and
    their count: a different data file with the same pairs (moved, re-exported, preprocessed into an
    indexed set) has the same fingerprint; other pairs almost surely do not."""
    sha = hashlib.sha256(str(len(pairs)).encode())
    n = len(pairs)
    for i in sorted({k * n // samples for k in range(min(samples, n))}):
        pair = pairs[i]
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            sha.update(json.dumps([int(t) for t in ids]).encode())
    return sha.hexdigest()[:16]


def resolved_record(cfg: RunConfig, derived: dict) -> dict:
    """What ``run_config.json`` holds."""
    from .. import __version__
    from ..compat.version import installed_megatron_version

    return {
        "format": FORMAT,
        "sampo_megatron": __version__,
        "megatron_core": installed_megatron_version(),
        "config": cfg.to_dict(),
        "derived": derived,
    }


def write_run_config(ckpt_dir: str, record: dict) -> None:
    path = os.path.join(ckpt_dir, RUN_CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def read_run_config(ckpt_dir: str) -> dict | None:
    path = os.path.join(ckpt_dir, RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _section(section: str, name: str) -> str:
    """The section of a saved field now: a ``run_config.json`` written before the training flags were
    split into sections (optimizer, schedule, precision, recompute, operations) has them under training."""
    return TRAINING_SPLIT.get(name, section) if section == "training" else section


def _flatten(record: dict) -> dict[str, object]:
    flat = {
        f"{_section(section, name)}.{name}": value for section, fields in record["config"].items() for name, value in fields.items()
    }
    flat.update({f"derived.{name}": value for name, value in record.get("derived", {}).items()})
    return flat


def _normalise(value):
    return json.loads(json.dumps(value, default=str))  # tuples -> lists, as read back from the file


@dataclass
class ConfigChanges:
    """Differences between a checkpoint's run and this one: ``(field, old, new)``."""

    objective: list = field(default_factory=list)
    data: list = field(default_factory=list)
    schedule: list = field(default_factory=list)
    applied: list = field(default_factory=list)


def compare(saved: dict, current: dict) -> ConfigChanges:
    """Sort the differences between two :func:`resolved_record` s (see the module docstring)."""
    old, new = _flatten(saved), _flatten(_normalise(current))
    defaults = _flatten(_normalise({"config": RunConfig().to_dict()}))
    changes = ConfigChanges()
    for name in sorted(set(old) | set(new)):
        if name not in new:
            continue  # a field this version no longer has
        if name not in old and name in defaults and new[name] == defaults[name]:
            continue  # a field added since the checkpoint was written, left at its default
        before, after = old.get(name, "<absent>"), new[name]
        if before == after:
            continue
        if name.startswith("loss.") or name in OBJECTIVE:
            bucket = changes.objective
        elif name in DATA:
            bucket = changes.data
        elif name in SCHEDULE:
            bucket = changes.schedule
        else:
            bucket = changes.applied
        bucket.append((name, before, after))
    return changes


def _describe(name: str, before, after) -> str:
    section, field_name = name.split(".", 1)
    label = field_name if section == "derived" else "--" + field_name.replace("_", "-")
    return f"{label}: {before!r} in the checkpoint, {after!r} now"


def check_resume(saved: dict | None, current: dict, ckpt: str, override_schedule: bool) -> list[str]:
    """Refuse a resume that changes the objective, the data, or (without ``override_schedule``) the
    schedule; return the lines that say what else changed (and what the override applied).

    Raises:
        ConfigChangeError: naming every refused change, old and new value.
    """
    if saved is None:
        return [f"{ckpt} has no {RUN_CONFIG_FILE} (saved by an older version): changes to the run cannot be checked"]
    changes = compare(saved, current)
    refused = [("objective", changes.objective), ("data", changes.data)]
    if not override_schedule:
        refused.append(("schedule", changes.schedule))
    lines = [f"  {kind}: {_describe(*change)}" for kind, group in refused for change in group]
    if lines:
        hint = (
            "A resumed run continues the checkpoint's run: start a new run with another --save (and --load "
            f"{ckpt} --finetune to start from its weights)"
        )
        if changes.schedule and not override_schedule:
            hint += ", or pass --override-opt-param-scheduler to continue with the new schedule"
        raise ConfigChangeError(
            f"resuming {ckpt} with changes that would silently alter the run:\n" + "\n".join(lines) + f"\n{hint}."
        )
    notes = [f"  schedule (--override-opt-param-scheduler): {_describe(*c)}" for c in changes.schedule if override_schedule]
    notes += [f"  applied: {_describe(*c)}" for c in changes.applied]
    return ([f"resuming {ckpt} with these changes:"] + notes) if notes else []


def format_config(cfg: RunConfig) -> str:
    """The resolved configuration, one line per section (printed at start-up)."""
    lines = ["resolved configuration:"]
    for section, values in cfg.to_dict().items():
        lines.append(f"  {section}: " + " ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(lines)
