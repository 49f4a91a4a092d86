"""Export a run: the PEFT adapter package or a merged model, each verified against base + adapter
before it is kept, with a model card and lineage; push an export to the Hugging Face Hub.
"""

from engine.export.exporter import (
    DTYPES,
    KINDS,
    ExportError,
    ExportResult,
    export_run,
    exportable_runs,
    list_exports,
    safe_export_dir,
    zip_export,
)
from engine.export.lock import ExportBusyError, export_lock
from engine.export.push import PushError, push_export, push_problem
from engine.export.verify import VerificationError, verify_export

__all__ = [
    "DTYPES", "KINDS", "ExportBusyError", "ExportError", "ExportResult", "PushError", "VerificationError",
    "export_lock", "export_run", "exportable_runs", "list_exports", "push_export", "push_problem", "safe_export_dir",
    "verify_export", "zip_export",
]
