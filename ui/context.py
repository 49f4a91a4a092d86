"""What every tab shares, typed: folders, the job manager, the memory sampler, limits, the chat models.

One ``AppContext`` is built by ``app.py`` and handed to each tab's ``build``; handlers are
module-level functions that take it (or plain values from it) as an argument, so tests call
them directly without a browser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported for types only: the dashboard starts without torch
    from engine.chat import ChatModels
    from engine.training import GpuSampler, JobManager


@dataclass
class AppContext:
    runs_dir: Path
    exports_dir: Path
    jobs: JobManager | None = None
    sampler: GpuSampler | None = None
    max_upload_mb: int = 200
    uploads_dir: Path | None = None
    chat: ChatModels | None = None  # made on first use by the Chat tab: one base in memory for the whole app
    # The Train tab's form components, in the order ``ui.train_tab.form_to_config`` reads them; the
    # Memory tab's "Use Train-tab settings" button takes them as inputs.
    train_form: list[Any] = field(default_factory=list)
