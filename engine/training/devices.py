"""One owner per device: the training worker holds an ``fcntl`` lock on its device for as long as it trains.

Two dashboards on one runs folder, a ``python -m engine train --detach`` beside a dashboard
run, or two checkouts on one machine used to train at once on one GPU (an out-of-memory
error on a real card). Each job manager only knows its own queue, so the rule lives where
every run passes: the worker takes ``<lock dir>/<device>.lock`` before it loads the model,
and a second worker, started from anywhere, waits for it with a sentence naming the
holder in its status (and can be stopped while it waits). The kernel releases the lock
when the holder dies, however it dies, so a killed run never blocks the device.

The lock folder is machine-wide by default (``$XDG_RUNTIME_DIR`` or the temp folder, per
user), because the device is; ``LORALAB_LOCK_DIR`` moves it (the test suite gives each
session its own). The CPU is a device too: two trainings on one machine's cores only halve
each other.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

LOCK_DIR_ENV = "LORALAB_LOCK_DIR"


def lock_dir() -> Path:
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"loralab-locks-{os.getuid()}"


def device_key(device: str) -> str:
    """The lock name for the device a worker trains on ("cpu", or the GPU's UUID: one name per card)."""
    if not device.startswith("cuda"):
        return "cpu"
    try:
        import torch

        index = torch.cuda.current_device()
        return f"gpu-{torch.cuda.get_device_properties(index).uuid}"
    except Exception:  # noqa: BLE001 - an old torch without .uuid: the visible index still names the card
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        return f"gpu-{visible}"


def describe(key: str) -> str:
    return "the CPU" if key == "cpu" else f"GPU {key.removeprefix('gpu-')}"


def _path(key: str) -> Path:
    return lock_dir() / f"{key}.lock"


def holder(key: str) -> dict | None:
    """Who holds ``key`` now ({"pid", "run", "run_dir", "since"}), or None when it is free."""
    path = _path(key)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                info = {}
            return info if isinstance(info, dict) else {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def busy_devices() -> dict[str, dict]:
    """Every device lock held on this machine, and its holder (what a launcher warns about)."""
    try:
        keys = [p.stem for p in lock_dir().glob("*.lock")]
    except OSError:
        return {}
    return {key: info for key in keys if (info := holder(key)) is not None}


def holder_text(info: dict | None) -> str:
    """'run 'demo' (pid 4242, runs folder /x/runs)', or 'another process' when it did not say."""
    if not info or not info.get("run"):
        return "another process" + (f" (pid {info['pid']})" if info and info.get("pid") else "")
    folder = Path(str(info.get("run_dir", ""))).parent
    return f"run '{info['run']}' (pid {info.get('pid')}, runs folder {folder})"


class DeviceLock:
    """The worker's hold on one device; ``release`` (or the process's end) frees it."""

    def __init__(self, key: str):
        self.key = key
        self._handle = None

    def try_acquire(self, run_dir: Path) -> bool:
        lock_dir().mkdir(parents=True, exist_ok=True)
        handle = open(_path(self.key), "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "run": Path(run_dir).name, "run_dir": str(run_dir),
                                     "since": time.time(), "device": self.key}))
            handle.flush()
        except OSError:
            pass  # the lock is what counts; the note only names the holder
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def acquire(key: str, run_dir: Path, waiting, stop_asked, poll_s: float = 1.0) -> DeviceLock | None:
    """Take ``key`` for ``run_dir``, waiting while another run holds it.

    ``waiting(sentence)`` is called when the holder changes (the worker puts it in its
    status); ``stop_asked()`` ends the wait (returns None) so a waiting run can be stopped.
    """
    lock = DeviceLock(key)
    said = None
    while not lock.try_acquire(run_dir):
        if stop_asked():
            return None
        sentence = (f"Waiting for {describe(key)}: {holder_text(holder(key))} is training on it. "
                    "This run starts when it ends; stop this run to cancel.")
        if sentence != said:
            waiting(sentence)
            said = sentence
        time.sleep(poll_s)
    return lock
