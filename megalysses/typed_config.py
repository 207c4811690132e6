"""Typed config dicts: plain dicts (from YAML, overrides) checked against dataclass type hints and built into the
dataclasses, with errors that name the file, the dotted key, what was expected and the nearest valid key; and the
keys earlier versions wrote, upgraded with a warning."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import warnings
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from megalysses.parallel.layout import ParallelLayout


class ConfigError(ValueError):
    """An invalid configuration: the message starts with the file (or override) and the dotted key."""


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # YAML 1.1 reads '3e-4' as a string


@functools.lru_cache(maxsize=None)
def field_hints(cls) -> dict[str, Any]:
    """Type hints of the constructor fields of a dataclass, in declaration order."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def _where(path: str, key: str) -> str:
    return f"{path}: {key}" if key else path


def unknown_key(path: str, dotted: str, name: Any, valid: Sequence[str]) -> ConfigError:
    near = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"{path}: {dotted}: unknown key {str(name)!r}; {hint}")


def type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is bool:
        return "bool (true or false)"
    return getattr(tp, "__name__", str(tp))


def wrong_type(tp: Any, value: Any, path: str, key: str) -> ConfigError:
    shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
    return ConfigError(f"{_where(path, key)}: expected {type_name(tp)}, got {shown}")


def optional_inner(tp: Any) -> Any:
    """X for Optional[X], else tp itself."""
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def convert_value(tp: Any, value: Any, path: str, key: str) -> Any:
    """Check value against the type hint tp (and convert: int -> float, mapping -> dataclass)."""
    origin = get_origin(tp)
    if origin is Union:
        if value is None and type(None) in get_args(tp):
            return None
        inner = optional_inner(tp)
        if inner is tp:  # a union of several types (e.g. int or 'auto'): the first that takes the value
            for member in get_args(tp):
                try:
                    return convert_value(member, value, path, key)
                except ConfigError:
                    continue
            raise wrong_type(tp, value, path, key)
        try:
            return convert_value(inner, value, path, key)
        except ConfigError as e:
            if isinstance(value, (dict, list)):
                raise  # an error inside the mapping or list: keep its precise message
            raise wrong_type(tp, value, path, key) from e
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path, key)
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in get_args(tp)):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = get_args(tp) or (Any,)
            return [convert_value(item, v, path, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is Any:
        return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp} at {key}")
    raise wrong_type(tp, value, path, key)


LEGACY_KEYS: dict[type, dict[str, Optional[str]]] = {
    ParallelLayout: {"sequence_parallel": "tp_sequence_parallel", "micro_batches": None},
}
"""Keys that configs (and the config.yaml inside checkpoints) written by earlier versions may hold: old name -> new
name, or None for a key that nothing read (the micro-batch count is train.global_batch_size / (micro_batch_size * dp))."""


def _upgrade_legacy(cls, data: dict, path: str, key: str) -> dict:
    """Rename (or drop) the keys of LEGACY_KEYS in a section, with a warning naming the new key."""
    legacy = LEGACY_KEYS.get(cls, {})
    if not legacy.keys() & data.keys():
        return data
    data = dict(data)
    for old, new in legacy.items():
        if old not in data:
            continue
        value = data.pop(old)
        if new is None:
            if value is not None:
                warnings.warn(f"{_where(path, _join(key, old))}: no longer a key and ignored (it was never read)",
                              stacklevel=2)
        elif new in data:
            raise ConfigError(f"{_where(path, _join(key, old))}: renamed {_join(key, new)!r}, which is also set: "
                              f"keep only {new!r}")
        else:
            warnings.warn(f"{_where(path, _join(key, old))}: renamed {_join(key, new)!r}; read as that", stacklevel=2)
            data[new] = value
    return data


def build_dataclass(cls, data: Any, path: str, key: str, origins: Optional[dict[str, str]] = None):
    if isinstance(data, cls):
        return data
    if data is None:  # an empty section (`train:`) means all defaults
        data = {}
    if not isinstance(data, dict):
        raise wrong_type(cls, data, path, key)
    data = _upgrade_legacy(cls, data, path, key)
    hints = field_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _join(key, name)
        if name not in hints:
            raise unknown_key(path, sub, name, list(hints))
        kwargs[name] = convert_value(hints[name], value, (origins or {}).get(name, path), sub)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_where(path, key)}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # LayoutError, ModelConfigError, ConfigError raised by __post_init__
        raise ConfigError(f"{_where(path, key)}: {e}") from e


def from_dict(cls, data: dict, path: str = "<dict>", key: str = ""):
    """Build dataclass cls (and nested dataclasses) from a plain dict, type-checked against its type hints.

    path names where the dict came from (a file); key is the dotted prefix of data inside it ('' at top level).
    Raises ConfigError naming path, the dotted key and what is wrong.
    """
    return build_dataclass(cls, data, path, key)


def to_dict(cfg) -> dict:
    """A config dataclass as nested plain dicts/lists (what from_dict takes back)."""
    return dataclasses.asdict(cfg)


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows its annotation), by name."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_keys(cfg, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, value, docstring) for every leaf key of a config dataclass, sections in order."""
    out = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(describe_keys(value, key))
        else:
            out.append((key, value, docs.get(f.name, "")))
    return out
