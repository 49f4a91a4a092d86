"""Predicted against measured training memory, on a CUDA GPU.

For a matrix of methods (full / LoRA / QLoRA) x catalog models (random weights from the
catalog configs) x sequence lengths x gradient checkpointing on and off, this runs a few
optimizer steps the way transformers' Trainer does (autocast, loss, backward, clip, step,
zero_grad) and prints the estimator's prediction next to

* ``torch.cuda.max_memory_allocated()`` over the steps (the estimator's ``peak_allocated_bytes``), and
* the GPU memory NVML reports as used, above what was used before the process started
  (the estimator's ``nvidia_smi_bytes``),

with the relative error of each. The target is a worst error of 5% on the allocated peak.
Each configuration runs in its own process so that one run's allocator cache, CUDA
context or paged optimizer state cannot leak into the next measurement.

    python bench/memory_accuracy.py                     # the default matrix (about 20 minutes on an H100)
    python bench/memory_accuracy.py --quick             # one model, one length
    python bench/memory_accuracy.py --models llama-3.1-8b --methods qlora --seq-lens 2048
    python bench/memory_accuracy.py --cpu               # no GPU: a small dry run against live CPU tensors

Without CUDA (and without --cpu) it says so and exits 0: the CPU proofs in
tests/test_memory.py hold without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.memory.arch import arch_from_config, load_arch
from engine.memory.estimator import GiB, MemorySettings, estimate

DEFAULT_MODELS = "llama-3.2-1b,llama-3.2-3b,llama-3.1-8b"
TARGET_WORST_ERROR = 0.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated catalog ids")
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--seq-lens", default="512,2048")
    parser.add_argument("--checkpointing", default="on,off", help="on, off or on,off")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3,
                        help="optimizer steps per configuration (states appear at the first)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--optimizer", default="adamw_torch_fused")
    parser.add_argument("--loss", default="chunked", choices=("chunked", "full_logits"))
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--cache-dir", default=os.environ.get("LORALAB_BENCH_CACHE",
                                                              str(Path(tempfile.gettempdir()) / "loralab-bench")),
                        help="random checkpoints for QLoRA are written here once per model")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="llama-3.2-1b at 1024 tokens only")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU: live tensors instead of CUDA")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration, print JSON
    return parser.parse_args(argv)


def matrix(args) -> list[dict]:
    models = ["llama-3.2-1b"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    seq_lens = [1024] if args.quick else [int(x) for x in args.seq_lens.split(",")]
    checkpointing = [c.strip() == "on" for c in args.checkpointing.split(",")]
    rows = []
    for model in models:
        for method in [m.strip() for m in args.methods.split(",")]:
            for seq_len in seq_lens:
                for ckpt in checkpointing:
                    rows.append({
                        "model": model,
                        "settings": asdict(MemorySettings(
                            method=method, rank=args.rank, alpha=2 * args.rank, batch_size=args.batch,
                            seq_len=seq_len, gradient_checkpointing=ckpt, optimizer=args.optimizer,
                            loss=args.loss, lora_dropout=args.lora_dropout,
                        )),
                    })
    return rows


# ----------------------------------------------------------------------------- one measurement
class NvmlPeak:
    """Polls NVML's used memory of GPU 0 in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.01):
        import pynvml  # nvidia-ml-py; engine/gpu.py uses the same package

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.interval = interval
        self.baseline = self.used()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def total(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).total)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.interval)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def measure_one(spec: dict, cache_dir: Path, steps: int) -> dict:
    """Build the model, run ``steps`` optimizer steps, return the peaks (runs in a child process)."""
    try:
        nvml = NvmlPeak()  # before CUDA is initialised: the baseline is other processes' memory
    except Exception as exc:  # noqa: BLE001 - no NVML: report the torch side only
        print(f"NVML unavailable ({exc}); reporting torch's peak only", file=sys.stderr)
        nvml = None
    import torch

    from bench.memory_harness import build_model, make_batch, make_optimizer, train_steps

    arch = load_arch(spec["model"])
    settings = MemorySettings(**spec["settings"])
    model = build_model(arch, settings, device="cuda", checkpoint_dir=cache_dir / arch.name)
    optimizer = make_optimizer(model, settings)
    batch = make_batch(arch, settings, device="cuda")
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if nvml:
        nvml.start()
    losses = train_steps(model, batch, settings, optimizer, steps=steps, device_type="cuda")
    torch.cuda.synchronize()
    if nvml:
        nvml.stop()
    return {
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
        "nvml_used": (nvml.peak - nvml.baseline) if nvml else None,
        "losses": losses,
        "device": torch.cuda.get_device_name(0),
    }


