"""A multi-GPU run's launcher: ``python -m engine.training.launch RUN_DIR [--resume]``.

The job manager starts this one process for a ddp/fsdp run (so it still sees one job); it hands
the run's ``accelerate/config.yaml`` to accelerate's own launcher (``accelerate launch``, which
starts one ``engine.training.worker`` per process through torchrun) and stays its parent. What
it adds is the sentence when a rank dies: torchrun then stops the others and reports every
failure (rank, pid, exit code or signal), and this process records the first one in the run's
``launch.json``, as the job manager does for a one-process worker. A rank that ended the run
itself (completed, stopped, or failed with its own reason) is left to speak for itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from engine.config import RunConfig
from engine.config.build import GPU_ORDER_ENV, launch_arguments
from engine.training import rundir
from engine.training.rundir import RunPaths, update_launch

EXIT_FAILED = 1  # the worker's codes (engine.training.worker), repeated to keep this import light
EXIT_STOPPED = 3
EXIT_DUPLICATE = 4
LAUNCHER_PID_ENV = "LORALAB_LAUNCHER_PID"  # the ranks record this pid: the one to signal, whose tree they are


def describe_rank_exit(rank: int, pid: int | None, exitcode: int) -> str:
    """'Rank 1 (pid 123) was killed by SIGKILL (exit code -9)' and the like."""
    who = f"Rank {rank}" + (f" (pid {pid})" if pid else "")
    if exitcode < 0:
        number = -exitcode
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
        hint = ", the system's out-of-memory killer or a kill command" if number == signal.SIGKILL else ""
        return f"{who} was killed by {name} (exit code {exitcode}{hint})"
    return f"{who} exited with code {exitcode}"


def first_failure(failures: dict) -> tuple[int, object]:
    """The rank to blame: one killed by a signal other than SIGTERM first (SIGTERM is how torchrun stops the
    others once one has died), then one that exited with an error (the others then fail on its broken
    connection), then the earliest; torchrun's timestamps are whole seconds, so they rarely decide."""
    def key(item):
        rank, failure = item
        return (failure.exitcode == -signal.SIGTERM, failure.exitcode >= 0, failure.timestamp, rank)

    return min(failures.items(), key=key)


def failure_sentence(run_dir: Path, failures: dict) -> str:
    rank, failure = first_failure(failures)
    sentence = describe_rank_exit(rank, failure.pid, failure.exitcode)
    message = getattr(failure, "message", "") or ""
    if isinstance(message, dict):  # torch's own structured form (an exception recorded by @record)
        message = message.get("message", "")
    message = str(message)
    if failure.exitcode > 0 and message and "pytorch.org" not in message:
        sentence += f": {message.splitlines()[0][:300]}"
    others = sorted(r for r in failures if r != rank)
    world = f" (torchrun reported ranks {', '.join(map(str, [rank] + others))})" if others else ""
    step = rundir.read_run_status(run_dir, derive=False).step
    return (f"{sentence}{world}; accelerate's launcher stopped the other ranks. Last recorded step: {step}."
            + rundir.resume_hint(run_dir))


def run(run_dir: Path, resume: bool = False) -> int:
    """Launch every local rank through accelerate and wait; returns this process's exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    config = RunConfig.from_yaml(RunPaths(run_dir).config)
    rundir.write_launch_files(run_dir, config)  # a run made before they existed gets them now
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    for key, value in GPU_ORDER_ENV.items():
        os.environ.setdefault(key, value)
    from engine.config.gpus import visible_gpus

    if not visible_gpus() and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share this machine's cores (torchrun would give each one thread).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // config.distributed.num_processes))
    args = launch_command_parser().parse_args(launch_arguments(config, run_dir, 0, resume))
    try:
        launch_command(args)
    except ChildFailedError as error:
        recorded = rundir.read_run_status(run_dir, derive=False)
        rank, failure = first_failure(error.failures)
        if rank == 0 and failure.exitcode == EXIT_DUPLICATE:
            return EXIT_DUPLICATE  # another live worker owns the run: nothing here to record
        if recorded.ended and rank == 0 and failure.exitcode in (EXIT_FAILED, EXIT_STOPPED):
            return failure.exitcode  # rank 0 recorded the outcome itself (failed, or stopped before starting)
        update_launch(run_dir, "failed", message="Failed.", error=failure_sentence(run_dir, error.failures))
        return EXIT_FAILED
    except SignalException as error:  # the launcher itself was signalled: torchrun ended every rank first
        step = rundir.read_run_status(run_dir, derive=False).step
        update_launch(run_dir, "failed", unless_ended=True, message="Failed.",
                      error=f"accelerate's launcher received {error.sigval.name} and stopped every rank. Last "
                            f"recorded step: {step}." + rundir.resume_hint(run_dir))
        return EXIT_FAILED
    # Every rank exited 0 (a stopped run's ranks too, see the worker's main): rank 0's status says which.
    return EXIT_STOPPED if rundir.read_run_status(run_dir, derive=False).state == "stopped" else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.training.launch", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    try:
        return run(run_dir, resume=args.resume)
    except Exception as error:  # noqa: BLE001 - the run directory must say why accelerate did not start
        print(f"[{time.strftime('%H:%M:%S')}] launch failed: {error!r}", file=sys.stderr, flush=True)
        update_launch(run_dir, "failed", unless_ended=True, message="Failed.",
                      error=f"accelerate's launcher could not start the ranks: {error}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
