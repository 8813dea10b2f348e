"""Reading a job spec: YAML → `--set` overrides → validation, every problem one `SpecError`.

The schema itself (the sections and `JobSpec`) is in spec.py; this module turns pydantic's
errors into `field.path: message` lines (with a "did you mean" for typos) and writes a spec
back out as YAML. Only `yaml.safe_load` is used: a spec is data and never runs code.
"""
from __future__ import annotations

import copy as _copy
import difflib
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from pydantic import ValidationError

from .schema import FieldError, JobSpec


class SpecError(Exception):
    """Invalid job spec: a list of (dotted field path, message); `source` is the file."""

    def __init__(self, errors: Sequence[tuple[str, str]], source: Optional[str] = None):
        self.errors = list(errors)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"{self.source}: " if self.source else ""
        return "\n".join(f"{head}{f}: {m}" if f else f"{head}{m}" for f, m in self.errors)


def _loc_str(loc: Sequence[Any]) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """Field names of the section model at `loc` (for 'did you mean' hints)."""
    model: Any = JobSpec
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field else None
    return list(getattr(model, "model_fields", {}))


def _from_validation_error(exc: ValidationError, source: Optional[str]) -> SpecError:
    errors = []
    for e in exc.errors():
        loc, msg = list(e["loc"]), e["msg"]
        err = (e.get("ctx") or {}).get("error")
        if isinstance(err, FieldError):
            loc, msg = loc + [err.field], err.message
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
        errors.append((_loc_str(loc), msg))
    return SpecError(errors, source)


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Return a copy of `raw` with `key.path=value` overrides applied (values parsed as YAML).

    Intermediate mappings are created as needed; an unknown key is then caught by the schema.
    """
    out = _copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise SpecError([(item, "override must look like key.path=value")], "--set")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError([(key, f"cannot parse value {text!r}: {exc}")], "--set") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part.strip(), {})
            if not isinstance(node, dict):
                where = ".".join(parts[: i + 1])
                raise SpecError([(key, f"{where} is not a section")], "--set")
        node[parts[-1].strip()] = value
    return out


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate a job YAML; every problem becomes a SpecError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([("", f"cannot read job spec: {exc.strerror or exc}")], source) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([("", f"invalid YAML: {exc}")], source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError([("", f"top level must be a mapping of sections, got {type(raw).__name__}")],
                        source)
    return spec_from_dict(apply_overrides(raw, overrides), source)


def spec_from_dict(raw: dict, source: Optional[str] = None) -> JobSpec:
    """Validate an in-memory mapping (tests, sweeps) with the same SpecError reporting."""
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise _from_validation_error(exc, source) from None


def dump_spec(spec: JobSpec) -> str:
    """The full spec, defaults included, as YAML (loadable again by load_spec)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
