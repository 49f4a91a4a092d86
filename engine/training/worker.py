"""The training process: one per run, ``python -m engine.training.worker RUN_DIR [--resume]``.

Reads ``config.yaml`` from the run directory and writes everything else there: status
transitions, one metrics line per log/eval event, memory samples (a sampler thread), the
adapter, checkpoints and lineage.
It is TRL's ``SFTTrainer`` with a PEFT config (and bitsandbytes for QLoRA) plus a small
callback; the worker adds only what a dashboard needs around it — honest fallbacks when
the machine cannot do what was asked, a stop flag, and failures explained in words.

Read top to bottom: ``main`` -> ``run_training`` -> ``build_*`` helpers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from engine.config import RunConfig
from engine.config.build import (
    Runtime,
    boosters_line,
    decide_runtime,
    early_stopping_callback,
    early_stopping_on,
    model_load_kwargs,
    to_data_collator,
    to_lora_config,
    to_sft_config,
)
from engine.errors import LoraLabError
from engine.hub import resolve_model
from engine.training import devices, recovery, rundir, trackers
from engine.training.rundir import RunPaths
from engine.training.sampler import GpuSampler
from engine.training.task_eval import make_task_eval_callback, plan_task_eval

EXIT_FAILED = 1
EXIT_STOPPED = 3
EXIT_DUPLICATE = 4  # another live worker already owns this run: this one wrote nothing and left
SAMPLE_INTERVAL_S = 1.0  # memory samples per second into gpu.jsonl (what the Memory chart draws)


# ----------------------------------------------------------------------------- one writer per run
# A multi-GPU run starts this module once per process (accelerate's launcher sets RANK); rank 0 alone
# writes the run directory (status, metrics, memory samples, lineage, checkpoints' marks, the adapter's
# tokenizer), the other ranks train and stay silent unless they fail.
RANK = int(os.environ.get("RANK", "0"))
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
IS_MAIN = RANK == 0


def run_pid() -> int:
    """The pid that stands for the run: the multi-GPU launcher (whose process tree holds every rank), else this."""
    launcher = os.environ.get("LORALAB_LAUNCHER_PID", "")
    return int(launcher) if launcher.isdigit() and WORLD_SIZE > 1 else os.getpid()


def update_status(run_dir: Path, state: str | None = None, **values) -> None:
    """``rundir.update_status`` on rank 0; the other ranks of a multi-GPU run write nothing."""
    if IS_MAIN:
        rundir.update_status(run_dir, state, **values)


def add_fallback(run_dir: Path, sentence: str) -> None:
    if IS_MAIN:
        rundir.add_fallback(run_dir, sentence)


def log(message: str, every_rank: bool = False) -> None:
    """The worker's stdout is the run's train.log (the job manager redirects it to the file).

    The ranks of a multi-GPU run share it: rank 0 speaks, the others only when ``every_rank``."""
    if IS_MAIN or every_rank:
        who = f"[rank {RANK}] " if WORLD_SIZE > 1 else ""
        print(f"[{time.strftime('%H:%M:%S')}] {who}{message}", flush=True)


# ----------------------------------------------------------------------------- environment decisions
def record_runtime(run_dir: Path, runtime: Runtime) -> None:
    """Say every setting this machine cannot honour, in the log and in status.json."""
    for sentence in runtime.fallbacks:
        record_fallback(run_dir, sentence)


def record_fallback(run_dir: Path, sentence: str) -> None:
    log(f"fallback: {sentence}")
    add_fallback(run_dir, sentence)


# ----------------------------------------------------------------------------- builders
def build_datasets(config: RunConfig):
    """Train and eval rows through engine.data.load (the same code the Dataset tab uses)."""
    from datasets import Dataset

    from engine.data.load import load_dataset_rows, split_rows

    data = config.data
    train_loaded = load_dataset_rows(data.path, fmt=data.format, skip_bad=data.skip_bad_rows)
    rows, eval_rows, eval_loaded = train_loaded.rows, [], None
    if data.eval_path:
        eval_loaded = load_dataset_rows(data.eval_path, fmt=data.format, skip_bad=data.skip_bad_rows,
                                        split="eval" if data.eval_path == "demo" else "train")
        eval_rows = eval_loaded.rows
    elif data.eval_fraction > 0:
        rows, eval_rows = split_rows(rows, data.eval_fraction, config.train.seed)
    for warning in train_loaded.warnings:
        log(f"data warning: {warning}")
    lineage = {
        "train": train_loaded.lineage(),
        "eval": eval_loaded.lineage() if eval_loaded else (
            {"held_out_from_train": True, "eval_fraction": data.eval_fraction, "num_rows": len(eval_rows)}
            if eval_rows else None),
        "train_rows_used": len(rows),
    }
    # Keep only the column TRL needs: extra columns from user files would confuse its format detection.
    column = "text" if train_loaded.format == "text" else "messages"
    to_dataset = lambda items: Dataset.from_list([{column: r[column]} for r in items]) if items else None
    return to_dataset(rows), to_dataset(eval_rows), lineage


def build_model(config: RunConfig, model_path: str, runtime: Runtime):
    from transformers import AutoModelForCausalLM

    quantized = config.quant.load_in_4bit or config.quant.load_in_8bit
    if quantized:
        update_status(_RUN_DIR, message="Loading and quantizing the base model with bitsandbytes.")
    model = AutoModelForCausalLM.from_pretrained(model_path, **model_load_kwargs(config, runtime))
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Upcasts norms/embeddings to fp32 and wires input grads for checkpointing (QLoRA paper recipe).
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        keep_4bit_weights_trainable(model)
    return model


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights for inference in the middle of training; returns how many layers.

    Written by hand because no switch exists: on a CPU with AVX512-BF16, bitsandbytes 0.50's
    ``Linear4bit.forward`` repacks its weight into a CPU inference layout on the first forward
    in eval mode without gradients (the step-0 evaluation) and never packs it back, so every
    later training step runs through ``gemv_4bit``, which has no autograd kernel: the gradient
    through the frozen base weights is silently dropped (torch warns once) and QLoRA learns a
    fraction of what it should (tests/test_training.py's demo-qlora target catches it).
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def check_target_modules(model, config: RunConfig) -> None:
    """A named target the model lacks fails here, in words, before any training."""
    from engine.errors import ConfigError

    targets = config.lora.target_modules
    if targets == "all-linear":
        return
    import torch

    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__}
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise ConfigError("lora.target_modules",
                          f"{', '.join(missing)} not found in this model; its linear modules are "
                          f"{', '.join(sorted(linear_names))} (or use all-linear).")


# ----------------------------------------------------------------------------- the callback
def make_callback(run_dir: Path):
    """Writes metrics.jsonl and status.json, and turns a stop_request file into a graceful stop."""
    from transformers import TrainerCallback

    paths = RunPaths(run_dir)

    class RunDirectoryCallback(TrainerCallback):
        def __init__(self):
            self.started = time.time()
            self.last_time = None
            self.last_tokens = None
            self.first_step = None
            self.stop_requested = False
            self.evaluating = False  # in memory: a status read per eval batch was a file read per batch
            self.accelerator = None  # the trainer's, set once it exists (multi-GPU stop agreement)

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()
            self.first_step = state.global_step
            self.last_time, self.last_tokens = time.time(), state.num_input_tokens_seen
            update_status(run_dir, "training", step=state.global_step, max_steps=state.max_steps,
                          message="Training.", pid=run_pid())

        def _eta(self, state) -> float | None:
            done = state.global_step - (self.first_step or 0)
            if done <= 0 or not state.max_steps:
                return None
            return (time.time() - self.started) / done * (state.max_steps - state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            now = time.time()
            is_eval = any(k.startswith("eval_") for k in logs)
            record = {"event": "eval" if is_eval else "log", "step": state.global_step,
                      "epoch": round(state.epoch or 0.0, 4), "t": now, "elapsed_s": round(now - self.started, 3),
                      "eta_s": self._eta(state)}
            if is_eval:
                record["eval_loss"] = logs.get("eval_loss")
                record["eval_runtime_s"] = logs.get("eval_runtime")
            elif "loss" in logs:
                record.update(loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),
                              grad_norm=logs.get("grad_norm"))
                tokens = state.num_input_tokens_seen
                if tokens is not None and self.last_tokens is not None and now > self.last_time:
                    record["tokens_per_second"] = round((tokens - self.last_tokens) / (now - self.last_time), 2)
                record["tokens_seen"] = tokens
                self.last_time, self.last_tokens = now, tokens
            else:
                return  # the end-of-training summary; status.json carries it
            if not state.is_world_process_zero:
                return  # rank 0 writes the metrics (tokens are summed over every rank by transformers)
            record.update(_torch_memory())
            if args.world_size > 1:
                record["processes"] = args.world_size
            rundir.append_jsonl(paths.metrics, record)
            if is_eval and state.global_step == 0:
                update_status(run_dir, baseline_eval_loss=record["eval_loss"])
            update_status(run_dir, step=state.global_step, max_steps=state.max_steps, eta_s=record["eta_s"])

        def on_step_end(self, args, state, control, **kwargs):
            if self.stop_requested:
                return control
            asked = paths.stop_request.exists()
            if args.world_size > 1 and self.accelerator is not None:
                # Every rank must stop after the same step (a rank that went on would wait forever for the
                # others' gradients): accelerate's trigger sums the flag over the ranks, one tiny all-reduce.
                if asked:
                    self.accelerator.set_trigger()
                asked = self.accelerator.check_trigger()
            if asked:
                self.stop_requested = True
                log(f"stop requested: finishing step {state.global_step}, then saving")
                update_status(run_dir, "saving", message="Stop requested: saving the adapter and a checkpoint.")
                control.should_training_stop = True
                control.should_save = True
            return control

        def on_evaluate(self, args, state, control, **kwargs):
            self.evaluating = False
            if not self.stop_requested:
                update_status(run_dir, "training", message="Training.")

        def on_prediction_step(self, args, state, control, **kwargs):
            if not self.evaluating:
                self.evaluating = True
                update_status(run_dir, "evaluating", message="Evaluating on the held-out rows.")

        def on_save(self, args, state, control, **kwargs):
            log(f"checkpoint saved at step {state.global_step}")

    return RunDirectoryCallback()


def _torch_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"torch_allocated_bytes": torch.cuda.memory_allocated(),
            "torch_peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "torch_reserved_bytes": torch.cuda.memory_reserved()}


# ----------------------------------------------------------------------------- lineage
def write_lineage(paths: RunPaths, config: RunConfig, model_path: str, data_lineage: dict) -> None:
    from engine.lineage import model_lineage, software_lineage

    lineage = {"base_model": model_lineage(config.model.name_or_path, model_path, config.model.revision),
               "data": data_lineage, "software": software_lineage(), "method": config.method,
               "written_at": time.time()}
    if IS_MAIN:
        rundir.write_json_atomic(paths.lineage, lineage)


# ----------------------------------------------------------------------------- the run
_RUN_DIR: Path | None = None


def run_training(run_dir: Path, resume: bool = False) -> str:
    """Train; returns the final state ("completed" or "stopped"; "not started" when stopped while waiting for
    the device). Raises on failure."""
    global _RUN_DIR
    _RUN_DIR = run_dir
    paths = RunPaths(run_dir)
    update_status(run_dir, "loading", message="Loading the configuration.", pid=run_pid(), error=None)
    config = RunConfig.from_yaml(paths.config).validate()
    log(f"run {run_dir.name}: method {config.method}, base {config.model.name_or_path}")

    import torch
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    runtime = decide_runtime(config)
    record_runtime(run_dir, runtime)
    log(boosters_line(config))
    if IS_MAIN and not take_device(run_dir, runtime):  # rank 0 holds the device lock for the whole run
        update_status(run_dir, "stopped", message="Stopped while waiting for the device; nothing was trained.")
        paths.stop_request.unlink(missing_ok=True)
        return "not started"
    if IS_MAIN:  # transformers reports from rank 0 only; the other ranks leave the trackers alone
        trackers.prepare(run_dir, runtime, say=lambda sentence: record_fallback(run_dir, sentence))
    else:
        runtime.report_to = []
    update_status(run_dir, message="Finding the base model.")
    model_path = resolve_model(config.model.name_or_path, what="base model", log=log)
    update_status(run_dir, message="Reading and tokenizing the dataset.")
    train_dataset, eval_dataset, data_lineage = build_datasets(config)
    # Task metric: checked here (references, schema, pattern), before the model loads, so bad input fails in words.
    task_eval = plan_task_eval(config, eval_dataset)
    for note in task_eval.notes if task_eval else []:
        log(f"task eval: {note}")
    write_lineage(paths, config, model_path, data_lineage)
    log(f"data: {len(train_dataset)} train rows, {len(eval_dataset) if eval_dataset else 0} eval rows")

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=config.model.revision,
                                              trust_remote_code=config.model.trust_remote_code)
    too_short = task_eval.length_note(tokenizer) if task_eval else None
    if too_short:
        record_fallback(run_dir, too_short)
        log(f"task eval: {too_short}")
    update_status(run_dir, message="Loading the base model.")
    probe = None
    if config.train.memory_probe:  # a measurement run (engine.measurements): memory by phase, memory_probe.json
        from engine.training.probe import make_memory_probe

        probe = make_memory_probe(run_dir, runtime.as_dict())  # made before the weights load: the process baseline
    model = build_model(config, model_path, runtime)
    check_target_modules(model, config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the training peak, not the loading peak

    checkpoint = None
    if resume:  # the newest complete checkpoint; folders cut short are removed and said
        checkpoint, sentence = recovery.prepare_resume(run_dir)
        log(f"resuming from {checkpoint.name}" if checkpoint else "resume: no complete checkpoint")
        log(sentence)
        update_status(run_dir, message=sentence)
    args = to_sft_config(config, runtime, paths.checkpoints, has_eval=eval_dataset is not None,
                         resuming=checkpoint is not None)
    update_status(run_dir, message="Tokenizing the dataset.")
    if args.save_steps != config.train.save_steps:
        record_fallback(run_dir, f"train.save_steps is {config.train.save_steps}, not a multiple of train.eval_steps "
                                 f"({config.train.eval_steps}): checkpoints are saved at every evaluation instead, so "
                                 "early stopping can go back to the best one.")
    callback = make_callback(run_dir)
    # The task evaluation runs before the run-directory callback's on_evaluate puts the state back to "training",
    # and before early stopping, which reads the score it adds to the evaluation's metrics.
    callbacks = ([make_task_eval_callback(run_dir, task_eval, log)] if task_eval else []) + [callback]
    early_stop = early_stopping_callback(config, has_eval=eval_dataset is not None)
    callbacks += [early_stop] if early_stop else []
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=to_lora_config(config),
                         callbacks=callbacks + [recovery.callback()] + ([probe] if probe else []),
                         data_collator=to_data_collator(config, runtime, tokenizer))
    callback.accelerator = trainer.accelerator
    if WORLD_SIZE > 1:
        log(f"{config.distributed.strategy}: {WORLD_SIZE} processes ({trainer.accelerator.distributed_type}); "
            f"effective batch {effective_batch(config)} rows per optimizer step")
        update_status(run_dir, processes=WORLD_SIZE)
    trackers.guard(trainer, say=lambda sentence: record_fallback(run_dir, sentence))
    if hasattr(trainer.model, "get_nb_trainable_parameters"):  # a PeftModel
        trainable, total = trainer.model.get_nb_trainable_parameters()
    else:  # full fine-tuning
        total = sum(p.numel() for p in trainer.model.parameters())
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    update_status(run_dir, trainable_parameters=trainable, total_parameters=total)
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    if config.quant.load_in_4bit:
        import bitsandbytes as bnb

        # bitsandbytes' own layers only (PEFT's LoRA wrapper around each is also called Linear4bit).
        n4 = sum(1 for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit))
        log(f"bitsandbytes Linear4bit layers: {n4}")
        update_status(run_dir, linear4bit_layers=n4)

    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    update_status(run_dir, train_runtime_s=result.metrics.get("train_runtime"),
                  tokens_seen=trainer.state.num_input_tokens_seen)

    stopped = callback.stop_requested
    kept = kept_checkpoint(config, trainer.state) if early_stopping_on(config, eval_dataset is not None) else None
    if kept is None and not stopped and eval_dataset is not None and \
            trainer.state.global_step % config.train.eval_steps != 0:
        trainer.evaluate()  # the final eval loss, unless the last step just had one
    update_status(run_dir, "saving", message="Saving the adapter.")
    trainer.save_model(str(paths.adapter))
    if IS_MAIN:
        tokenizer.save_pretrained(str(paths.adapter))
    if stopped:
        trainer.save_state()  # transformers writes it on rank 0 only
        if IS_MAIN:
            paths.stop_request.unlink(missing_ok=True)
    final = "stopped" if stopped else "completed"
    message = ("Stopped on request; adapter and checkpoint saved. Resume continues from step "
               f"{trainer.state.global_step}.") if stopped else "Completed; adapter saved."
    if kept is not None:  # transformers loaded the best checkpoint at the end, on a stop request too
        message = f"{message} The adapter is the best checkpoint's, step {kept[0]}." if stopped else kept[1]
        log(message)
    update_status(run_dir, final, step=trainer.state.global_step, message=message,
                  **({"kept_step": kept[0]} if kept is not None else {}))
    log(f"run {final} at step {trainer.state.global_step}")
    return final


def effective_batch(config: RunConfig) -> int:
    """Rows per optimizer step over every process: per-device batch × accumulation × processes."""
    train = config.train
    return train.per_device_train_batch_size * train.gradient_accumulation_steps * config.distributed.world_size


def kept_checkpoint(config: RunConfig, state) -> tuple[int, str] | None:
    """Which step's adapter early stopping kept (transformers loaded the best checkpoint at the end), and why."""
    best = state.best_model_checkpoint
    if not best:
        return None
    step = int(Path(best).name.rsplit("-", 1)[-1])
    metric = config.eval.metric if config.train.early_stopping_metric == "task_score" else "eval_loss"
    value = f"{metric} {state.best_metric:.4f}" if state.best_metric is not None else metric
    patience = config.train.early_stopping_patience
    if state.global_step < state.max_steps:
        why = (f"Stopped early at step {state.global_step}: {metric} had not improved for {patience} "
               f"evaluation{'s' if patience != 1 else ''}.")
    else:
        why = f"Completed at step {state.global_step}."
    return step, f"{why} Kept the best checkpoint, step {step} ({value}); adapter saved from it."


