"""Plain mappings <-> typed dataclasses, the machinery under the run config (engine/config.py).

Strict building: every key must be a field (an unknown one names the nearest valid key), every
value must have the field's type. `key.sub=value` overrides are read as YAML and applied to the
mapping before it is built. The string literal under each dataclass field is its documentation
(the litgpt convention): field_docs reads it, dataclass_help lists every key with it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """The run config is invalid. The message names the offending key."""


# ----------------------------------------------------------------------------------------------
# dict -> dataclass, strictly typed


def build_dataclass(cls: type, data: Any, key: str) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        full = f"{key}.{k}" if key else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(key + '.' if key else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[k] = _coerce(hints[k], v, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X], or X | list[X] (a value or a list of them)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        lists = [a for a in inner if typing.get_origin(a) is list]
        scalars = [a for a in inner if typing.get_origin(a) is not list]
        chosen = lists[0] if isinstance(value, list) and lists else (scalars or inner)[0]
        return _coerce(chosen, value, key)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# YAML + overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). The value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def _apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        m = _index_part(part)
        if m is not None:  # sources[1]
            name, idx = m
            seq = node.setdefault(name, [])
            if not isinstance(seq, list) or idx >= len(seq):
                raise ConfigError(f"override {'.'.join(path)}: {name}[{idx}] does not exist")
            node = seq[idx]
        else:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = nxt
    node[path[-1]] = value


def _index_part(part: str) -> Optional[tuple[str, int]]:
    if part.endswith("]") and "[" in part:
        name, idx = part[:-1].split("[", 1)
        if idx.isdigit():
            return name, int(idx)
    return None


def read_tree(path: Optional[str | Path], overrides: list[str] = ()) -> dict:
    """The mapping of a YAML file (empty without one) with `key.sub=value` overrides applied."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(tree, keys, value)
    return tree


# ----------------------------------------------------------------------------------------------
# field docs -> help text


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the litgpt convention)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def dataclass_help(cls: type, prefix: str = "") -> str:
    """Every config key with its default and documentation, one per line."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}:  {(tp.__doc__ or '').strip()}")
            lines.append(dataclass_help(tp, key + "."))
            continue
        if typing.get_origin(tp) is list and inner:
            lines.append(f"{key}: list of  {docs.get(f.name, '')}")
            lines.append(dataclass_help(inner[0], key + "[i]."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        lines.append(f"{key} = {default!r}  {docs.get(f.name, '')}")
    return "\n".join(lines)
