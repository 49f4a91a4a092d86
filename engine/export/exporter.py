"""Export a run as something to ship: the adapter package, or a merged standalone model.

Every export is a deploy unit: weights, tokenizer with its chat template, a model card
(``README.md``) and ``lineage.json`` naming the exact base model, adapter, data, metrics
and software. Every export is verified before it is kept (``engine.export.verify``):
it is reloaded from disk and must reproduce the run's model within a tolerance derived
from the stored dtype; an export that does not is deleted and the error says by how much.

Work happens in a hidden staging folder inside the exports directory and is renamed
into place only after verification, so a half-written or failed export is never seen
under its name. Export names are confined to the exports directory. One export runs at a
time per exports directory, across processes (``engine.export.lock``).

``python -m engine export RUN [--merged] [--dtype bf16] ...`` is ``engine.export.cli``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.chat.ratings import win_rate_record
from engine.errors import RunError
from engine.export.lock import export_lock
from engine.names import check_name
from engine.training import rundir

KINDS = ("adapter", "merged")
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
SPACE_MARGIN = 1.05  # headroom on free-space checks: file system metadata, tokenizer, card
MIN_SHARD_BYTES = 10**6
Progress = Callable[[float, str], None]


class ExportError(RunError):
    """An export cannot be made as asked; the message says why and what to do."""


@dataclass
class ExportResult:
    name: str
    kind: str
    path: Path
    dtype: str
    report: object  # engine.export.verify.VerificationReport
    lineage: dict
    size_bytes: int

    def summary(self) -> str:
        return (f"Exported {self.kind} '{self.name}' to {self.path} ({self.size_bytes / 2**20:.1f} MiB, "
                f"{self.dtype}). {self.report.sentence()}")


def _no_progress(fraction: float, message: str) -> None:
    pass


# ----------------------------------------------------------------------------- names and places
def safe_export_dir(exports_dir: Path, name: str) -> Path:
    """The folder for export ``name``; anything that could leave ``exports_dir`` is refused."""
    name = check_name(name if isinstance(name, str) else "", "export", ExportError)
    if name.lower().endswith(".zip"):
        raise ExportError(f"'{name}' is not a valid export name: it ends in .zip (the download of an export is "
                          "named <name>.zip).")
    root = Path(exports_dir).resolve()
    target = (root / name).resolve()
    if target.parent != root:  # a symlink planted in the exports folder, say
        raise ExportError(f"'{name}' would resolve outside the exports folder {root}.")
    return target


def default_export_name(run_name: str, kind: str, dtype: str = "bf16") -> str:
    suffix = "-adapter" if kind == "adapter" else f"-merged-{dtype}"
    return run_name[: 100 - len(suffix)] + suffix


def normalise_dtype(dtype: str) -> str:
    """'bf16' / 'fp16' (or their torch names) -> the torch dtype name."""
    value = (dtype or "").strip().lower()
    if value in DTYPES:
        return DTYPES[value]
    if value in DTYPES.values():
        return value
    raise ExportError(f"dtype '{dtype}' is not supported for a merged model: use bf16 or fp16.")


def parse_shard_size(size: str) -> int:
    """'2GB', '500 MB', '1GiB' -> bytes, by transformers' own parser, refused in words below 1 MB.

    The bytes (not the text) go to ``save_pretrained``: in transformers 5 it hands a text size
    to huggingface_hub's parser, which knows no GiB/MiB. Units are read case-insensitively, as
    this field always has: transformers would read a lowercase 'b' as bits ('2gb' as 250 MB).
    """
    from transformers.utils.hub import convert_file_size_to_int

    text = str(size or "").strip().upper()
    try:
        number = convert_file_size_to_int(text)
    except ValueError:
        raise ExportError(f"max shard size '{size}' is not understood: write a whole number and a unit, e.g. 2GB, "
                          "500MB or 1GiB.") from None
    if number < MIN_SHARD_BYTES:
        raise ExportError(f"max shard size '{size}' is below 1MB; shards that small only make loading slower.")
    return number


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * SPACE_MARGIN:
        raise ExportError(f"Not enough free disk space in {folder}: {what} needs about "
                          f"{needed_bytes * SPACE_MARGIN / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are free.")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the run side
def adapter_missing_reason(run_dir: Path) -> str:
    """Why a run has nothing to export, in words a person can act on."""
    run_dir = Path(run_dir)
    status = rundir.read_status(run_dir)
    state, name = status.get("state", "unknown"), run_dir.name
    where = rundir.RunPaths(run_dir).adapter
    if state in ("queued",) + rundir.ACTIVE_STATES:
        return (f"Run '{name}' has no adapter yet: it is {state}. The adapter is saved when training ends or is "
                "stopped; export it then.")
    if state == "failed":
        error = status.get("error") or "no error was recorded"
        return f"Run '{name}' has no adapter to export: it failed before saving one ({error})."
    return (f"Run '{name}' has no adapter to export: {where} holds no adapter_config.json with adapter weights "
            f"(the run is {state}). Train or resume it to completion first.")


def exportable_runs(runs_dir: Path) -> list[str]:
    """Names of runs that have an adapter, newest first (the Export tab's dropdown)."""
    return [summary.name for summary in rundir.list_runs(runs_dir) if summary.has_adapter]


def resolve_base(run_dir: Path, config, lineage: dict, progress: Progress) -> tuple[str, dict, dict]:
    """Where to load the base from, the loading kwargs, and its lineage record (checked unchanged).

    A local base is re-hashed and must match the hash recorded at training: merging onto
    a different base would ship a model nobody trained, under a card that names another.
    A hub base is pinned to the commit recorded at training.
    """
    from engine.demo import DEMO_MODEL_NAME
    from engine.hub import resolve_model
    from engine.lineage import folder_content_hash

    record = dict(lineage.get("base_model") or {"name_or_path": config.model.name_or_path})
    name = record.get("name_or_path") or config.model.name_or_path
    resolved = record.get("resolved")
    kwargs = {"trust_remote_code": config.model.trust_remote_code}
    if name != DEMO_MODEL_NAME and resolved and Path(resolved).is_dir():
        path = resolved  # the folder training loaded, checked against its hash below
    else:
        path = resolve_model(name, log=lambda message: progress(0.02, message))
        revision = record.get("commit") or config.model.revision
        if revision and name != DEMO_MODEL_NAME:
            kwargs["revision"] = revision
    if Path(path).is_dir() and record.get("content_sha256"):
        progress(0.03, "Checking that the base model is the one the run was trained on (hashing its files).")
        now = folder_content_hash(Path(path))["content_sha256"]
        if now != record["content_sha256"]:
            raise ExportError(f"The base model at {path} has changed since run '{Path(run_dir).name}' was trained "
                              f"(content sha256 {now[:12]}..., at training {record['content_sha256'][:12]}...). "
                              "Exporting now would ship a model that was never trained; restore that base or "
                              "train again.")
    from engine.hub import looks_like_hub_id

    record["load_as"] = name if looks_like_hub_id(name) else str(Path(path).resolve())
    record["load_revision"] = kwargs.get("revision") if looks_like_hub_id(name) else None
    record.setdefault("resolved", path)
    return path, kwargs, record


def parameters_on_disk(folder: str) -> int | None:
    """Parameter count from safetensors headers, without loading a weight (None if unknown)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                count = 1
                for dim in handle.get_slice(key).get_shape():
                    count *= dim
                total += count
    return total


def _sha256(path: Path) -> str:
    from engine.lineage import file_sha256

    return file_sha256(path)[0]


# ----------------------------------------------------------------------------- loading
def load_reference(base_path: str, base_kwargs: dict, adapter_dir: Path):
    """The run's model as PEFT applies it in memory: float32 base + unmerged adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.export.verify import device

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **base_kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model.to(device()).eval()


def load_quantized_reference(base_path: str, base_kwargs: dict, adapter_dir: Path, config):
    """What a QLoRA run trained against: its quantized base + the adapter (for the quantization gap).

    The base is quantized exactly as the worker quantizes it, through engine.config.build.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.config.build import decide_runtime, model_load_kwargs
    from engine.export.verify import device

    runtime = decide_runtime(config, device=device())
    kwargs = {**model_load_kwargs(config, runtime), **base_kwargs}
    base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


# ----------------------------------------------------------------------------- the export
def export_run(run_dir: Path, exports_dir: Path, kind: str = "adapter", dtype: str = "bf16",
               max_shard_size: str = "2GB", name: str | None = None, overwrite: bool = False,
               progress: Progress | None = None, quantization_gap: bool = True) -> ExportResult:
    """Export run ``run_dir`` into ``exports_dir/name``, verified; raises ``LoraLabError`` subclasses.

    ``kind`` is "adapter" (PEFT package) or "merged" (standalone model in ``dtype``,
    sharded at ``max_shard_size``). For a QLoRA run ``quantization_gap`` also measures how
    far the 16-bit result is from the 4-bit model it was trained as (reported, not judged).
    """
    progress = progress or _no_progress
    run_dir = Path(run_dir)
    if kind not in KINDS:
        raise ExportError(f"export kind '{kind}' is not one of {', '.join(KINDS)}.")
    torch_dtype = normalise_dtype(dtype) if kind == "merged" else None
    shard_bytes = parse_shard_size(max_shard_size) if kind == "merged" else None
    shard_size = str(max_shard_size).strip() if kind == "merged" else None  # as the person wrote it, for the card
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run folder (it has no config.yaml).")
    if not rundir.has_adapter(rundir.RunPaths(run_dir).adapter):
        raise ExportError(adapter_missing_reason(run_dir))
    state = rundir.read_status(run_dir).get("state")
    if state in rundir.ACTIVE_STATES:
        raise ExportError(f"Run '{run_dir.name}' is {state} right now, and its adapter is rewritten when it ends; "
                          "export it after it finishes, or stop it first.")
    paths = rundir.RunPaths(run_dir)
    config = rundir.load_config(run_dir)
    lineage = rundir.read_json(paths.lineage, default={}) or {}
    exports_dir = Path(exports_dir)
    exports_dir.mkdir(parents=True, exist_ok=True)
    short_dtype = {v: k for k, v in DTYPES.items()}.get(torch_dtype, "fp32")
    name = name.strip() if isinstance(name, str) and name.strip() else default_export_name(run_dir.name, kind,
                                                                                          short_dtype)
    target = safe_export_dir(exports_dir, name)
    what = "a merged model" if kind == "merged" else "an adapter package"
    # The name check and everything after it run under the lock: two exports of one name must not race.
    with export_lock(exports_dir, f"run '{run_dir.name}' as {what}"):
        if target.exists() and not overwrite:
            raise ExportError(f"An export named '{name}' already exists in {exports_dir.resolve()}; choose another "
                              "name or allow replacing it.")
        qlora = config.quant.load_in_4bit

        progress(0.01, f"Preparing to export run '{run_dir.name}' as {what}.")
        base_path, base_kwargs, base_record = resolve_base(run_dir, config, lineage, progress)
        if kind == "merged":
            on_disk = parameters_on_disk(base_path)
            if on_disk:
                check_free_space(exports_dir, on_disk * DTYPE_BYTES[torch_dtype], "the merged model")

        from transformers import AutoTokenizer

        from engine.export import verify as export_verify

        progress(0.08, "Loading the base model in float32 with the run's adapter (the reference).")
        tokenizer = AutoTokenizer.from_pretrained(str(paths.adapter))
        model = load_reference(base_path, base_kwargs, paths.adapter)
        progress(0.25, "Running the verification prompts on the reference.")
        reference = export_verify.reference_outputs(model, tokenizer)

        staging = exports_dir / f".staging-{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            if kind == "merged":
                numel = sum(p.numel() for p in model.parameters())  # LoRA weights included: a slight overestimate
                check_free_space(exports_dir, numel * DTYPE_BYTES[torch_dtype], "the merged model")
                progress(0.35, "Merging the adapter into the base (merge_and_unload, in float32).")
                import torch

                # Merging in float32 and rounding once to the target dtype is exact up to that one rounding.
                merged = model.merge_and_unload().to(getattr(torch, torch_dtype))
                progress(0.45, f"Saving the merged model in {torch_dtype} safetensors, shards of at most {shard_size}.")
                # transformers 5 always writes safetensors (there is no pickle format to opt out of).
                merged.save_pretrained(str(staging), max_shard_size=shard_bytes)
                del merged
            else:
                progress(0.4, "Saving the adapter package (PEFT save_pretrained).")
                adapter_config = model.peft_config["default"]
                adapter_config.base_model_name_or_path = base_record["load_as"]
                adapter_config.revision = base_record.get("load_revision")
                model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
            del model
            from accelerate.utils import release_memory  # lazy: accelerate imports torch
            release_memory()

            gap = None
            if qlora and quantization_gap:
                progress(0.55, "Measuring how far the 16-bit model is from the 4-bit one the adapter was trained on.")
                try:
                    quantized = load_quantized_reference(base_path, base_kwargs, paths.adapter, config)
                    gap = export_verify.quantization_gap(quantized, reference)
                    del quantized
                    from accelerate.utils import release_memory  # lazy: accelerate imports torch
                    release_memory()
                except Exception as error:  # noqa: BLE001 - informational only, never fails an export
                    gap = {"error": f"could not load the 4-bit base here: {str(error).splitlines()[0][:200]}"}

            progress(0.65, "Verifying: reloading the export from disk and comparing logits and greedy decoding.")
            stored = torch_dtype if kind == "merged" else _adapter_dtype(staging)
            report = export_verify.verify_export(staging, kind, stored, reference, tokenizer, base_path=base_path,
                                                 base_kwargs=base_kwargs)
            progress(0.9, "Writing the model card and lineage.json.")
            record = build_lineage(run_dir, config, lineage, base_record, staging, kind=kind, name=name,
                                   dtype=stored, max_shard_size=shard_size, report=report, gap=gap, tokenizer=tokenizer)
            from engine.export.card import write_card_and_lineage

            write_card_and_lineage(staging, record)
            _move_into_place(staging, target, exports_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        progress(1.0, report.sentence())
        return ExportResult(name=name, kind=kind, path=target, dtype=stored, report=report, lineage=record,
                            size_bytes=folder_size(target))


def _adapter_dtype(folder: Path) -> str:
    """The dtype the adapter's weights are stored in (float32 unless something cast them)."""
    from safetensors import safe_open

    dtypes = set()
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            dtypes.add(str(handle.get_slice(key).get_dtype()).lower())
    names = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
    found = [names.get(d, d) for d in dtypes]
    # The coarsest dtype present decides how much rounding the package carries.
    for candidate in ("bfloat16", "float16", "float32"):
        if candidate in found:
            return candidate
    return "float32"


def _move_into_place(staging: Path, target: Path, exports_dir: Path) -> None:
    stale_zip = target.with_name(target.name + ".zip")
    if target.exists():
        trash = exports_dir / f".replaced-{target.name}-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, target)
    stale_zip.unlink(missing_ok=True)


def build_lineage(run_dir: Path, config, run_lineage: dict, base_record: dict, folder: Path, *, kind: str, name: str,
                  dtype: str, max_shard_size: str | None, report, gap: dict | None, tokenizer) -> dict:
    """The machine-readable deploy unit; the model card is rendered from exactly this."""
    import json

    from engine.lineage import software_lineage

    paths = rundir.RunPaths(run_dir)
    summary = rundir.summarize_run(run_dir)
    adapter_weights = next((paths.adapter / f for f in ("adapter_model.safetensors", "adapter_model.bin")
                            if (paths.adapter / f).is_file()), None)
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())
             if p.is_file() and p.name not in ("README.md", "lineage.json")}
    record = {
        "export": {"name": name, "kind": kind, "dtype": dtype, "max_shard_size": max_shard_size,
                   "created_at": time.time(), "files": files},
        "run": {"name": run_dir.name, "path": str(run_dir.resolve()), "state": summary.state, "step": summary.step,
                "max_steps": summary.max_steps},
        "method": config.method,
        "base_model": base_record,
        "adapter": {"config": json.loads((paths.adapter / "adapter_config.json").read_text(encoding="utf-8")),
                    "weights_file": adapter_weights.name if adapter_weights else None,
                    "weights_sha256": _sha256(adapter_weights) if adapter_weights else None},
        "prompt_template": {"text": template,
                            "sha256": hashlib.sha256(template.encode()).hexdigest() if template else None},
        "training": config.to_dict(),
        "data": run_lineage.get("data"),
        "metrics": {"final_train_loss": summary.train_loss, "final_eval_loss": summary.eval_loss,
                    "baseline_eval_loss": summary.baseline_eval_loss},
        "ratings": win_rate_record(run_dir),
        "verification": dict(report.as_dict(), sentence=report.sentence()),
        "software": {"at_training": run_lineage.get("software") or {}, "at_export": software_lineage()},
    }
    if config.quant.load_in_4bit:
        record["quantization_note"] = (
            "the adapter was trained on a 4-bit NF4 quantization of the base. "
            + ("It is merged here onto the original base weights loaded in full precision (merged in float32, "
               f"then stored in {dtype}), not onto the 4-bit weights: those are a training-time approximation and "
               "not the weights to ship." if kind == "merged" else
               "Load it onto the original base in 16 bit (or again in 4 bit to save memory); the verification "
               "used the full-precision base."))
        record["quantization_gap"] = gap if gap and "error" not in gap else None
        if gap and "error" in gap:
            record["quantization_gap_error"] = gap["error"]
    return record


