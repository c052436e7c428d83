"""Config errors that name the field path, the fix and (for YAML) the file and line."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str
    where: str | None = None  # "agent.yaml line 12" when the value came from a file

    def __str__(self) -> str:
        suffix = f" ({self.where})" if self.where else ""
        prefix = f"{self.path}: " if self.path else ""
        return f"{prefix}{self.message}{suffix}"


class ConfigError(Exception):
    """Invalid configuration: every issue names its field path and where it came from."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))

    @classmethod
    def single(cls, path: str, message: str, where: str | None = None) -> ConfigError:
        return cls([ConfigIssue(path, message, where)])


class ForbiddenProfileKeys(ConfigError):
    """A pushed profile sets what only the site file may (identity, trust, state)."""


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names valid at the parent of ``loc``, to suggest a fix for an unknown key."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in(annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(error: ErrorDetails, model: type[BaseModel]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = error.get("input")
    loc = tuple(error["loc"])
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listing = f" (allowed: {', '.join(allowed)})" if allowed and not close else ""
        return f"unknown key{hint}{listing}"
    if kind == "missing":
        return "required, but missing"
    bounds = {
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {_number(ctx.get(key))}, got {got!r}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {got!r}"
    if kind == "string_pattern_mismatch":
        return f"must use lower-case letters, digits, '-' or '_' only, got {got!r}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind.endswith(("_type", "_parsing")):
        return f"{error['msg'][0].lower()}{error['msg'][1:]}, got {got!r}"
    return f"{error['msg']}, got {got!r}"


def _number(value: Any) -> Any:
    """60.0 reads as 60 in a message about a setting people type as 60."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def issues_from_validation(
    exc: ValidationError, model: type[BaseModel], locate: dict[str, str] | None = None
) -> list[ConfigIssue]:
    """Turn pydantic's errors into ``ConfigIssue``s with dotted paths and source locations."""
    issues = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"])
        where = None
        if locate:
            # Walk up to the nearest located ancestor: a missing key has no line of its own.
            probe = path
            while probe and probe not in locate:
                probe = probe.rpartition(".")[0]
            where = locate.get(probe)
        issues.append(ConfigIssue(path=path, message=_describe(error, model), where=where))
    return issues
