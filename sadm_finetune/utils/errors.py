"""User-facing errors: each renders as one line naming the field or file and the fix."""

from __future__ import annotations


class SADMError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class ConfigError(SADMError, ValueError):
    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}; {fix}")


class InputError(SADMError):
    """A missing or unusable file, folder, model or data set."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if empty): for one-line user errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