# ----------------------------------------------------------------------------- listing and zipping
def list_exports(exports_dir: Path) -> list[dict]:
    """Finished exports (folders with an export lineage), newest first."""
    folder = Path(exports_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if not path.is_dir() or path.name.startswith("."):
            continue
        record = rundir.read_json(path / "lineage.json", default=None)
        if isinstance(record, dict) and isinstance(record.get("export"), dict):
            export = record["export"]
            found.append({"name": path.name, "path": path, "kind": export.get("kind"), "dtype": export.get("dtype"),
                          "run": (record.get("run") or {}).get("name"), "created_at": export.get("created_at") or 0,
                          "verified": (record.get("verification") or {}).get("passed")})
    return sorted(found, key=lambda item: item["created_at"], reverse=True)


def zip_export(exports_dir: Path, name: str, progress: Progress | None = None) -> Path:
    """``exports_dir/<name>.zip`` of the export folder (reused while the export is unchanged).

    Written chunk by chunk so progress is reported for multi-gigabyte models; safetensors
    shards are stored uncompressed (they do not compress, and deflating them is slow).
    """
    progress = progress or _no_progress
    folder = safe_export_dir(exports_dir, name)
    if not (folder / "lineage.json").is_file():
        raise ExportError(f"There is no finished export named '{name}' in {Path(exports_dir).resolve()}.")
    archive = folder.with_name(folder.name + ".zip")
    if archive.is_file() and archive.stat().st_mtime >= (folder / "lineage.json").stat().st_mtime:
        progress(1.0, f"{archive.name} is ready.")
        return archive
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files) or 1
    check_free_space(folder.parent, total, f"the zip of '{name}'")
    partial = folder.with_name(f".{folder.name}.zip.{uuid.uuid4().hex[:8]}.tmp")
    done = 0
    try:
        with zipfile.ZipFile(partial, "w", allowZip64=True) as archive_file:
            for path in files:
                info = zipfile.ZipInfo.from_file(path, arcname=f"{folder.name}/{path.relative_to(folder).as_posix()}")
                info.compress_type = zipfile.ZIP_STORED if path.suffix in (".safetensors", ".bin") \
                    else zipfile.ZIP_DEFLATED
                with open(path, "rb") as source, archive_file.open(info, "w", force_zip64=True) as sink:
                    for block in iter(lambda: source.read(8 << 20), b""):
                        sink.write(block)
                        done += len(block)
                        progress(done / total, f"Zipping {path.name}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB.")
        os.replace(partial, archive)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    progress(1.0, f"{archive.name} is ready.")
    return archive
