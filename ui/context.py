"""What every tab shares: folders, the job manager, the GPU sampler, limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AppContext:
    runs_dir: Path
    exports_dir: Path
    jobs: Any = None  # engine.training.jobs.JobManager
    sampler: Any = None  # engine.training.sampler.GpuSampler
    max_upload_mb: int = 200
    uploads_dir: Path | None = None
    # Shared between tabs: the Train tab puts its form components and a values -> config function here.
    extras: dict = field(default_factory=dict)
