"""The one rule for names that become folders: run names, export names, ``RunConfig.name``.

A name is checked before any path is built from it, so nothing a person types can reach
outside the runs or exports folder. The rule is deliberately narrow (portable file names,
no leading dot so nothing is hidden) and lives here once, so the runs folder, the exports
folder and the config validation can never disagree about what a valid name is.
"""

from __future__ import annotations

import re

from engine.errors import LoraLabError

MAX_LENGTH = 100
_PATTERN = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,{MAX_LENGTH - 1}}}")
ALLOWED = (f"only letters, digits, '-', '_' and '.' are allowed, up to {MAX_LENGTH} characters, "
           "not starting with '.'")


def name_problem(name) -> str | None:
    """Why ``name`` cannot be a folder name, as the end of a sentence; None when it can."""
    if not isinstance(name, str) or not name.strip():
        return "it is empty"
    if ".." in name:
        return "it contains '..'"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if re.match(r"^[A-Za-z]:", name):
        return "it is an absolute path"
    if not _PATTERN.fullmatch(name):
        return ALLOWED
    return None


def check_name(name, what: str, error: type[LoraLabError] = LoraLabError) -> str:
    """``name`` if it is valid, else ``error`` with a sentence naming ``what`` ("run", "export") and why."""
    problem = name_problem(name)
    if problem:
        raise error(f"'{name}' is not a valid {what} name: {problem}.")
    return name
