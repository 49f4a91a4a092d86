"""The worker's side of crash consistency: complete checkpoints, honest resumes, failures on a full disk.

``engine.training.rundir`` says what a reader may believe after a crash; this module is what
the worker does so that it holds:

* ``callback()`` (a ``TrainerCallback``): transformers writes ``checkpoint-N`` in place,
  file by file, so a kill mid-save leaves a folder that looks like a checkpoint and cannot
  be resumed. After transformers has written every file, ``on_save`` flushes them and
  writes ``.complete`` last (``rundir.mark_checkpoint_complete``); only marked folders are
  offered for resume and chat. A full disk met by the memory sampler's thread fails the run at
  the end of the step, like any write of the training thread.
* ``prepare_resume``: picks the newest complete checkpoint, removes folders cut short
  (training repeats those steps anyway), appends the ``resume`` event that tells readers
  which metrics were rolled back, and says all of it in one sentence.
* ``failure_reason``: a full disk (``ENOSPC``, a quota, or torch's errno-less "file write
  failed" on a nearly full filesystem) becomes a sentence naming the disk and its free
  bytes; the incomplete checkpoint it was writing is removed and the run's reserve freed,
  so status.json can still record it.
"""

from __future__ import annotations

from pathlib import Path

from engine.training import rundir

_PENDING: list[OSError] = []  # a write that failed on another thread (the memory sampler's), raised at the next step


def note_write_error(error: OSError) -> None:
    """For writers off the training thread: a full disk fails the run at the end of the current step."""
    if rundir.is_disk_full(error) and not _PENDING:
        _PENDING.append(error)


def callback():
    """The TrainerCallback of crash consistency (imported lazily: transformers).

    ``on_save`` marks each checkpoint complete after transformers wrote it; ``on_step_end``
    raises a full disk that another thread of the worker ran into, so it fails the run like
    any other write.
    """
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class CrashConsistency(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir() and state.is_world_process_zero:  # rank 0 writes the run folder (multi-GPU)
                rundir.mark_checkpoint_complete(folder)
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if _PENDING:
                raise _PENDING[0]
            return control

    return CrashConsistency()


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint continues from (its trainer_state.json), else the number in its name."""
    state = rundir.read_json(Path(folder) / rundir.TRAINER_STATE, default={}) or {}
    step = state.get("global_step")
    return step if isinstance(step, int) else int(Path(folder).name.split("-")[-1])


def prepare_resume(run_dir: Path) -> tuple[Path | None, str]:
    """(the checkpoint to continue from or None, the sentence that says so) — and the resume event written."""
    removed = rundir.remove_incomplete_checkpoints(run_dir)
    checkpoint = rundir.latest_checkpoint(run_dir)
    step = checkpoint_step(checkpoint) if checkpoint else 0
    rundir.append_jsonl(rundir.RunPaths(run_dir).metrics,
                        rundir.resume_record(step, checkpoint.name if checkpoint else None))
    if checkpoint:
        sentence = f"Resuming from {checkpoint.name}, the newest complete checkpoint (step {step})."
    else:
        sentence = "Resume asked for, but no complete checkpoint exists: starting from step 0."
    if removed:
        sentence += (f" {', '.join(removed)} {'was' if len(removed) == 1 else 'were'} cut short before "
                     f"{'it was' if len(removed) == 1 else 'they were'} complete and "
                     f"{'was' if len(removed) == 1 else 'were'} removed; those steps are trained again.")
    return checkpoint, sentence


def failure_reason(run_dir: Path, error: BaseException, step: int, explain) -> str:
    """The sentence status.json records for ``error``; for a full disk, room is made to record it."""
    if not rundir.is_disk_full(error, run_dir):
        return explain(error)
    sentence = rundir.disk_full_sentence(run_dir, "the run was writing") + f" The run stopped at step {step}."
    removed = rundir.remove_incomplete_checkpoints(run_dir)  # after measuring: the sentence says how full it was
    rundir.release_reserve(run_dir)
    if removed:
        sentence += f" The incomplete {', '.join(removed)} was removed."
    return sentence + " Free some space there (old runs, exports, checkpoints), then resume." + \
        rundir.resume_hint(run_dir)
