"""An export folder onto the Hugging Face Hub, through huggingface_hub's ``HfApi``.

``push_problem`` answers within seconds, before any export work starts, whether a push can
work at all from here: a well-formed repo id, the hub not switched off (``HF_HUB_OFFLINE``), a
token, and the hub endpoint reachable (engine.hub's short probe; huggingface_hub itself would
retry for about a minute). ``push_export`` then creates the repository if needed and uploads
the folder: card, lineage.json, weights and tokenizer, as they were verified.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.errors import LoraLabError
from engine.hub import HUB_ID_PATTERN, hub_is_reachable, hub_offline_forced


class PushError(LoraLabError):
    """A push to the Hugging Face Hub cannot be made, or failed; the message says why."""


def push_problem(repo_id: str) -> str | None:
    """Why a push of ``repo_id`` cannot work from here, in one sentence; None when it can be tried."""
    if not HUB_ID_PATTERN.match(repo_id or ""):
        return f"'{repo_id}' is not a Hub repository id: use owner/name, e.g. your-name/my-adapter."
    if hub_offline_forced():
        return ("HF_HUB_OFFLINE is set, so nothing can be pushed to the Hugging Face Hub: unset it on a machine "
                "with network access and push again (the export folder is kept as it is).")
    from huggingface_hub import get_token

    if not get_token():
        return ("No Hugging Face token was found: run `hf auth login` or set HF_TOKEN to a token with write "
                "access, then push again.")
    if not hub_is_reachable():
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return (f"The Hugging Face Hub ({endpoint}) cannot be reached from this machine, so nothing was pushed: "
                "push again from a machine with network access.")
    return None


def push_export(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; the URL of the commit's tree."""
    problem = push_problem(repo_id)
    if problem:
        raise PushError(problem)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"LoRA Lab export {folder.name}")
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise PushError(f"The Hub refused the push to {repo_id} ({status}): the token needs write access to "
                            "that namespace.") from None
        raise PushError(f"The push to {repo_id} failed: {str(error).splitlines()[0][:300]}") from None
    except OSError as error:  # connection dropped mid-upload
        raise PushError(f"The push to {repo_id} failed on the network ({error}); push again.") from None
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
