"""Command-line values typed: `--set KEY=VALUE` by the field it names in a model's config dataclass, and
comma-separated lists (`--frames 8,16`)."""
from __future__ import annotations

import dataclasses
import types
import typing

from .errors import UserError


def comma_list(text: str, name: str, kind: type = int) -> tuple:
    """`"8, 16"` -> (8, 16); UserError naming the option on a bad or empty list."""
    try:
        values = tuple(kind(p.strip()) for p in text.split(",") if p.strip())
    except ValueError:
        what = {int: "integers", float: "numbers"}.get(kind, f"{kind.__name__} values")
        raise UserError(f"{name}: expected comma-separated {what}, got {text!r}") from None
    if not values:
        raise UserError(f"{name}: empty")
    return values


def resolution_list(text: str) -> tuple[int | tuple[int, int], ...]:
    """`"64,480x832"` -> (64, (480, 832)): square sizes or HEIGHTxWIDTH in pixels; UserError on a bad entry."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        sides = part.lower().split("x")
        if len(sides) > 2 or not all(s.strip().isdigit() for s in sides):
            raise UserError(f"resolution: {part!r} is not a size in pixels or HEIGHTxWIDTH (e.g. 64 or 480x832)")
        values = tuple(int(s) for s in sides)
        sizes.append(values[0] if len(values) == 1 or values[0] == values[1] else values)
    if not sizes:
        raise UserError("resolution: empty")
    return tuple(sizes)


def one_resolution(text: str) -> int | tuple[int, int]:
    """One frame size: `"256"` -> 256, `"480x832"` -> (480, 832)."""
    sizes = resolution_list(text)
    if len(sizes) != 1:
        raise UserError(f"resolution: one size expected (e.g. 256 or 480x832), got {text!r}")
    return sizes[0]


def _parse_scalar(text: str, kind: type, key: str):
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise UserError(f"--set {key}={text}: expected {kind.__name__}") from None


def parse_override_value(config_cls: type, key: str, text: str):
    """Turn the text of `--set key=text` into the type of the config field `key`."""
    hints = typing.get_type_hints(config_cls)
    if key not in hints:
        legal = ", ".join(sorted(f.name for f in dataclasses.fields(config_cls)))
        raise UserError(f"--set {key}: unknown field of {config_cls.__name__}; legal: {legal}")
    hint = hints[key]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        kind = args[0] if args else str
        try:
            return tuple(_parse_scalar(part.strip(), kind, key) for part in text.split(",") if part.strip())
        except UserError:  # name the whole value, not just the bad element
            raise UserError(f"--set {key}={text}: expected comma-separated {kind.__name__} values") from None
    return _parse_scalar(text, hint if hint in (int, float, bool, str) else str, key)
