"""Errors a person can act on.

Every error the engine raises on purpose derives from ``LoraLabError``; its message is a
sentence meant for the UI and the command line as it is (no stack trace needed to
understand it). Anything else that escapes is a bug.
"""


class LoraLabError(Exception):
    """Base of every error whose message is written for a person."""


class ConfigError(LoraLabError):
    """A run configuration value is missing, of the wrong type or out of range."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class DataError(LoraLabError):
    """A dataset could not be read or does not have the expected shape."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}, line {line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class ModelNotFoundError(LoraLabError):
    """A base model or adapter could not be found locally or reached on the hub."""


class RunError(LoraLabError):
    """A run directory is missing, or an action does not fit the run's state."""


class LimitError(LoraLabError):
    """A request above one of the bounds in ``engine.limits`` (the sentence names the bound and its setting)."""
