"""Errors that reach the user as one line and exit code 2.

Everything the user can get wrong (files, flags, configs) raises a `RecipeError`; the CLI prints `str(error)`
and exits with `EXIT_INPUT_ERROR`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


class InputErrors(RecipeError):
    """Every input problem of a run, reported together the way a compiler does: sorted by file and line, one per
    line, so a user fixes them all before running again instead of one per run."""

    DEFAULT_LIMIT = 50

    def __init__(self, errors: list[InputError]):
        unique = {error.format(): error for error in errors}
        self.errors = sorted(unique.values(), key=lambda e: (e.path or "", e.line or 0, e.message))
        super().__init__(self.format())

    def format(self, limit: int | None = None) -> str:
        limit = self.DEFAULT_LIMIT if limit is None else limit
        shown = self.errors if limit <= 0 else self.errors[:limit]
        lines = [error.format() for error in shown]
        if len(shown) < len(self.errors):
            lines.append(f"... and {len(self.errors) - len(shown)} more problems (--max-errors 0 shows them all)")
        return "\n".join(lines)


class Problems:
    """Collects input errors while files are read, so one run reports every problem (see `InputErrors`)."""

    def __init__(self) -> None:
        self.errors: list[InputError] = []

    @contextmanager
    def catch(self) -> Iterator[None]:
        """Run a unit of reading (a flow, a slot, a test step); its error is recorded and reading goes on."""
        try:
            yield
        except InputErrors as errors:
            self.errors.extend(errors.errors)
        except InputError as error:
            self.errors.append(error)

    def add(self, error: InputError) -> None:
        self.errors.append(error)

    def raise_if_any(self) -> None:
        if self.errors:
            if len(self.errors) == 1:
                raise self.errors[0]
            raise InputErrors(self.errors)
