"""The edge's exception tree: each error says what is wrong and how to fix it."""

from stratoscope import settings


class EdgeError(Exception):
    """Base of every error the edge reports to a person (exit code 2, no traceback)."""


class SpecError(EdgeError):
    """A program description (bpf/*.yaml) is invalid."""


class LoadError(EdgeError):
    """A program failed to compile, load, attach, or match its description."""

    def __init__(self, program: str, reason: str) -> None:
        super().__init__(f"program {program!r}: {reason}")
        self.program = program
        self.reason = reason


class ConfigError(EdgeError, settings.ConfigError):
    """The configuration file or command line is invalid (worded as the regional's:
    stratoscope/settings.py)."""


class PreflightError(EdgeError):
    """The machine lacks something the edge needs (privileges, headers, tracefs)."""
