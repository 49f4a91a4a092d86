"""Controlled sweeps: one field (or two) varied over a preset, each value an ordinary run, one at a time.

``spec`` expands ``--vary`` into validated run configs (with predicted peaks), ``store`` is the
sweep's directory (``sweeps/<id>/sweep.json``), ``runner`` starts, runs and stops a sweep through
the job manager, ``summary`` reads the runs into a table, a Pareto front and a recommendation;
``cli`` is ``python -m engine sweep``.
"""

from engine.sweeps.runner import run_sweep, start_sweep, stop_sweep
from engine.sweeps.spec import PlannedRun, SweepPlan, Vary, expand, parse_vary
from engine.sweeps.store import list_sweeps, read_sweep, resolve_sweep, sweeps_dir_for
from engine.sweeps.summary import RunResult, pareto_front, read_results, recommendation

__all__ = [
    "PlannedRun", "RunResult", "SweepPlan", "Vary", "expand", "list_sweeps", "pareto_front", "parse_vary",
    "read_results", "read_sweep", "recommendation", "resolve_sweep", "run_sweep", "start_sweep", "stop_sweep",
    "sweeps_dir_for",
]
