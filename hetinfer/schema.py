"""Check a parsed JSON manifest against its documented schema before anything reads it.

A schema is a dict of field name -> spec, where a spec is
  a type or tuple of types           int, str, NUMBER (int or float), bool, dict, ...
  a dict                             a nested object with its own fields
  [spec]                             a list whose every item matches spec
  MapOf(spec)                        an object whose every value matches spec (keys are names)
  Omittable(spec) / Nullable(spec)    the field may be absent / may be null
Extra fields are allowed (a newer writer may add some). The first mismatch is one line naming the field by
its dotted path, what it should be, and the fix: a hand-edited manifest never reaches a KeyError.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from hetinfer.errors import ArtifactError

NUMBER = (int, float)
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
          list: "a list", type(None): "null"}


@dataclass(frozen=True)
class Omittable:
    spec: object


@dataclass(frozen=True)
class Nullable:
    spec: object


@dataclass(frozen=True)
class MapOf:
    spec: object


def describe(spec) -> str:
    if isinstance(spec, (Omittable, Nullable)):
        return describe(spec.spec) + (" or null" if isinstance(spec, Nullable) else "")
    if isinstance(spec, MapOf) or isinstance(spec, dict):
        return "an object"
    if isinstance(spec, list):
        return f"a list of {describe(spec[0]).removeprefix('an ').removeprefix('a ')}s"
    if spec == NUMBER:
        return "a number"
    if isinstance(spec, tuple):
        return " or ".join(describe(s) for s in spec)
    return _NAMES.get(spec, spec.__name__)


def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):  # JSON true is not a number
        return bool in types
    return isinstance(value, types)


def mismatch(value, spec, path: str) -> str | None:
    """The first field of `value` that does not match `spec`, as "`path` is missing" / "`path` must be ..."."""
    if isinstance(spec, Nullable):
        return None if value is None else mismatch(value, spec.spec, path)
    if isinstance(spec, Omittable):
        return mismatch(value, spec.spec, path)
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"`{path}` must be an object" if path else "the manifest must be a JSON object"
        for key, sub in spec.items():
            where = f"{path}.{key}" if path else key
            if key not in value:
                if isinstance(sub, Omittable):
                    continue
                return f"`{where}` is missing (it should be {describe(sub)})"
            bad = mismatch(value[key], sub, where)
            if bad:
                return bad
        return None
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            return f"`{path}` must be an object"
        for key, item in value.items():
            bad = mismatch(item, spec.spec, f"{path}.{key}")
            if bad:
                return bad
        return None
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"`{path}` must be {describe(spec)}"
        for i, item in enumerate(value):
            bad = mismatch(item, spec[0], f"{path}[{i}]")
            if bad:
                return bad
        return None
    if not _is(value, spec):
        return f"`{path}` must be {describe(spec)}, not {value!r}"[:200]
    return None


def validate(manifest, schema: dict, where: str, fix: str, error: type[Exception] = ArtifactError) -> None:
    """Raise `error` ("WHERE: FIELD is missing ...; FIX") at the first field not matching `schema`."""
    bad = mismatch(manifest, schema, "")
    if bad:
        raise error(f"{where}: {bad}; {fix}")


def dataclass_schema(cls, defaults_omittable: bool = True) -> dict:
    """The schema of a dataclass as `asdict` writes it; with `defaults_omittable`, fields that have a default
    may be absent (a reader fills them in)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        spec = _hint_spec(hints[f.name])
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        out[f.name] = Omittable(spec) if has_default and defaults_omittable else spec
    return out


def _hint_spec(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) < len(typing.get_args(hint)):  # X | None
        return Nullable(_hint_spec(args[0]))
    origin = typing.get_origin(hint) or hint
    if origin is float:
        return NUMBER
    if origin in (list, tuple):
        return [_hint_spec(typing.get_args(hint)[0])] if typing.get_args(hint) else list
    if dataclasses.is_dataclass(origin):
        return dataclass_schema(origin)
    return origin
