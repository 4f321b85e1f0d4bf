"""Errors that reach the user as one line and exit code 2.

Everything the user can get wrong (files, flags, configs) raises a `RecipeError`; the CLI prints `str(error)`
and exits with `EXIT_INPUT_ERROR`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

EXIT_INPUT_ERROR = 2


class RecipeError(Exception):
    """A problem with the user's input or configuration, reported as one line."""


class InputError(RecipeError):
    """A problem at a place in a file: rendered as `path:line: message`."""

    def __init__(self, path: str | Path | None, line: int | None, message: str):
        self.path = str(path) if path is not None else None
        self.line = line
        self.message = message
        super().__init__(self.format())

    def format(self) -> str:
        if self.path is None:
            return self.message
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"


class ConfigError(RecipeError):
    """A bad flag or config value, reported before any paid work starts."""
