"""One export at a time per exports folder, whoever starts it: the Export tab or ``python -m engine export``.

A second export while one runs is refused with a sentence rather than queued: a merge holds
a whole base model in memory (twice, briefly), so two at once can run the machine out of
memory, and a request that waits silently for minutes looks hung. Told that another export
is running, a person can wait knowingly and press again.

The lock is ``fcntl.flock`` on ``<exports>/.export.lock``. The kernel releases it when the
holder's file is closed, including when its process dies (kill -9, out of memory), so a
crash never leaves a stale lock to clear by hand. ``flock`` locks belong to an open file, so
two exports in one process (two browser tabs) exclude each other too. The file also holds
who has the lock, for the sentence the second caller reads, and is removed on release.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import RunError

LOCK_NAME = ".export.lock"  # a dot name: never listed as an export, never a valid export name


class ExportBusyError(RunError):
    """Another export holds the exports folder's lock."""


def _holder(path: Path) -> str:
    """Who holds the lock, in words; the holder may be between truncating and writing, so this can be vague."""
    try:
        record = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or "pid" not in record:
        return "by another process"
    since = time.time() - float(record.get("since") or time.time())
    return f"by process {record['pid']}, exporting {record.get('what') or 'a run'}, for {since:.0f} s"


@contextmanager
def export_lock(exports_dir: Path, what: str) -> Iterator[None]:
    """Hold the exports folder's lock for the block; ``ExportBusyError`` at once if another export has it."""
    exports_dir = Path(exports_dir)
    exports_dir.mkdir(parents=True, exist_ok=True)
    path = exports_dir / LOCK_NAME
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ExportBusyError(f"Another export is running in {exports_dir.resolve()} ({_holder(path)}); "
                                  "one export runs at a time, because a merge holds a whole base model in "
                                  "memory. Export again when it has finished.") from None
        # The last holder removes the file on release; if it did so between our open and our
        # lock, we hold a removed file that excludes nobody: start again on the one there now.
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "what": what, "since": time.time()}))
        handle.flush()
        yield
    finally:
        # Removed while still held, so no one can have locked it meanwhile: the exports folder
        # holds only exports afterwards. A killed holder leaves the file, unlocked, for the next.
        path.unlink(missing_ok=True)
        handle.close()
