"""The configuration's command line and ``--config`` YAML files (Megatron-style flags).

Every field of the schema (config/schema.py) is a flag; ``--config FILE.yaml`` takes the same names
as keys (dashes or underscores), and flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Literal

from .schema import SECTION_TYPES, SHARED_FIELDS, RunConfig


def _choices() -> dict[str, list[str]]:
    """Each choice field's values: its ``Literal`` type, or (losses) the registries' names (losses/names.py)."""
    from ..losses.names import LENGTH_DEBIAS, LOSS_TYPES

    choices = {"loss_type": sorted(LOSS_TYPES), "length_debias": sorted(LENGTH_DEBIAS)}
    for factory in SECTION_TYPES.values():
        for f in dataclasses.fields(factory):
            hint = typing.get_type_hints(factory)[f.name]
            literal = [a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is Literal]
            if literal and f.name not in choices:
                choices[f.name] = list(typing.get_args(literal[0]))
    return choices


def _attribute_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (what torchtitan calls attribute docstrings)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _field_type(cls, name: str):
    """The value type of a field: ``int`` for ``int | None``, ``str`` for a ``Literal`` of strings."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is not Literal else [hint]
    hint = args[0] if args else hint
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    return hint


def _flag_fields():
    """(section, field name, type, help) for every flag."""
    for section, factory in SECTION_TYPES.items():
        docs = _attribute_docs(factory)
        for f in dataclasses.fields(factory):
            if (section, f.name) in SHARED_FIELDS:
                continue
            yield section, f.name, _field_type(factory, f.name), docs.get(f.name, "")


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return "not set" if value is None else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="SamPO / DPO preference training on megatron-core",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file whose keys are these flags' names")
    groups: dict[str, argparse._ArgumentGroup] = {}
    choices = _choices()
    defaults = {(section, f.name): _default(f) for section, factory in SECTION_TYPES.items() for f in dataclasses.fields(factory)}
    for section, name, ftype, doc in _flag_fields():
        group = groups.setdefault(section, parser.add_argument_group(section))
        flag = "--" + name.replace("_", "-")
        # argument_default=SUPPRESS (so that a --config file's keys are not overridden by defaults)
        # hides argparse's own "(default: ...)": the dataclass default is written into the help.
        doc = f"{doc} (default: {defaults[section, name]})"
        if ftype is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=doc)
        else:
            options = choices.get(name)
            metavar = "{" + ",".join(options) + "}" if options else ftype.__name__.upper()
            group.add_argument(flag, dest=name, type=ftype, choices=options, metavar=metavar, help=doc)
    return parser


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be read, a key with a wrong name, type or value, or a value
    (from the file or a flag) that its section rejects."""


def _load_yaml(path: str) -> tuple[dict, dict[str, int]]:
    """The file's keys (dashes as underscores) and the line of each key."""
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = Path(path).read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigFileError(f"{path}: not valid YAML: {problem}{line}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of flag names to values")
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value).replace("-", "_")] = key_node.start_mark.line + 1
    return {str(k).replace("-", "_"): v for k, v in data.items()}, lines


def _typed_value(path: str, line: str, key: str, value, ftype, choices: list | None):
    """``value`` as the field's type, or a ConfigFileError that says what YAML read and why it fails
    (``path: message (line N)``)."""
    if value is None:
        return None
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif ftype is float and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # YAML 1.1 reads 1e-6 (no dot) as a string
            example = f"{float(value):.1e}".replace("e-0", "e-").replace("e+0", "e+")
            raise ConfigFileError(f"{path}: {key} must be float; YAML reads {value!r} as a string: write it with a dot, "
                                  f"e.g. {example}{line}")  # fmt: skip
    if isinstance(value, bool) and ftype is not bool:  # YAML's true is an int to Python; never a number here
        raise ConfigFileError(f"{path}: {key} must be {ftype.__name__}, got {value!r}{line}")
    if not isinstance(value, ftype):
        raise ConfigFileError(f"{path}: {key} must be {ftype.__name__}, got {value!r}{line}")
    if choices is not None and value not in choices:
        raise ConfigFileError(f"{path}: {key} must be one of {choices}, got {value!r}{line}")
    return value


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from ``--config FILE.yaml`` and command-line flags (flags win).

    Raises:
        ConfigFileError: the YAML file is malformed, or a key is unknown or has a wrong type or value
            (the message names file, line and key).
    """
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    values: dict = {}
    config_path = given.pop("config", None)
    known = {name: (section, ftype) for section, name, ftype, _ in _flag_fields()}
    choices = _choices()
    if config_path:
        data, lines = _load_yaml(config_path)
        for key, value in data.items():
            line = f" (line {lines[key]})" if key in lines else ""
            if key not in known:
                raise ConfigFileError(f"{config_path}: unknown key {key!r}, not a flag of pretrain_sampo.py{line}")
            values[key] = _typed_value(config_path, line, key, value, known[key][1], choices.get(key))
    values.update(given)

    sections = {section: {} for section in SECTION_TYPES}
    for key, value in values.items():
        sections[known[key][0]][key] = value
    for (section, name), (src_section, src_name) in SHARED_FIELDS.items():
        if src_name in sections[src_section]:
            sections[section][name] = sections[src_section][src_name]
    try:  # a section's own checks (LossConfig's ranges and combinations)
        built = {section: SECTION_TYPES[section](**kw) for section, kw in sections.items()}
    except ValueError as err:  # one problem: one line; several (LossConfigError): one line each, as validation.py lists them
        problems = getattr(err, "problems", [str(err)])
        listed = f" {problems[0]}" if len(problems) == 1 else "".join(f"\n  - {x}" for x in problems)
        raise ConfigFileError(f"invalid configuration:{listed}") from None
    return RunConfig(**built, explicit_flags=frozenset(values))
