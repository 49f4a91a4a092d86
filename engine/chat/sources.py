"""What the Chat tab loads: an adapter folder and the base it belongs to.

A run's adapter is its ``adapter/`` (the final save) or one of its checkpoints; any other
PEFT adapter folder names its base in ``adapter_config.json``. The run's config says how
the base was loaded in training (quantization), so chatting can load it the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelNotFoundError, RunError
from engine.training.rundir import (
    ADAPTER_WEIGHTS,
    RunPaths,
    checkpoints,
    has_adapter,
    latest_adapter,
    load_config,
    read_run_status,
    resolve_run,
)

LATEST = "latest"


@dataclass(frozen=True)
class AdapterSource:
    """An adapter folder and the base it belongs to, with how that base was loaded in training."""

    path: Path
    label: str
    base_model: str  # as configured: "demo", a folder or a hub id
    run_dir: Path | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    quant: tuple = ()  # sorted (key, value) pairs of the run's quant section; () when not quantized
    held_out_run: Path | None = None  # the run whose held-out split is its prompt set, when not run_dir (a release)

    @property
    def ratings_path(self) -> Path:
        return RunPaths(self.run_dir or self.path).ratings

    @property
    def ratings_dir(self) -> Path:
        return self.run_dir or self.path

    @property
    def prompts_run(self) -> Path | None:
        """The run folder whose held-out split answers "the run's held-out prompts"; None outside any run."""
        return self.held_out_run or (self.run_dir if self.run_dir and (self.run_dir / "config.yaml").is_file()
                                     else None)

    @property
    def quant_settings(self) -> dict:
        return dict(self.quant)


def adapter_weights_time(folder: Path) -> float:
    files = [folder / name for name in (*ADAPTER_WEIGHTS, "adapter_config.json")]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def adapter_options(run_dir: str | Path) -> list[tuple[str, str]]:
    """(label, value) pairs for a picker: the latest adapter first, then each checkpoint."""
    run_dir = Path(run_dir)
    options = []
    adapter, saved = RunPaths(run_dir).adapter, checkpoints(run_dir, adapters_only=True)
    if has_adapter(adapter) or saved:
        options.append(("latest adapter", LATEST))
    if has_adapter(adapter):
        options.append(("adapter/ (saved at the end or on stop)", "adapter"))
    options += [(p.name, p.name) for p in reversed(saved)]
    return options


def source_for_run(run_dir: str | Path, which: str = LATEST) -> AdapterSource:
    """The adapter of a run (finished, stopped or still running): latest, 'adapter' or 'checkpoint-N'."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    which = (which or LATEST).strip()
    if which == LATEST:
        folder = latest_adapter(run_dir)
        if folder is None:
            state = read_run_status(run_dir).state
            raise RunError(
                f"Run '{run_dir.name}' ({state}) has no adapter yet: it saves checkpoints/checkpoint-N every "
                f"{config.train.save_steps} steps and adapter/ when it ends or is stopped. Try again after step "
                f"{config.train.save_steps}, or pick another run.")
    else:
        name = f"checkpoint-{which}" if which.isdigit() else which
        folder = RunPaths(run_dir).adapter if name == "adapter" else RunPaths(run_dir).checkpoints / name
        if not has_adapter(folder):
            available = ", ".join(value for _, value in adapter_options(run_dir)) or "none yet"
            raise RunError(f"Run '{run_dir.name}' has no adapter at {folder.relative_to(run_dir)} "
                           f"(available: {available}).")
    quant = config.quant
    quant_items = ()
    if quant.load_in_4bit or quant.load_in_8bit:
        quant_items = tuple(sorted(vars(quant).items()))
    label = f"{run_dir.name} / {folder.name}"
    return AdapterSource(path=folder, label=label, base_model=config.model.name_or_path, run_dir=run_dir,
                         revision=config.model.revision, trust_remote_code=config.model.trust_remote_code,
                         quant=quant_items)


def source_for_folder(folder: str | Path, base_model: str | None = None) -> AdapterSource:
    """Any PEFT adapter folder; the base comes from its adapter_config.json unless given."""
    folder = Path(folder).expanduser()
    if not has_adapter(folder):
        raise ModelNotFoundError(f"{folder} is not a PEFT adapter folder (it has no adapter_config.json).")
    try:
        adapter_config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelNotFoundError(f"{folder / 'adapter_config.json'} cannot be read: {error}.") from None
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(f"{folder / 'adapter_config.json'} does not name its base model "
                                 "(base_model_name_or_path); give the base model explicitly.")
    # A checkpoint folder inside a run is chatted as that run's adapter, so ratings land in the run.
    for parent in (folder.parent, folder.parent.parent):
        if not (parent / "config.yaml").is_file():
            continue
        if folder in [RunPaths(parent).adapter, *checkpoints(parent, adapters_only=True)]:
            return source_for_run(parent, "adapter" if folder.name == "adapter" else folder.name)
    return AdapterSource(path=folder, label=folder.name, base_model=base,
                         revision=adapter_config.get("revision"))


def resolve_adapter(runs_dir: str | Path, run_or_folder: str, which: str = LATEST,
                    allow_path: bool = True) -> AdapterSource:
    """A run name, a run folder or an adapter folder, as typed by a person.

    ``allow_path=False`` for a run field: a run name inside ``runs_dir`` only.
    """
    text = (run_or_folder or "").strip()
    if not text:
        raise RunError("Choose a run or give an adapter folder.")
    if not allow_path:
        return source_for_run(resolve_run(Path(runs_dir), text), which)
    path = Path(text).expanduser()
    if path.is_dir() and not (path / "config.yaml").is_file():
        return source_for_folder(path)
    try:
        run_dir = resolve_run(Path(runs_dir), text, allow_path=True)
    except RunError:
        if path.is_dir() or "/" in text:
            raise RunError(f"'{text}' is neither a run folder (with config.yaml) nor an adapter folder "
                           "(with adapter_config.json).") from None
        raise
    return source_for_run(run_dir, which)
