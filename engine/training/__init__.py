"""Training runs: the run directory, the worker process, the job manager and the memory sampler.

``rundir`` owns the layout of a run folder and every read or write of it (and what a reader
may believe after a crash); ``worker`` is the training process (``python -m
engine.training.worker RUN_DIR``), which also records its own memory through ``sampler``,
owns its device through ``devices`` and keeps its checkpoints and failures honest through
``recovery``; ``jobs`` starts, stops, queues and recovers workers.
"""

from engine.training import rundir
from engine.training.jobs import JobManager, kill_worker, request_stop, spawn_worker, wait_for_state
from engine.training.sampler import GpuSampler

__all__ = ["GpuSampler", "JobManager", "kill_worker", "request_stop", "rundir", "spawn_worker", "wait_for_state"]
