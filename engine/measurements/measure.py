"""Full fine-tuning, LoRA and QLoRA measured side by side, beside the calculator's prediction.

``run_measurement(request, runs_dir)`` trains a few steps of the same model and settings
three times, once per method, each in its own worker process through the job manager
(``engine.training.jobs.JobManager``), with ``train.memory_probe`` on so the worker writes
``memory_probe.json`` (``engine.training.probe``). Then it sets what each run really held
beside ``engine.memory.estimate`` for the same config, batch shape and device, term by
term (weights; adapters, gradients and optimizer states; activations and temporaries),
and says the ratios in words.

A measurement is a folder, like a run::

    <runs_dir>/.measure/<id>/
      request.json     what was asked (model, settings, methods, steps), written first
      full/ lora/ qlora/   the three run directories (config, status, metrics, log, memory_probe.json)
      result.json      measured and predicted figures, ratios and sentences, written last

The dot keeps measurements out of the runs table; ``list_measurements`` and
``read_measurement`` read them back after a restart. The weights a measurement run saves
are deleted once it is read: a measurement keeps figures, not models.

Before anything starts, ``preflight`` predicts the largest of the three runs and refuses,
in a sentence naming both numbers, when it exceeds the memory this machine has available.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from engine.config import RunConfig
from engine.errors import ConfigError, LoraLabError, RunError
from engine.memory.arch import ModelArch, load_arch
from engine.memory.estimator import METHOD_LABELS, MemoryEstimate, MemorySettings, estimate, settings_from_run_config
from engine.names import name_problem
from engine.training import rundir
from engine.training.probe import read_probe

GIB = 2**30
MEASURE_DIRNAME = ".measure"
RESULT_FILE = "result.json"
REQUEST_FILE = "request.json"
RESULT_VERSION = 1
DEFAULT_MODEL = "smollm2-360m"  # 362 M parameters: big enough that 4-bit weights show, small enough for a CPU
METHODS = ("full", "lora", "qlora")
# A worker process holds about this much besides its tensors (Python, torch, transformers, TRL, the data):
# the CPU preflight adds it to the predicted tensor peak.
PROCESS_ALLOWANCE_BYTES = 1 * GIB
GROUPS = {
    "weights": "Weights (base model)",
    "trainable": "Adapters, gradients and optimizer states",
    "activations": "Activations and temporaries",
}
_PREDICTED_GROUPS = {
    "weights": ("quantized_weights", "quantization_constants", "weights_16_32bit"),
    "trainable": ("adapter_weights", "gradients", "optimizer_states", "optimizer_states_paged"),
    "activations": ("activations", "logits_and_loss", "transient_buffers", "library_workspaces"),
}
_MEASURED_TRAINABLE_TAGS = ("adapters", "gradients", "optimizer states", "optimizer step")
_lock = threading.Lock()  # one measurement at a time per process: they would disturb each other


def measurement_settings(**changes) -> MemorySettings:
    """The settings a measurement uses unless told otherwise: a short batch, so three runs take minutes on a CPU."""
    return replace(MemorySettings(method="lora", batch_size=1, seq_len=48, lora_dropout=0.0,
                                  gradient_checkpointing=True), **changes)


@dataclass
class MeasureRequest:
    """What to measure: a model (catalog id, folder, 'demo' or hub id), the settings, the methods, the steps."""

    model: str = DEFAULT_MODEL
    settings: MemorySettings = field(default_factory=measurement_settings)
    methods: tuple[str, ...] = METHODS
    steps: int = 2

    def check(self) -> MeasureRequest:
        """A copy with names canonicalised; raises ConfigError naming the field."""
        settings = self.settings.normalized()
        if settings.loss != "chunked":
            raise ConfigError("loss", "the training worker always uses TRL's chunked loss; measure with 'chunked'.")
        if settings.compute_dtype == "float16":
            raise ConfigError("compute_dtype", "training runs in bfloat16 or float32 (train.bf16); pick one of those.")
        methods = tuple(dict.fromkeys(str(m).strip().lower() for m in self.methods if str(m).strip()))
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError("methods", f"{', '.join(unknown) or 'nothing'} given; choose from {', '.join(METHODS)}.")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 50:
            raise ConfigError("steps", f"must be a whole number from 1 to 50, got {self.steps!r} "
                                       "(2 is enough: the second step runs with the optimizer states alive).")
        return replace(self, settings=settings, methods=methods)


# ----------------------------------------------------------------------------- configs and predictions
def run_config_for(model_path: str, settings: MemorySettings, method: str, steps: int) -> RunConfig:
    """The RunConfig of one measurement run: ``settings`` as training fields (the inverse of
    ``settings_from_run_config``), on the demo data, no evaluation, with the memory probe on."""
    s = settings.normalized()
    config = RunConfig()
    config.set_method(method)
    config.description = f"memory measurement: {METHOD_LABELS[method]}"
    config.model.name_or_path = model_path
    config.model.attn_implementation = {"flash": "flash_attention_2"}.get(s.attn, s.attn)
    config.data.path, config.data.eval_path, config.data.eval_fraction = "demo", None, 0.0
    lora, quant, train = config.lora, config.quant, config.train
    lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_dora = s.rank, float(s.alpha), s.lora_dropout, s.dora
    lora.target_modules = s.targets if isinstance(s.targets, str) else list(s.targets)
    quant.bnb_4bit_use_double_quant = s.double_quant
    quant.bnb_4bit_compute_dtype = s.compute_dtype
    train.max_steps = steps
    train.per_device_train_batch_size = s.batch_size
    train.gradient_accumulation_steps = s.grad_accum
    train.max_length = s.seq_len
    train.gradient_checkpointing = s.gradient_checkpointing
    train.optim = {"adamw_8bit": "adamw_bnb_8bit"}.get(s.optimizer, s.optimizer)
    train.bf16 = s.compute_dtype == "bfloat16"
    # Memory does not care which tokens are trained; the whole row is, so truncated rows are never dropped.
    train.assistant_only_loss = False
    train.packing = False
    train.logging_steps = 1
    train.save_steps = steps + 1  # no checkpoint on the way (the probe skips the final one)
    train.warmup_steps = 0
    train.memory_probe = True
    return config.validate()


def predicted_settings(config: RunConfig, runtime: dict, batch_shape: list | None = None) -> MemorySettings:
    """MemorySettings of what a run really did: the config after this machine's fallbacks, and the batch it trained."""
    effective = RunConfig.from_dict(config.to_dict())
    effective.train.bf16 = bool(runtime.get("bf16", effective.train.bf16))
    effective.train.optim = runtime.get("optim") or effective.train.optim
    effective.quant.bnb_4bit_compute_dtype = runtime.get("compute_dtype") or effective.quant.bnb_4bit_compute_dtype
    _, settings = settings_from_run_config(effective)
    device = "cuda" if str(runtime.get("device", "cpu")).startswith("cuda") else "cpu"
    settings = replace(settings, device=device, optimizer={"adamw_bnb_8bit": "adamw_8bit"}.get(settings.optimizer,
                                                                                            settings.optimizer))
    if batch_shape and batch_shape[0] and batch_shape[1]:
        settings = replace(settings, batch_size=int(batch_shape[0]), seq_len=int(batch_shape[1]),
                           padded=settings.padded and int(batch_shape[0]) > 1)
    return settings