def gpu_capacity() -> tuple[int, str]:
    """Total memory and name of GPU 0, from NVML so that this process creates no CUDA context
    (the children measure; a context here would take their memory)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total), name.decode() if isinstance(name, bytes) else name
    except Exception:  # noqa: BLE001 - fall back to torch, at the cost of a context in this process
        import torch

        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)


def run_child(spec: dict, args) -> dict:
    command = [sys.executable, __file__, "--one", json.dumps(spec), "--cache-dir", args.cache_dir,
               "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {done.returncode}"}


# ----------------------------------------------------------------------------- CPU dry run
def cpu_dry_run(args) -> int:
    """The same comparison on the CPU against live tensors (LiveBytesTracker), with a small model."""
    import torch

    from bench.memory_harness import LiveBytesTracker, build_model, make_batch, make_optimizer, train_steps

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    arch = arch_from_config(dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
                                 max_position_embeddings=4096), name="small-llama")
    rows = []
    for method in ("full", "lora", "qlora"):
        for ckpt in (True, False):
            settings = MemorySettings(method=method, batch_size=2, seq_len=256, gradient_checkpointing=ckpt,
                                      loss=args.loss, device="cpu", optimizer="adamw_torch")
            predicted = estimate(arch, settings)
            model = build_model(arch, settings, checkpoint_dir=Path(args.cache_dir) / "cpu-small")
            optimizer = make_optimizer(model, settings)
            batch = make_batch(arch, settings)
            tracker = LiveBytesTracker()
            tracker.add_model(model)
            with tracker:
                train_steps(model, batch, settings, optimizer, steps=2, tracker=tracker)
            error = (predicted.peak_allocated_bytes - tracker.peak) / tracker.peak
            rows.append((method, ckpt, predicted.peak_allocated_bytes, tracker.peak, error))
            del model, optimizer
    print(f"{'method':<6} {'ckpt':<5} {'predicted MiB':>14} {'live MiB':>10} {'error':>7}")
    for method, ckpt, pred, meas, err in rows:
        print(f"{method:<6} {str(ckpt):<5} {pred / 2**20:>14.2f} {meas / 2**20:>10.2f} {err:>+7.1%}")
    worst = max(abs(r[4]) for r in rows)
    print(f"worst |error| {worst:.1%} (CPU dry run; CUDA kernels add their own workspaces)")
    return 0


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one), Path(args.cache_dir), args.steps)))
        return 0
    if args.cpu:
        return cpu_dry_run(args)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        print("No CUDA GPU here, so there is nothing to measure: this benchmark compares predictions with "
              "torch.cuda.max_memory_allocated and NVML. The CPU proofs (tests/test_memory.py) hold without a GPU; "
              "`python bench/memory_accuracy.py --cpu` runs a small dry run against live CPU tensors.")
        return 0
    capacity, name = gpu_capacity()
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    header = (f"{'model':<14} {'method':<6} {'len':>5} {'ckpt':<4} {'pred alloc':>10} {'torch max':>10} {'err':>7} "
              f"{'pred smi':>9} {'NVML used':>9} {'err':>7}  peak at")
    print(f"GPU: {name}, {capacity / GiB:.1f} GiB; {args.steps} steps per configuration")
    print(header)
    results = []
    for spec in matrix(args):
        arch = load_arch(spec["model"])
        settings = MemorySettings(**spec["settings"])
        predicted = estimate(arch, settings)
        s = spec["settings"]
        prefix = (f"{spec['model']:<14} {s['method']:<6} {s['seq_len']:>5} "
                  f"{'on' if s['gradient_checkpointing'] else 'off':<4}")
        if predicted.nvidia_smi_bytes > 0.97 * capacity:
            print(f"{prefix} skipped: predicted {predicted.nvidia_smi_bytes / GiB:.1f} GiB does not fit")
            continue
        measured = run_child(spec, args)
        if "error" in measured:
            print(f"{prefix} failed: {measured['error']}")
            continue
        err_alloc = (predicted.peak_allocated_bytes - measured["max_allocated"]) / measured["max_allocated"]
        used = measured["nvml_used"]
        err_smi = (predicted.nvidia_smi_bytes - used) / used if used else None
        nvml_text = f"{used / GiB:>9.2f} {err_smi:>+7.1%}" if used else f"{'n/a':>9} {'':>7}"
        print(f"{prefix} {predicted.peak_allocated_bytes / GiB:>10.2f} {measured['max_allocated'] / GiB:>10.2f} "
              f"{err_alloc:>+7.1%} {predicted.nvidia_smi_bytes / GiB:>9.2f} {nvml_text}  {predicted.peak_phase}",
              flush=True)
        results.append({**spec, "predicted_allocated": predicted.peak_allocated_bytes,
                        "predicted_nvidia_smi": predicted.nvidia_smi_bytes, "peak_phase": predicted.peak_phase,
                        "terms": predicted.terms, **measured, "error_allocated": err_alloc, "error_nvml": err_smi})
    if results:
        alloc = [abs(r["error_allocated"]) for r in results]
        smi = [abs(r["error_nvml"]) for r in results if r["error_nvml"] is not None] or [float("nan")]
        print(f"\nallocated: mean |error| {sum(alloc) / len(alloc):.1%}, worst {max(alloc):.1%} "
              f"(target worst {TARGET_WORST_ERROR:.0%}: {'met' if max(alloc) <= TARGET_WORST_ERROR else 'missed'})")
        print(f"NVML used: mean |error| {sum(smi) / len(smi):.1%}, worst {max(smi):.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