def explain_failure(error: BaseException) -> str:
    """One paragraph a person can act on."""
    text = str(error)
    name = type(error).__name__
    if isinstance(error, LoraLabError):
        return text
    if "out of memory" in text.lower() or name == "OutOfMemoryError":
        return ("The GPU ran out of memory. Try QLoRA (4-bit base), a smaller per-device batch size with more "
                "gradient accumulation, a shorter max_length, or turn on gradient checkpointing. The Memory tab "
                "shows which term dominates. (" + text.splitlines()[0][:300] + ")")
    if isinstance(error, (FileNotFoundError, OSError)) and ("does not appear to have" in text or "not found" in text):
        return f"A file the run needs was not found: {text.splitlines()[0][:400]}"
    if isinstance(error, KeyboardInterrupt):
        return "The worker was interrupted."
    first = text.splitlines()[0][:400] if text else ""
    return f"Training failed with {name}: {first} The full traceback is in train.log."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.training.worker", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Held from the first instant to the last: readers know the worker is gone when they can take it.
    global _WORKER_LOCK
    if IS_MAIN:  # rank 0 stands for a multi-GPU run: its lock names the launcher, whose tree holds every rank
        try:
            _WORKER_LOCK = rundir.take_worker_lock(run_dir, pid=run_pid())
        except LoraLabError as error:
            print(f"[{time.strftime('%H:%M:%S')}] not started: {error}", file=sys.stderr, flush=True)
            return EXIT_DUPLICATE
    # The run's memory history, recorded from inside the run however it was started; with several ranks,
    # rank 0 samples every GPU for the launcher's whole process tree (one trace per GPU in gpu.jsonl).
    # Stopped before the process ends, so the last sample is a reading, not "process exited".
    sampler = GpuSampler(interval_s=SAMPLE_INTERVAL_S, history_s=60, run_dir=run_dir if IS_MAIN else None,
                         pid=run_pid(), on_write_error=recovery.note_write_error)
    if IS_MAIN:
        sampler.start()
    try:
        final = run_training(run_dir, resume=args.resume)
        # The ranks of a multi-GPU run exit 0 when stopped too: torchrun takes any other code for a failure and
        # would terminate the ranks still saving; rank 0's status says stopped, and the launcher exits by it.
        # Stopped before starting, rank 0 exits EXIT_STOPPED precisely so torchrun ends the ranks waiting for it.
        return 0 if final == "completed" or (final == "stopped" and WORLD_SIZE > 1) else EXIT_STOPPED
    except BaseException as error:  # noqa: BLE001 - the run directory must say why, whatever it was
        sampler.stop()  # no more gpu.jsonl appends while the failure is recorded (the disk may be full)
        # A full disk is cleaned up once, by rank 0; the other ranks only explain.
        reason = recovery.failure_reason(run_dir, error, _last_step(run_dir), explain_failure) if IS_MAIN \
            else explain_failure(error)
        if WORLD_SIZE > 1:
            record_rank_failure(reason)
        for say in (traceback.print_exc, lambda: log(f"failed: {reason}", every_rank=True)):
            try:
                say()
            except OSError:
                pass  # train.log may be on the full disk: status.json below is the record that counts
        if WORLD_SIZE > 1:
            reason = f"Rank {RANK} of {WORLD_SIZE}: {reason}"
        try:
            update_status(run_dir, "failed", message="Failed.", error=reason)
        except OSError:
            print(f"could not record the failure in status.json: {reason}", file=sys.__stderr__, flush=True)
        return EXIT_FAILED
    finally:
        sampler.stop()
        release_locks()