def predicted_groups(est: MemoryEstimate) -> dict[str, int]:
    """The estimate's terms at its peak, in the three groups the measurement can tell apart."""
    return {group: sum(est.terms.get(term, 0) for term in terms) for group, terms in _PREDICTED_GROUPS.items()}


def measured_groups(probe: dict, peak: int) -> dict[str, int]:
    """What was alive at the measured peak, by group (the tracker's tags at that moment)."""
    at_peak = (probe.get("live") or {}).get("at_peak") or {}
    weights = int(at_peak.get("weights", 0))
    trainable = sum(int(at_peak.get(tag, 0)) for tag in _MEASURED_TRAINABLE_TAGS)
    return {"weights": weights, "trainable": trainable, "activations": max(0, peak - weights - trainable)}


# ----------------------------------------------------------------------------- this machine
def machine_memory() -> tuple[str, int, str]:
    """(device, bytes available for a measurement, where that number comes from).

    On a GPU the free memory comes from NVML when it can (no CUDA context in this process, so
    a dashboard that measured does not hold VRAM afterwards), else from torch.cuda.mem_get_info.
    """
    import psutil
    import torch

    if torch.cuda.is_available():
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                # The worker trains on CUDA device 0: the first of CUDA_VISIBLE_DEVICES (NVML ignores that variable).
                visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
                handle = (pynvml.nvmlDeviceGetHandleByUUID(visible) if visible.startswith(("GPU-", "MIG-"))
                          else pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0))
                name = pynvml.nvmlDeviceGetName(handle)
                free = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
            finally:
                pynvml.nvmlShutdown()
            name = name.decode() if isinstance(name, bytes) else str(name)
            return "cuda", free, f"free memory of {name} (NVML, the figure torch.cuda.mem_get_info reports)"
        except Exception:  # noqa: BLE001 - no NVML here: ask CUDA itself
            free, _total = torch.cuda.mem_get_info()
            return "cuda", int(free), f"free memory of {torch.cuda.get_device_name()} (torch.cuda.mem_get_info)"
    return "cpu", int(psutil.virtual_memory().available), "available RAM (psutil.virtual_memory().available)"


