"""Where a model or dataset is loaded from, and failing fast when the hub is out of reach.

Offline, a hub lookup through huggingface_hub retries for about a minute before it
fails. A person who typed a wrong path deserves a sentence within seconds instead, so
every model or dataset name goes through ``resolve_source`` first: an existing folder
or file is used as it is; something shaped like ``owner/name`` is a hub id, used when
huggingface_hub's cache holds it, and otherwise only after a short socket probe of the
hub endpoint. ``resolve_model`` adds the one name that is neither: ``demo``, the offline
demo model built on this machine. Every caller that loads a model by name uses it.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from engine.demo import DEMO_MODEL_NAME, ensure_demo_model
from engine.errors import ModelNotFoundError

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_reachability_cache: dict[str, bool] = {}


def looks_like_hub_id(name: str) -> bool:
    """True for ``owner/name`` strings that are not also an existing local path."""
    return bool(HUB_ID_PATTERN.match(name)) and not Path(name).exists()


def hub_offline_forced() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it, which is what its downloads obey.

    It is read once, when ``huggingface_hub.constants`` is first imported (transformers and
    datasets do that early). Setting the variable later changes neither huggingface_hub nor
    this answer; a lookup then still fails fast, through the reachability probe.
    """
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint with a short timeout (cached per process)."""
    if hub_offline_forced():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint in _reachability_cache:
        return _reachability_cache[endpoint]
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            reachable = True
    except OSError:
        reachable = False
    _reachability_cache[endpoint] = reachable
    return reachable


def in_local_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether huggingface_hub's cache holds a snapshot of this repo (usable offline)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return False
    return any(repo.repo_id == repo_id and repo.repo_type == repo_type and repo.revisions for repo in cache.repos)


def resolve_source(name: str, what: str = "model", repo_type: str = "model") -> str:
    """Return ``name`` if it can be loaded, else raise a sentence saying why.

    ``what`` is the noun used in the message ("base model", "dataset", ...).
    """
    name = (name or "").strip()
    if not name:
        raise ModelNotFoundError(f"No {what} was given.")
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if not looks_like_hub_id(name):
        raise ModelNotFoundError(
            f"The {what} '{name}' is not an existing local path, and it is not a hub id of the form owner/name."
        )
    if in_local_hub_cache(name, repo_type):
        return name
    if not hub_is_reachable():
        reason = "HF_HUB_OFFLINE is set" if hub_offline_forced() else "the Hugging Face hub cannot be reached"
        raise ModelNotFoundError(
            f"The {what} '{name}' is not a local path and looks like a hub id, but {reason} and it is not in the local "
            "hub cache. Download it on a machine with network access, or pass a local folder."
        )
    return name


def resolve_model(name: str, what: str = "base model", log=None) -> str:
    """Where to load model ``name`` from: ``demo`` is the demo model (built once, about a
    minute, when missing); anything else is a local folder or a hub id (``resolve_source``)."""
    if (name or "").strip() == DEMO_MODEL_NAME:
        return str(ensure_demo_model(log=log or (lambda *_: None)))
    return resolve_source(name, what=what, repo_type="model")
