"""One declaration per request field — type, bounds, default, help, where it may be set — from which the command
line's options, request-file lines, HTTP bodies and `JobRunner` calls are derived.

A job's request is a frozen pydantic dataclass (`request_class`) whose fields are declared with `field(...)`: the
annotation is the type, pydantic's constraints (`gt`, `le`, `min_length`, …) are the bounds, and `scope` says where
the field may be set:

| scope     | command line | request-file line | HTTP body | example                              |
|-----------|--------------|-------------------|-----------|--------------------------------------|
| `LAUNCH`  | yes          | no                | no        | model, dtype, --out: fixed per launch |
| `LOCAL`   | yes          | yes               | no        | prompt_file: a path on the ranks      |
| `REQUEST` | yes          | yes               | yes       | prompt, steps, seed, size             |

Constructing a request validates it (types, bounds, then its `__post_init__`'s cross-field rules); `build` and
`replace` turn pydantic's errors into one short `ValueError` that names each field. Request-file lines and HTTP
bodies are parsed by `parse_fields` from their raw JSON, strictly: a whole number where the field is one
(`{"steps": 1.5}` and `{"context": 2e8}` are refused), finite numbers only (NaN, Infinity and 1e999 are refused),
unknown fields refused by name. Bounds that need the model (its scheduler's steps, its positions, its default size)
are the job's own checks, made before anything is allocated.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

LAUNCH, LOCAL, REQUEST = "launch", "local", "request"
PER_REQUEST = (LOCAL, REQUEST)  # the scopes a request-file line may set
MAX_SEED = 2**63 - 1  # torch generators take seeds below 2^64; JSON readers lose precision past 2^53 anyway
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a request id: it names output files
RESERVED_IDS = ("journal", "manifest")  # stems of paragen's own files in an output folder
_ID = re.compile(ID_PATTERN)
_CONFIG = ConfigDict(allow_inf_nan=False, extra="forbid")


def request_class(cls: type) -> type:
    """A job's request: a frozen pydantic dataclass, validated whenever it is made (also by `dataclasses.replace`)."""
    return pydantic.dataclasses.dataclass(frozen=True, config=_CONFIG)(cls)


def field(default: Any, help: str, *, scope: str = REQUEST, flag: str | None = None, cli: bool = True,
          metavar: str | None = None, **bounds: Any) -> Any:
    """A request field: its default, help, `scope`, command-line `flag` (default `--name-with-dashes`; `cli=False`:
    the job builds it from other options) and pydantic bounds (`gt=0`, `le=…`, `min_length=1`, …)."""
    if scope not in (LAUNCH, LOCAL, REQUEST):
        raise ValueError(f"scope must be {LAUNCH}, {LOCAL} or {REQUEST}, got {scope!r}")
    extra = {"scope": scope, "flag": flag, "cli": cli, "metavar": metavar}
    return Field(default, description=help, json_schema_extra=extra, **bounds)


def _spec(info: FieldInfo) -> dict:
    return info.json_schema_extra or {}


def fields_of(cls: type, scopes: tuple[str, ...] = (LAUNCH, LOCAL, REQUEST)) -> dict[str, FieldInfo]:
    """The declared fields of request class `cls` in `scopes`, in declaration order."""
    return {name: info for name, info in cls.__pydantic_fields__.items() if _spec(info).get("scope") in scopes}


def default_of(cls: type, name: str) -> Any:
    """The declared default of field `name`."""
    return cls.__pydantic_fields__[name].default


# ---- building requests ------------------------------------------------------------------------------------------
def build(cls: type, **values: Any) -> Any:
    """`cls(**values)`, validated; ValueError naming every bad field."""
    try:
        return cls(**values)
    except ValidationError as error:
        raise ValueError(describe(error, cls)) from None


def replace(request: Any, **changes: Any) -> Any:
    """`request` with `changes`, validated like `build`."""
    try:
        return dataclasses.replace(request, **changes)
    except ValidationError as error:
        raise ValueError(describe(error, type(request))) from None


def describe(error: ValidationError, cls: type | None = None) -> str:
    """pydantic's errors as one line a user reads: `steps must be positive, got 0; seed must be a whole number`."""
    return "; ".join(_problem(problem, cls) for problem in error.errors())


def _problem(problem: dict, cls: type | None) -> str:
    kind, context, given = problem["type"], problem.get("ctx", {}), problem.get("input")
    where = ".".join(str(part) for part in problem["loc"])
    if kind == "value_error":  # a request's own cross-field rule: its message is already a sentence
        return str(context.get("error", problem["msg"]))
    if kind == "json_invalid":
        return f"not valid JSON ({context.get('error', problem['msg'])})"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        allowed = "" if cls is None else f" (a request may set: {', '.join(fields_of(cls, PER_REQUEST))})"
        return f"{where} is not a field of this request{allowed}"
    if kind == "missing":
        return f"{where} is required"
    bound = {key: f"{value:g}" if isinstance(value, float) else value for key, value in context.items()}
    words = {
        "greater_than": "must be positive" if context.get("gt") == 0 else f"must be greater than {bound.get('gt')}",
        "greater_than_equal": f"must be at least {bound.get('ge')}",
        "less_than": f"must be below {bound.get('lt')}",
        "less_than_equal": f"must be at most {bound.get('le')}",
        "int_type": "must be a whole number", "int_from_float": "must be a whole number",
        "int_parsing": "must be a whole number", "float_type": "must be a number", "float_parsing": "must be a number",
        "finite_number": "must be a finite number", "bool_type": "must be true or false",
        "string_type": "must be a string", "string_too_short": "must not be empty",
        "string_too_long": f"must be at most {context.get('max_length')} characters",
        "string_pattern_mismatch": f"must match {context.get('pattern')}",
        "too_short": f"must hold at least {context.get('min_length')}",
        "too_long": f"must hold at most {context.get('max_length')}",
    }.get(kind, re.sub(r"^Input should be", "must be", problem["msg"]))
    shown = "" if isinstance(given, (dict, list, tuple)) or given is None else f", got {given!r}"[:80]
    return f"{where or 'the request'} {words}{shown}"