def preflight(request: MeasureRequest, arch: ModelArch, device: str, available: int, source: str) -> dict[str, int]:
    """Predict each run before any starts; raise a sentence when the largest does not fit. Returns bytes per method.

    Each prediction is for the run as this machine will do it: its RunConfig after ``decide_runtime``'s
    fallbacks (on a CPU: float32, no CUDA optimizers).
    """
    from engine.config.build import decide_runtime

    needed = {}
    for method in request.methods:
        config = run_config_for(request.model, request.settings, method, request.steps)
        runtime = decide_runtime(config, device=device)
        est = estimate(arch, predicted_settings(config, runtime.as_dict()))
        needed[method] = (est.nvidia_smi_bytes if device == "cuda"
                          else est.peak_allocated_bytes + PROCESS_ALLOWANCE_BYTES)
    largest = max(needed, key=needed.get)
    if needed[largest] > available:
        fits = [m for m in request.methods if needed[m] <= available]
        what = ("GPU memory (predicted nvidia-smi peak)" if device == "cuda"
                else f"RAM (predicted tensor peak plus {PROCESS_ALLOWANCE_BYTES / GIB:.0f} GiB for the worker process)")
        short = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
        others = " and ".join(f"{short[m]} {format_gib(needed[m])}" for m in request.methods if m != largest)
        advice = (f" Measure only {', '.join(fits)} (--methods {','.join(fits)}), or pick a smaller model." if fits
                  else f" Pick a smaller model (for example {DEFAULT_MODEL}) or a shorter batch.")
        raise LoraLabError(
            f"Measuring {arch.name} is refused: {METHOD_LABELS[largest]} needs about {format_gib(needed[largest])} "
            f"({needed[largest]:,} bytes) of {what}, but this machine has {format_gib(available)} "
            f"({available:,} bytes) of {source}." + (f" The others need {others}." if others else "")
            + advice)
    return needed


