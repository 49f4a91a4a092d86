"""What every tab shares, typed: folders, the job manager, the memory sampler, limits, the chat models.

One ``AppContext`` is built by ``app.py`` and handed to each tab's ``build``; handlers are
module-level functions that take it (or plain values from it) as an argument, so tests call
them directly without a browser. ``bind`` fixes those arguments at wiring time.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Both are light (no torch): the dashboard still starts without loading a model library.
from engine.chat.models import StopSignals
from engine.data.report import StatsJobs

if TYPE_CHECKING:  # imported for types only: the dashboard starts without torch
    from engine.chat import ChatModels
    from engine.training import GpuSampler, JobManager


@dataclass
class AppContext:
    runs_dir: Path
    exports_dir: Path
    jobs: JobManager | None = None
    sampler: GpuSampler | None = None
    max_upload_mb: float = 200
    releases_dir: Path | None = None  # None: "releases" beside the exports folder (see releases_folder)
    sweeps_dir: Path | None = None  # None: engine.sweeps.sweeps_dir_for(runs_dir), beside the runs folder
    chat: ChatModels | None = None  # made on first use by the Chat tab: one base in memory for the whole app
    # The Train tab's form components, in the order ``ui.train_tab.form_to_config`` reads them; the
    # Memory tab's "Use Train-tab settings" button takes them as inputs.
    train_form: list[Any] = field(default_factory=list)
    # The Chat tab's stop buttons: one event per browser session, so Stop in one tab ends only its own answer.
    chat_stops: StopSignals = field(default_factory=StopSignals)
    # The Dataset tab's whole-dataset statistics passes; a browser session holds only its pass's id.
    stats_jobs: StatsJobs = field(default_factory=StatsJobs)


def releases_folder(ctx: AppContext) -> Path:
    """The releases folder: the app's --releases-dir, else ``releases`` beside the exports folder."""
    return ctx.releases_dir or Path(ctx.exports_dir).parent / "releases"


def bind(handler: Callable, *values) -> Callable:
    """``handler`` with its first parameters fixed to ``values``, as Gradio should see it.

    Not ``functools.partial``: Gradio finds ``gr.Request`` and ``gr.SelectData`` parameters by
    their type hints, and a partial hides them; it streams only when the function it is given is
    a generator function. The wrapper keeps the hints, the remaining signature and generator-ness.
    """
    signature = inspect.signature(handler)
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def bound(*args, **kwargs):
            yield from handler(*values, *args, **kwargs)
    else:
        @functools.wraps(handler)
        def bound(*args, **kwargs):
            return handler(*values, *args, **kwargs)
    bound.__signature__ = signature.replace(parameters=list(signature.parameters.values())[len(values):])
    return bound
