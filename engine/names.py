"""Names that become folder names (runs, exports, releases): checked before any path is built."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
NAME_RULE = "letters, digits, '-', '_' and '.', at most 100 characters, not starting with '.', no '..'"


def valid_name(name: object) -> bool:
    """True for a name that stays one folder inside its parent, whatever the platform."""
    return isinstance(name, str) and bool(NAME_PATTERN.fullmatch(name)) and ".." not in name