def format_gib(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GIB:.2f} GiB" if abs(n) >= 0.1 * GIB else f"{n / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- the model
def prepare_model(model: str, arch: ModelArch, log: Callable[[str], None] = print, timeout_s: float = 1800) -> str:
    """The folder (or name) the three runs load: a catalog id becomes a random-weight model of that
    architecture, built once in its own process (so the dashboard never holds those weights) and cached."""
    from engine.memory.arch import catalog_id_for

    catalog_id = catalog_id_for(model) if model != "demo" and not Path(model).expanduser().exists() else None
    if catalog_id is None:
        return str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
    from engine.memory.random_model import RANDOM_MODEL_VERSION, random_models_dir

    folder = random_models_dir() / catalog_id
    marker = folder / "lora_lab_random.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == RANDOM_MODEL_VERSION:
        return str(folder)
    free = shutil.disk_usage(random_models_dir().parent if random_models_dir().parent.exists() else Path.cwd()).free
    need = 2 * arch.total_params + 64 * 2**20
    if need > free:
        raise LoraLabError(f"Building a random-weight {catalog_id} needs {format_gib(need)} of disk for its bf16 "
                           f"weights, but {format_gib(free)} is free under {random_models_dir().parent}.")
    log(f"Building a random-weight {catalog_id} ({arch.total_params / 1e6:.0f} M parameters; once, cached in "
        f"{folder}).")
    done = subprocess.run([sys.executable, "-m", "engine.memory.random_model", catalog_id], capture_output=True,
                          text=True, timeout=timeout_s, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise LoraLabError(f"Building the random-weight {catalog_id} failed: "
                           f"{(done.stderr.strip().splitlines() or ['no output'])[-1][:400]}")
    return done.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- running
def measurements_dir(runs_dir: Path) -> Path:
    return Path(runs_dir) / MEASURE_DIRNAME


def new_measurement_id(model: str) -> str:
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(model).name)[:40].strip("-.") or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


def run_measurement(request: MeasureRequest, runs_dir: Path, progress: Callable[[str], None] = print,
                    jobs_busy: Callable[[], str | None] | None = None, cancel: threading.Event | None = None,
                    timeout_s: float = 3600) -> dict:
    """Measure, save ``result.json`` and return it. Raises LoraLabError with a sentence when refused.

    ``jobs_busy`` returns the name of a training run in progress elsewhere (the dashboard's
    job manager), which would disturb the measurement: then it is refused.
    """
    from engine.training.jobs import JobManager

    request = request.check()
    if not _lock.acquire(blocking=False):
        raise RunError("A measurement is already running in this process; wait for it to finish.")
    try:
        busy = jobs_busy() if jobs_busy else None
        if busy:
            raise RunError(f"Training run '{busy}' is in progress; a measurement needs the machine's memory to "
                           "itself. Measure when it has finished.")
        started = time.time()
        arch = load_arch(request.model)
        device, available, source = machine_memory()
        predicted_need = preflight(request, arch, device, available, source)
        model_path = prepare_model(request.model, arch, log=progress)
        folder = measurements_dir(runs_dir) / new_measurement_id(request.model)
        folder.mkdir(parents=True, exist_ok=False)
        rundir.write_json_atomic(folder / REQUEST_FILE, {
            "version": RESULT_VERSION, "model": request.model, "model_path": model_path,
            "settings": asdict(request.settings), "methods": list(request.methods), "steps": request.steps,
            "device": device, "available_bytes": available, "available_source": source,
            "preflight_bytes": predicted_need, "created_at": started, "pid": os.getpid()})
        # Each worker samples its own memory (NVML on a GPU, else RSS) into its gpu.jsonl.
        jobs = JobManager(folder, recover=False)
        run_dirs = {m: jobs.submit(run_config_for(model_path, request.settings, m, request.steps), name=m)
                    for m in request.methods}
        _wait(jobs, run_dirs, progress, cancel, timeout_s)
        result = build_result(folder)
        for run_dir in run_dirs.values():  # the figures are read; the weights a run saved are not needed
            shutil.rmtree(rundir.RunPaths(run_dir).adapter, ignore_errors=True)
            shutil.rmtree(rundir.RunPaths(run_dir).checkpoints, ignore_errors=True)
        result["wall_s"] = round(time.time() - started, 1)
        result["cpu_seconds"] = round(sum((m.get("measured") or {}).get("cpu_seconds") or 0
                                          for m in result["methods"].values()), 1)
        rundir.write_json_atomic(folder / RESULT_FILE, result)
        progress(" ".join(result["summary"]))
        return result
    finally:
        _lock.release()


def _wait(jobs, run_dirs: dict[str, Path], progress, cancel, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    last = None
    try:
        while True:
            jobs.poll()
            states = {m: rundir.read_status(d).get("state") for m, d in run_dirs.items()}
            if all(state in rundir.TERMINAL_STATES for state in states.values()):
                return
            line = ", ".join(f"{m}: {s}" for m, s in states.items())
            active = jobs.active_name()
            if active:
                status = rundir.read_status(run_dirs[active])
                line += f" — {active} step {status.get('step', 0)}/{status.get('max_steps') or '?'}"
            if line != last:
                progress(line)
                last = line
            if (cancel is not None and cancel.is_set()) or time.time() > deadline:
                raise RunError("The measurement was cancelled." if cancel is not None and cancel.is_set() else
                               f"The measurement took longer than {timeout_s:.0f} s and was stopped.")
            time.sleep(0.5)
    except BaseException:
        for method in reversed(list(run_dirs)):  # queued runs leave the queue, the running one is killed
            try:
                jobs.stop(method, force=True)
            except LoraLabError:
                pass
        raise


# ----------------------------------------------------------------------------- results
def build_result(folder: Path) -> dict:
    """result.json's content from a measurement folder: each run's probe beside its prediction."""
    request = rundir.read_json(Path(folder) / REQUEST_FILE) or {}
    arch = None
    try:
        arch = load_arch(request.get("model_path") or request.get("model", ""))
    except LoraLabError:
        pass
    methods = {}
    for method in request.get("methods", []):
        run_dir = Path(folder) / method
        methods[method] = method_result(run_dir, method, arch)
    model = request.get("model") or ""
    result = {
        "version": RESULT_VERSION,
        "id": Path(folder).name,
        "model": model,
        "model_name": arch.name if arch else Path(model).name,
        "model_path": request.get("model_path"),
        "parameters": arch.total_params if arch else None,
        "settings": request.get("settings"),
        "steps": request.get("steps"),
        "device": request.get("device"),
        "available_bytes": request.get("available_bytes"),
        "available_source": request.get("available_source"),
        "created_at": request.get("created_at"),
        "finished_at": time.time(),
        "methods": methods,
    }
    result["ratios"] = ratios(methods)
    result["summary"] = summary_sentences(result)
    result["notes"] = []
    requested = (request.get("settings") or {}).get("seq_len")
    shapes = [(m.get("measured") or {}).get("batch_shape") for m in methods.values()]
    trained = max((shape[1] for shape in shapes if shape), default=None)
    if requested and trained and trained < requested:
        result["notes"].append(f"The demo rows are shorter than {requested} tokens: the runs trained batches of "
                               f"{trained} tokens (no padding to the maximum), and the predictions are for that "
                               "length.")
    return result


def method_result(run_dir: Path, method: str, arch: ModelArch | None) -> dict:
    """One run: its state, what the probe measured, and the prediction for what it really did."""
    status = rundir.read_status(run_dir)
    entry: dict = {"run": run_dir.name, "label": METHOD_LABELS[method], "state": status.get("state"),
                   "error": status.get("error"), "fallbacks": status.get("fallbacks", [])}
    probe = read_probe(run_dir)
    config = None
    try:
        config = rundir.load_config(run_dir)
    except (LoraLabError, OSError):
        pass
    if probe and probe.get("live"):
        cuda = probe.get("cuda") or {}
        tensors, rss = probe.get("tensors") or {}, probe.get("rss") or {}
        peak = int(cuda.get("max_allocated_bytes") or probe["live"]["peak_bytes"])
        entry["measured"] = {
            "peak_bytes": peak,
            "peak_source": "torch.cuda.max_memory_allocated" if cuda.get("max_allocated_bytes") else
            "tracked live tensors (rounded to 512 bytes like the CUDA allocator)",
            "peak_phase": probe["live"].get("peak_phase"),
            "groups": measured_groups(probe, peak),
            "weights_bytes": tensors.get("weights_bytes"),
            "adapter_bytes": tensors.get("adapter_bytes"),
            "gradient_bytes": tensors.get("gradient_bytes"),
            "optimizer_state_bytes": tensors.get("optimizer_state_bytes"),
            "trainable_parameters": tensors.get("trainable_parameters"),
            "phase_peaks": probe["live"].get("phase_peaks"),
            "rss_baseline_bytes": rss.get("baseline_bytes"),
            "rss_weights_bytes": _minus(rss.get("after_load_bytes"), rss.get("baseline_bytes")),
            "rss_peak_minus_baseline_bytes": _minus(rss.get("train_peak_bytes"), rss.get("baseline_bytes")),
            "rss_source": rss.get("source"),
            "cuda": cuda or None,
            "batch_shape": probe.get("batch_shape"),
            "cpu_seconds": probe.get("cpu_seconds"),
            "wall_seconds": _minus(status.get("ended_at"), status.get("worker_started_at")),
        }
        nvml, source = rundir.peak_memory(rundir.read_gpu_samples(run_dir))
        if nvml and source == "nvml":
            entry["measured"]["nvml_peak_bytes"] = nvml
    if config is not None and arch is not None:
        runtime = (probe or {}).get("runtime") or {}
        shape = (probe or {}).get("batch_shape")
        settings = predicted_settings(config, runtime or {"device": "cpu", "bf16": False}, shape)
        est = estimate(arch, settings)
        entry["predicted"] = {
            "peak_bytes": est.peak_allocated_bytes,
            "nvidia_smi_bytes": est.nvidia_smi_bytes,
            "peak_phase": est.peak_phase,
            "groups": predicted_groups(est),
            "weights_bytes": predicted_groups(est)["weights"],
            "settings": {k: v for k, v in asdict(settings).items()},
        }
    return entry


def _minus(a, b):
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _ratio(a, b) -> float | None:
    return round(a / b, 2) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def ratios(methods: dict) -> dict:
    """How many times less (or more) one method needs than another: measured and predicted."""
    out = {}

    def figure(method, kind, key):
        entry = methods.get(method, {}).get(kind) or {}
        return entry.get(key)

    for name, (big, small) in {"lora_over_qlora": ("lora", "qlora"), "full_over_lora": ("full", "lora"),
                               "full_over_qlora": ("full", "qlora")}.items():
        if big in methods and small in methods:
            out[name] = {
                "peak": {"measured": _ratio(figure(big, "measured", "peak_bytes"),
                                            figure(small, "measured", "peak_bytes")),
                         "predicted": _ratio(figure(big, "predicted", "peak_bytes"),
                                             figure(small, "predicted", "peak_bytes"))},
                "weights": {"measured": _ratio(figure(big, "measured", "weights_bytes"),
                                               figure(small, "measured", "weights_bytes")),
                            "predicted": _ratio(figure(big, "predicted", "weights_bytes"),
                                                figure(small, "predicted", "weights_bytes"))},
                "rss": {"measured": _ratio(figure(big, "measured", "rss_peak_minus_baseline_bytes"),
                                           figure(small, "measured", "rss_peak_minus_baseline_bytes"))},
            }
    return out


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}×"


def _less_or_more(value: float | None) -> str:
    """'3.4× less' for a ratio above 1, '1.3× more' below it (the inverse), 'as much' at 1.0."""
    if value is None:
        return "n/a"
    if round(value, 1) == 1.0:
        return "about as much"
    return f"{value:.1f}× less" if value > 1 else f"{1 / value:.1f}× more"


def summary_sentences(result: dict) -> list[str]:
    """The ratios in words, e.g. "QLoRA used 3.4× less than LoRA; predicted 3.6×."."""
    methods, r = result.get("methods", {}), result.get("ratios", {})
    sentences = []
    failed = [f"{entry['label']} did not finish ({entry.get('state')}): {entry.get('error') or 'see its train.log'}"
              for entry in methods.values() if entry.get("state") != "completed"]
    what = "peak GPU memory (torch)" if result.get("device") == "cuda" else "peak tensor memory"
    if "lora_over_qlora" in r and r["lora_over_qlora"]["peak"]["measured"]:
        q = r["lora_over_qlora"]
        sentences.append(f"QLoRA used {_less_or_more(q['peak']['measured'])} {what} than LoRA; "
                         f"predicted {_times(q['peak']['predicted'])}.")
        sentences.append(f"Weights alone: QLoRA held {_less_or_more(q['weights']['measured'])} than LoRA; "
                         f"predicted {_times(q['weights']['predicted'])}.")
    if "full_over_lora" in r and r["full_over_lora"]["peak"]["measured"]:
        f = r["full_over_lora"]
        sentences.append(f"Full fine-tuning used {_times(f['peak']['measured'])} more than LoRA; "
                         f"predicted {_times(f['peak']['predicted'])}.")
    if "lora_over_qlora" in r and r["lora_over_qlora"]["rss"]["measured"]:
        sentences.append("Process RAM (peak RSS minus the process baseline): QLoRA "
                         f"{_less_or_more(r['lora_over_qlora']['rss']['measured'])} than LoRA.")
    return sentences + failed


def read_measurement(folder: Path) -> dict:
    """A saved measurement (result.json), or what its folder says when it has none (running or interrupted)."""
    folder = Path(folder)
    result = rundir.read_json(folder / RESULT_FILE)
    if result:
        result["state"] = "complete"
        return result
    request = rundir.read_json(folder / REQUEST_FILE)
    if not request:
        raise RunError(f"{folder} is not a measurement (no {REQUEST_FILE}).")
    states = {m: rundir.read_status(folder / m).get("state") for m in request.get("methods", [])}
    # Running while the process that measures is alive; after a restart it never finishes: incomplete.
    running = bool(request.get("pid")) and psutil.pid_exists(request["pid"])
    return {"id": folder.name, "model": request.get("model"), "model_name": Path(request.get("model") or "").name,
            "created_at": request.get("created_at"), "state": "running" if running else "incomplete",
            "runs": states, "methods": {}, "summary": [], "settings": request.get("settings")}


def resolve_measurement(runs_dir: Path, name: str) -> Path:
    if name_problem(name):
        raise RunError(f"'{name}' is not a measurement id (letters, digits, '-', '_', '.').")
    folder = measurements_dir(runs_dir) / name
    if not folder.is_dir():
        raise RunError(f"No measurement named '{name}' in {measurements_dir(runs_dir)}.")
    return folder


def list_measurements(runs_dir: Path) -> list[dict]:
    """Saved measurements, newest first: id, model, state, when, and the headline sentence."""
    root = measurements_dir(runs_dir)
    found = []
    for folder in sorted(root.iterdir() if root.is_dir() else [], reverse=True):
        if not folder.is_dir() or name_problem(folder.name):
            continue
        try:
            result = read_measurement(folder)
        except LoraLabError:
            continue
        found.append({"id": folder.name, "model": result.get("model"), "state": result.get("state"),
                      "created_at": result.get("created_at"), "device": result.get("device"),
                      "headline": (result.get("summary") or [""])[0], "wall_s": result.get("wall_s")})
    return found


def measurement_table(result: dict) -> list[list]:
    """Rows for the tab and the CLI: per method, predicted against measured, group by group."""
    rows = []
    for method, entry in result.get("methods", {}).items():
        measured, predicted = entry.get("measured") or {}, entry.get("predicted") or {}
        row = [entry.get("label", method)]
        for group in GROUPS:
            row += [format_gib((predicted.get("groups") or {}).get(group)),
                    format_gib((measured.get("groups") or {}).get(group))]
        row += [format_gib(predicted.get("peak_bytes")), format_gib(measured.get("peak_bytes")),
                _error(predicted.get("peak_bytes"), measured.get("peak_bytes")),
                format_gib(measured.get("rss_peak_minus_baseline_bytes"))]
        rows.append(row)
    return rows


# "trainable state": adapters, gradients and optimizer states; "activations": activations and temporaries.
TABLE_HEADERS = ["method", "weights pred.", "weights meas.", "trainable state pred.", "trainable state meas.",
                 "activations pred.", "activations meas.", "peak pred.", "peak meas.", "peak error",
                 "peak RSS − baseline"]


def _error(predicted, measured) -> str:
    if not predicted or not measured:
        return ""
    return f"{(predicted - measured) / measured:+.0%}"


def format_result(result: dict) -> str:
    """The measurement as text (the CLI's output)."""
    lines = [f"measurement {result.get('id')}: {result.get('model_name') or result.get('model')} "
             f"({(result.get('parameters') or 0) / 1e6:.0f} M parameters) on {result.get('device')}, "
             f"{result.get('steps')} steps, state {result.get('state', 'complete')}"]
    if result.get("wall_s"):
        lines[0] += f", {result['wall_s']:.0f} s ({result.get('cpu_seconds') or 0:.0f} CPU-seconds in the workers)"
    widths = [26, 11, 11, 11, 11, 11, 11, 11, 11, 7, 11]
    short = ["method", "w pred", "w meas", "a+g+o pred", "a+g+o meas", "act pred", "act meas", "peak pred",
             "peak meas", "error", "RSS-base"]
    lines.append("".join(h.ljust(w) for h, w in zip(short, widths)))
    for row in measurement_table(result):
        lines.append("".join(str(v).ljust(w) for v, w in zip(row, widths)))
    lines.append("w: weights; a+g+o: adapters, gradients and optimizer states; act: activations and temporaries "
                 "(at the peak). RSS-base: the worker's peak resident memory minus its baseline before the weights "
                 "loaded.")
    lines += result.get("summary", [])
    lines += ["note: " + note for note in result.get("notes", [])]
    for entry in result.get("methods", {}).values():
        for sentence in entry.get("fallbacks", []):
            if sentence not in lines and "note: " + sentence not in lines:
                lines.append("note: " + sentence)
    return "\n".join(lines)
