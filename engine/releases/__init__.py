"""Adapters as releases: an eval report, a promotion gate, versions with rollback, serving bundles.

``report`` answers a private eval set with the base, a run's adapter and the current release on
one copy of the base and writes the run's ``eval/report.json`` and ``report.html``; ``gate``
judges a report against declared criteria; ``store`` keeps ``releases/<name>/v<N>/`` with an
append-only history and rollback; ``bundles`` writes serving bundles (vLLM multi-LoRA, and GGUF
for llama.cpp / Ollama verified in llama.cpp). ``python -m engine eval`` and
``python -m engine release ...`` are ``cli``.
"""

from engine.releases.files import read_report, report_path
from engine.releases.gate import Criterion, Decision, Gate, decide
from engine.releases.report import make_report
from engine.releases.store import (
    DEFAULT_RELEASES_DIR,
    PromotionRefused,
    ReleaseError,
    Version,
    chat_source,
    history,
    list_releases,
    promote,
    release_ref,
    release_root,
    release_source,
    resolve_version,
    rollback,
    show,
    verify_version,
)

__all__ = [
    "DEFAULT_RELEASES_DIR", "Criterion", "Decision", "Gate", "PromotionRefused", "ReleaseError", "Version",
    "chat_source", "decide", "history", "list_releases", "make_report", "promote", "read_report", "release_ref",
    "release_root", "release_source", "report_path", "resolve_version", "rollback", "show", "verify_version",
]
