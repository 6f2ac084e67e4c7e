"""Settings declared once: a run's config is a dataclass whose fields say their default, help and
valid values, and everything else derives from that declaration.

    @dataclass
    class MyConfig(Settings):
        lr: float = setting(3e-4, "peak learning rate", min=0.0, min_inclusive=False)
        device: str = setting("auto", "auto, cuda, xpu, npu, mps or cpu", resumable=True)

- :func:`add_arguments` makes the command-line flags (``--lr``; type from the annotation, booleans
  as ``--x/--no-x``, the default appended to the help), and only flags the user gave reach the
  parsed namespace, so ``--resume`` can tell a given value from a default (:func:`given`);
- :meth:`Settings.to_dict` / :meth:`Settings.from_dict` / :meth:`Settings.save` / :meth:`Settings.load`
  are the JSON form; an unknown key or a bad value is a :class:`ConfigError` naming the key (and the
  file, when read from one);
- :meth:`Settings.check_settings` checks each field's range and choices (a config's own
  ``__post_init__`` adds the checks that involve several fields);
- :func:`resumable` lists the fields a resumed run may change (they do not alter steps already taken).

This module imports no torch, so building the CLI parser stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

from .errors import ConfigError

_NO_FLAG = "-"


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
            min: float | None = None, max: float | None = None, min_inclusive: bool = True,
            flag: str | None = None, resumable: bool = False, metavar: str | None = None,
            default_factory: Any = dataclasses.MISSING, cli: bool = True) -> Any:
    """A dataclass field with its help and valid values. ``min``/``max`` bound numbers (``None`` and
    each element of a list or tuple are checked); ``flag`` renames the CLI flag (default
    ``--field-name``); ``cli=False`` keeps the field out of the command line; ``resumable`` lets
    ``--resume`` change it."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_inclusive": min_inclusive,
            "flag": flag if cli else _NO_FLAG, "resumable": resumable, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, float)) and not isinstance(x, bool)


def _plain_type(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation such as ``int | None`` or ``list[str]``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _check_value(name: str, value: Any, annotation: Any, meta: dict) -> str | None:
    """Why ``value`` is not valid for the field, or ``None``."""
    kind, optional = _plain_type(annotation)
    if value is None:
        return None if optional else "must be given (it cannot be null)"
    origin = typing.get_origin(kind)
    items = list(value) if origin in (list, tuple) and isinstance(value, (list, tuple)) else [value]
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        return f"must be a list, got {value!r}"
    base = typing.get_args(kind)[0] if origin in (list, tuple) else kind
    for item in items:
        if base is bool and not isinstance(item, bool):
            return f"must be true or false, got {item!r}"
        if base is int and not _is_int(item):
            return f"must be an integer, got {item!r}"
        if base is float and not (_is_number(item) and math.isfinite(item)):
            return f"must be a finite number, got {item!r}"
        if base is str and not isinstance(item, str):
            return f"must be a string, got {item!r}"
        if meta.get("choices") is not None and item not in meta["choices"]:
            return f"must be one of {', '.join(map(str, meta['choices']))}, got {item!r}"
        low, high = meta.get("min"), meta.get("max")
        if low is not None and (item < low or (item == low and not meta.get("min_inclusive", True))):
            return f"must be {'>=' if meta.get('min_inclusive', True) else '>'} {low:g}, got {item!r}"
        if high is not None and item > high:
            return f"must be <= {high:g}, got {item!r}"
    return None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Settings:
    """Base of every run config: JSON form, range checks and CLI flags from the field declarations."""

    def check_settings(self) -> None:
        """Every field's type, range and choices (:class:`ConfigError` naming the first bad one)."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Settings):
                value.check_settings()
                continue
            why = _check_value(f.name, value, hints[f.name], dict(f.metadata))
            if why is not None:
                raise ConfigError(f"{type(self).__name__}.{f.name} {why}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (tuples as lists, nested settings as objects)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Settings) else (
                list(value) if isinstance(value, tuple) else value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None):
        """Build from the JSON form; unknown keys and bad values are :class:`ConfigError`\\ s that
        name the key and ``source`` (the file)."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}expected a JSON object for {cls.__name__}, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{where}unknown {cls.__name__} key(s) {', '.join(map(repr, unknown))} "
                              f"(known: {', '.join(fields)})")
        hints = _hints(cls)
        values = {}
        for name, value in data.items():
            kind = hints[name]
            if isinstance(kind, type) and issubclass(kind, Settings):
                value = value if isinstance(value, kind) else kind.from_dict(value, f"{where}{name}".rstrip(": "))
            elif typing.get_origin(_plain_type(kind)[0]) is tuple and isinstance(value, list):
                value = tuple(value)
            values[name] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}{cls.__name__}: {exc}") from None

    def save(self, path: str | Path) -> None:
        """Write the JSON form to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path):
        """Read ``path`` (errors name it)."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {cls.__name__} from {path}: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def differences(self, other: "Settings") -> dict[str, tuple[Any, Any]]:
        """``{field: (self value, other value)}`` for the fields that differ (nested settings as one field)."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def resumable(cls: type) -> frozenset[str]:
    """The fields of ``cls`` that ``--resume`` may change."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable"))


def flag_of(f: dataclasses.Field) -> str | None:
    """The CLI flag of field ``f`` (``None``: not on the command line)."""
    flag = f.metadata.get("flag")
    if flag == _NO_FLAG:
        return None
    return flag or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, only: tuple[str, ...] | None = None,
                  exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add a flag for each field of ``cls`` (those in ``only`` when given, none in ``exclude``) to
    ``parser`` (a parser or argument group). The help ends with the default (``defaults`` overrides
    the dataclass's, e.g. a stage's own); unset flags stay out of the namespace (see :func:`given`)."""
    hints = _hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        flag = flag_of(f)
        if flag is None or f.name in exclude or (only is not None and f.name not in only):
            continue
        meta = f.metadata
        kind, _ = _plain_type(hints[f.name])
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        shown = "unset" if default is None else (" ".join(map(str, default)) if isinstance(default, (list, tuple))
                                                 else str(default))
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{meta.get('help', '')} (default: {shown})".strip()}
        origin = typing.get_origin(kind)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            base = typing.get_args(kind)[0]
            kwargs.update(type=base, nargs="+" if origin is list else len(typing.get_args(kind)))
        else:
            kwargs["type"] = kind if kind in (int, float, str) else str
        if meta.get("choices") is not None and kind is not bool:
            kwargs["choices"] = meta["choices"]
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given on the command line, by field name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