def record_rank_failure(reason: str) -> None:
    """Leave this rank's reason where torchrun looks for it (TORCHELASTIC_ERROR_FILE, its plain-message form), so
    the launcher's sentence about a failed rank says why; rank 0 also records it in status.json."""
    import json

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": reason, "timestamp": int(time.time())}), encoding="utf-8")
    except OSError:
        pass  # the launcher then names the rank and its exit code without the reason


def release_locks() -> None:
    """Give back the device and the run once the outcome is recorded.

    A worker process gives them back by exiting anyway; this matters when ``main`` runs inside
    another process (tests, a notebook), which would otherwise hold the device for its whole
    life and make every later run wait for it.
    """
    global _DEVICE_LOCK, _WORKER_LOCK
    if _DEVICE_LOCK is not None:
        _DEVICE_LOCK.release()
        _DEVICE_LOCK = None
    if _WORKER_LOCK is not None:
        _WORKER_LOCK.close()  # closing the file drops its flock
        _WORKER_LOCK = None


def _last_step(run_dir: Path) -> int:
    try:
        return rundir.read_run_status(run_dir, derive=False).step
    except OSError:
        return 0


# ----------------------------------------------------------------------------- one device, one owner
# Both held until the process ends: a reference each, or the lock would be dropped with its file.
_WORKER_LOCK = None
_DEVICE_LOCK = None


def take_device(run_dir: Path, runtime: Runtime) -> bool:
    """Own the training device before loading anything; wait (said in status) while another run has it.

    False when a stop was asked for while waiting.
    """
    global _DEVICE_LOCK
    paths = RunPaths(run_dir)

    def waiting(sentence: str) -> None:
        log(sentence)
        update_status(run_dir, message=sentence)

    _DEVICE_LOCK = devices.acquire(devices.device_key(runtime.device), run_dir, waiting,
                                   stop_asked=paths.stop_request.exists)
    return _DEVICE_LOCK is not None


if __name__ == "__main__":
    sys.exit(main())
