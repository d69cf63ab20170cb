"""Settings shared by the edge and the regional: YAML laid over defaults in code, flags
laid over the file, one validation pass, one line per mistake.

Why one module: both commands take ``--config FILE`` plus flags, and a person who gets
a setting wrong on either should read the same kind of message, naming the key and
where it came from, and no traceback (the CLI prints the ConfigError and exits 2).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ValidationError

__all__ = [
    "COMMAND_LINE",
    "ConfigError",
    "Duration",
    "NonNegativeDuration",
    "load_settings",
    "parse_duration",
    "read_yaml",
    "readable_file",
    "set_dotted",
    "validate_settings",
]

M = TypeVar("M", bound=BaseModel)


COMMAND_LINE = "command line"


class ConfigError(Exception):
    """A setting in a file or on the command line is invalid; the message is one line
    that names the setting and its source (a file's path, or ``COMMAND_LINE``)."""

    @classmethod
    def unknown(cls, key: str, source: str) -> ConfigError:
        """A key the model does not have (a typo, most of the time)."""
        return cls(f"unknown setting {key!r} {_where(source)}")

    @classmethod
    def invalid(cls, key: str, source: str, problem: str) -> ConfigError:
        """A known key with a value the model refuses."""
        return cls(f"setting {key!r} {_where(source)}: {problem}")

    @classmethod
    def general(cls, source: str, problem: str) -> ConfigError:
        """A rule across settings (a model validator's), whose message names them."""
        return cls(f"{problem} ({_where(source)})")


def _where(source: str) -> str:
    return f"on the {source}" if source.startswith(COMMAND_LINE) else f"in {source}"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any, allow_zero: bool = False) -> float:
    """'10s', '500ms', '2m', '1h', or a number of seconds -> seconds (> 0, or >= 0 with
    ``allow_zero``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"invalid duration {value!r} (use e.g. 10s, 500ms, 2m)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"duration must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")
    return seconds


def _non_negative_duration(value: Any) -> float:
    return parse_duration(value, allow_zero=True)


#: Seconds, written as a duration ("10s", "500ms") or a number; must be positive.
Duration = Annotated[float, BeforeValidator(parse_duration)]
#: Like Duration, but 0 is allowed (e.g. no allowed lateness).
NonNegativeDuration = Annotated[float, BeforeValidator(_non_negative_duration)]


def readable_file(path: Path, what: str) -> Path:
    """``path`` if it is a file this process can read (checked once, before anything
    starts, so a wrong path is a setting error rather than a failure in a child)."""
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError(f"{what} {str(path)!r} is not a readable file")
    return path


def read_yaml(path: Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The mapping at the top of a YAML file; every failure names the file."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise error(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise error(f"config {path}: invalid YAML{at}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise error(f"config {path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise error(f"config {path}: top level must be a mapping")
    return loaded


def _problem(err: Mapping[str, Any]) -> str:
    """pydantic's message, without its "Value error, " prefix (our validators' text is
    written for people already)."""
    if err["type"] == "missing":
        return "required, and not given"
    msg = str(err["msg"]).replace("Input should be", "must be")
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def validate_settings(model: type[M], data: Mapping[str, Any], source: str | Callable[[str], str],
                      error: type[ConfigError] = ConfigError) -> M:
    """``model`` validated from ``data``; a ValidationError becomes one ``error`` line
    naming the key and its source (``source``, or ``source(key)`` when keys come from
    several places). Unknown keys are reported first: a typo usually also leaves a
    required key missing, and the typo is the thing to fix."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        unknown = [e for e in errors if e["type"] == "extra_forbidden"]
        err = (unknown or errors)[0]
        key = ".".join(str(p) for p in err["loc"])
        where = source(key) if callable(source) else source
        if err["type"] == "extra_forbidden":
            raise error.unknown(key, where) from None
        if not key:  # a model validator's: its message names the settings
            raise error.general(where, _problem(err)) from None
        raise error.invalid(key, where, _problem(err)) from None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b] = value`` for ``key`` "a.b"; a section that is not a mapping yet
    (absent, or null in the file) becomes one."""
    *path, last = key.split(".")
    node = data
    for part in path:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def _has(data: Mapping[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def load_settings(model: type[M], path: Path | None, overrides: Mapping[str, Any],
                  error: type[ConfigError] = ConfigError,
                  extra: Mapping[str, Any] | None = None,
                  flags: Mapping[str, str] | None = None) -> M:
    """The file (if any), then ``overrides`` laid over it, validated once against the
    defaults in ``model``. Override keys are dotted ("kafka.bootstrap"); a None value
    means "not given". ``extra`` is laid over both (values the caller derives, not a
    person's). An error names the file, or the command line (and the flag, from
    ``flags``: key -> flag) for a key given there."""
    from_file: dict[str, Any] = read_yaml(path, error) if path is not None else {}
    data = copy.deepcopy(from_file)
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in given.items():
        set_dotted(data, key, value)
    for key, value in (extra or {}).items():
        set_dotted(data, key, value)

    def source_of(key: str) -> str:
        """Where ``key`` (or the section it is missing from) was given."""
        for k in given:
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                flag = (flags or {}).get(k)
                return f"{COMMAND_LINE} ({flag})" if flag else COMMAND_LINE
        if path is None:
            return COMMAND_LINE
        if _has(from_file, key):
            return str(path)
        section = key.split(".")[0]
        if any(k.split(".")[0] == section for k in given) and not _has(from_file, section):
            return COMMAND_LINE
        return str(path)

    return validate_settings(model, data, source_of, error)