# ---- request-file lines and HTTP bodies -------------------------------------------------------------------------
class Strict(pydantic.BaseModel):
    """A model of request fields: finite numbers, no unknown field (the base of lines and HTTP bodies)."""

    model_config = _CONFIG


@functools.lru_cache(maxsize=None)
def fields_model(cls: type, scopes: tuple[str, ...] = PER_REQUEST, base: type[pydantic.BaseModel] | None = None,
                 leave_out: tuple[str, ...] = ()) -> type[pydantic.BaseModel]:
    """A pydantic model of the fields of `cls` in `scopes` (less `leave_out`), each optional (unset: the launch's
    value) with its declared type and bounds, on top of `base`'s own fields (an HTTP body's OpenAI fields)."""
    declared = {}
    for name, info in fields_of(cls, scopes).items():
        if name not in leave_out:
            kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            declared[name] = (kind, Field(None, description=info.description))
    return pydantic.create_model(f"{cls.__name__}Fields", __base__=base or Strict, **declared)


def parse_fields(model: type[pydantic.BaseModel], raw: str | bytes, cls: type | None = None) -> pydantic.BaseModel:
    """`raw` JSON validated by `model` strictly (JSON types as declared, finite numbers, no unknown field);
    ValueError naming every problem."""
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as error:
        raise ValueError(describe(error, cls)) from None


def given(parsed: pydantic.BaseModel, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields a parsed line or body set, less `leave_out`."""
    return {name: getattr(parsed, name) for name in parsed.model_fields_set if name not in leave_out}


def check_id(name: str) -> str:
    """A request id that can name output files: letters, digits, '.', '_', '-', and none of paragen's own names."""
    if not _ID.fullmatch(name):
        raise ValueError(f"id {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
                         "digit (it names the outputs)")
    if name.lower() in RESERVED_IDS:
        raise ValueError(f"id {name!r} is reserved: it names paragen's own files in the output folder")
    return name


# ---- the command line -------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser | Any, cls: type, names: tuple[str, ...] | None = None) -> None:
    """The command-line options of the fields of `cls` (all with `cli`, or those in `names`, in that order)."""
    chosen = names or tuple(name for name, info in fields_of(cls).items() if _spec(info).get("cli", True))
    for name in chosen:
        info = cls.__pydantic_fields__[name]
        spec = _spec(info)
        flag = _flag(name, info)
        kind, _ = _base_type(info.annotation)
        options: dict[str, Any] = {"help": info.description}
        if kind is bool:
            options.update(action="store_true")
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            if item is str:  # repeat the flag, one value each
                options.update(action="append", default=None, metavar=spec.get("metavar") or "TEXT")
            else:
                options.update(type=_comma_list(item, flag), default=info.default, metavar=spec.get("metavar") or "N,N,…")
        elif typing.get_origin(kind) is Literal:
            options.update(choices=typing.get_args(kind), default=info.default)
        else:
            options.update(type=kind, default=info.default, metavar=spec.get("metavar"))
        p.add_argument(flag, **options)


def _flag(name: str, info: FieldInfo) -> str:
    """The command-line flag of field `name`; its argparse dest (and `JobRunner` keyword) is the flag's words."""
    return _spec(info).get("flag") or "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of an annotation."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(annotation))
    return annotation, False


def _comma_list(item: type, flag: str):
    def parse(text: str) -> tuple:
        try:
            return tuple(item(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {item.__name__} values, got {text!r}")
    return parse


def from_arguments(cls: type, args: argparse.Namespace, **more: Any) -> Any:
    """The request the command line's options ask for (`more`: the fields the job builds from other options)."""
    values = {}
    for name, info in fields_of(cls).items():
        dest = _flag(name, info)[2:].replace("-", "_")
        value = getattr(args, dest, None)
        unset = not hasattr(args, dest) or (value is None and not _base_type(info.annotation)[1])
        if not _spec(info).get("cli", True) or unset:
            continue  # not an option, or an unset repeatable flag: the declared default
        if isinstance(value, str) and typing.get_origin(_base_type(info.annotation)[0]) is tuple:
            value = (value,)  # one value of a repeatable flag, given as a keyword
        values[name] = tuple(value) if isinstance(value, list) else value
    return build(cls, **values, **more)


__all__ = ["LAUNCH", "LOCAL", "REQUEST", "PER_REQUEST", "MAX_SEED", "ID_PATTERN", "RESERVED_IDS", "add_arguments",
           "build", "check_id", "default_of", "describe", "field", "fields_model", "fields_of", "from_arguments",
           "given", "parse_fields", "replace", "request_class", "Strict"]
