"""Releases: versioned deploy units with a promotion gate, one-action rollback and an append-only history.

Layout (everything under the releases folder; names are checked before any path is built)::

    releases/<name>/history.jsonl          append-only: promote, refused, rollback (who, when, why)
    releases/<name>/v<N>/release.json      base model id + revision or content hash, adapter file sha256s,
                                           chat template, generation defaults, gate decision
    releases/<name>/v<N>/adapter/          the PEFT adapter and its tokenizer, sha256-verified after copying
    releases/<name>/v<N>/eval/             report.json and report.html that admitted it
    releases/<name>/v<N>/README.md         model card (huggingface_hub ModelCardData front matter)
    releases/<name>/v<N>/lineage.json      the run's lineage (data, software, base)

Which version is current is not stored anywhere else: it is replayed from history.jsonl
(promotions push a version, rollbacks pop one), so the log cannot disagree with the state.
A version folder is written in a hidden staging folder and renamed into place, so a crash
never leaves a half release under a version name. Promotions and rollbacks of one release
hold a lock (``engine.export.lock``), across processes.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from engine.errors import RunError
from engine.names import check_name
from engine.training import rundir

DEFAULT_RELEASES_DIR = Path(os.environ.get("LORALAB_RELEASES_DIR", "releases"))
HISTORY = "history.jsonl"
RECORD = "release.json"
_VERSION = re.compile(r"v([1-9][0-9]{0,5})")


class ReleaseError(RunError):
    """A release action cannot be done as asked; the message says why."""


class PromotionRefused(ReleaseError):
    """The gate refused the candidate; ``decision`` holds every criterion."""

    def __init__(self, message: str, decision):
        self.decision = decision
        super().__init__(message)


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    path: Path

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def record(self) -> dict:
        return rundir.read_json(self.path / RECORD, default={}) or {}


# ----------------------------------------------------------------------------- names and places
def release_root(releases_dir: Path, name: str) -> Path:
    """``releases_dir/name``; refused in words before any path is built when the name could leave it."""
    name = check_name(name if isinstance(name, str) else "", "release", ReleaseError)
    root = Path(releases_dir).resolve()
    target = (root / name).resolve()
    if target.parent != root:  # a symlink planted in the releases folder
        raise ReleaseError(f"'{name}' would resolve outside the releases folder {root}.")
    return target


def parse_version(which) -> int | None:
    """'v3' or '3' -> 3; None for anything else."""
    text = str(which).strip()
    match = _VERSION.fullmatch(text) or _VERSION.fullmatch("v" + text)
    return int(match.group(1)) if match else None


def version_numbers(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    found = [parse_version(p.name) for p in root.iterdir() if p.is_dir() and (p / RECORD).is_file()]
    return sorted(n for n in found if n is not None)


def history(releases_dir: Path, name: str) -> list[dict]:
    records, _ = rundir.read_jsonl(release_root(releases_dir, name) / HISTORY)
    return [r for r in records if isinstance(r, dict)]


def stack(records: list[dict]) -> list[int]:
    """The versions that have been current, oldest first, after replaying the log; the last is current."""
    current: list[int] = []
    for record in records:
        if record.get("action") == "promote":
            current.append(int(record["version"]))
        elif record.get("action") == "rollback" and len(current) > 1:
            current.pop()
    return current


def resolve_version(releases_dir: Path, name: str, which: str = "current") -> Version:
    """'current', 'previous', 'vN' or 'N' of release ``name``; ReleaseError in words when there is none."""
    root = release_root(releases_dir, name)
    if not root.is_dir():
        known = ", ".join(r["name"] for r in list_releases(releases_dir)) or "none yet"
        raise ReleaseError(f"There is no release named '{name}' in {Path(releases_dir).resolve()} (releases: "
                           f"{known}).")
    which = (which or "current").strip()
    promoted = stack(history(releases_dir, name))
    if which in ("current", "previous"):
        position = -1 if which == "current" else -2
        if len(promoted) < -position:
            raise ReleaseError(f"Release '{name}' has no {which} version (versions current so far: "
                               f"{', '.join(f'v{v}' for v in promoted) or 'none'}).")
        number = promoted[position]
    else:
        number = parse_version(which)
        if number is None:
            raise ReleaseError(f"'{which}' is not a version: write current, previous, v3 or 3.")
    if number not in version_numbers(root):
        raise ReleaseError(f"Release '{name}' has no version v{number} (versions: "
                           f"{', '.join(f'v{v}' for v in version_numbers(root)) or 'none'}).")
    return Version(name=root.name, version=number, path=root / f"v{number}")


def list_releases(releases_dir: Path) -> list[dict]:
    folder = Path(releases_dir)
    if not folder.is_dir():
        return []
    found = []
    for root in sorted(folder.iterdir()):
        if not root.is_dir() or root.name.startswith(".") or not (root / HISTORY).is_file():
            continue
        records = history(folder, root.name)
        promoted = stack(records)
        found.append({"name": root.name, "current": promoted[-1] if promoted else None,
                      "previous": promoted[-2] if len(promoted) > 1 else None, "versions": version_numbers(root),
                      "updated_at": records[-1].get("time") if records else None})
    return found


def show(releases_dir: Path, name: str) -> dict:
    """A release's versions (with run, score and gate), what is current and previous, and its history."""
    root = release_root(releases_dir, name)
    if not (root / HISTORY).is_file():
        raise ReleaseError(f"There is no release named '{name}' in {Path(releases_dir).resolve()}.")
    records = history(releases_dir, name)
    promoted = stack(records)
    versions = []
    for number in version_numbers(root):
        record = Version(root.name, number, root / f"v{number}").record
        versions.append({"version": number, "run": record.get("run"), "created_at": record.get("created_at"),
                         "metric": record.get("eval", {}).get("metric"), "score": record.get("eval", {}).get("score"),
                         "forced": (record.get("gate") or {}).get("forced"), "path": str(root / f"v{number}")})
    return {"name": root.name, "path": str(root), "current": promoted[-1] if promoted else None,
            "previous": promoted[-2] if len(promoted) > 1 else None, "versions": versions, "history": records}


# ----------------------------------------------------------------------------- checks
def _adapter_files(folder: Path) -> list[Path]:
    """What a release carries of an adapter folder: config, weights, tokenizer, template, card.

    Not ``training_args.bin``: a pickle of the trainer's arguments, which nothing serving needs
    and which should never be unpickled from a deploy unit.
    """
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not (p.suffix == ".bin" and p.name != "adapter_model.bin"))


def verify_version(version: Version) -> None:
    """Every adapter file's sha256 matches the one recorded when it was released; ReleaseError naming the file."""
    from engine.lineage import file_sha256

    expected = version.record.get("adapter", {}).get("files") or {}
    if not expected:
        raise ReleaseError(f"{version.label} records no adapter files: {version.path / RECORD} is damaged.")
    for name, meta in expected.items():
        path = version.adapter_dir / name
        if not path.is_file():
            raise ReleaseError(f"{version.label}: adapter file {name} is missing from {version.adapter_dir}.")
        digest = file_sha256(path)[0]
        if digest != meta["sha256"]:
            raise ReleaseError(f"{version.label}: adapter file {name} has sha256 {digest[:12]}..., but "
                               f"{meta['sha256'][:12]}... was released: it changed on disk; do not serve it.")


def run_base(run_dir: Path) -> dict:
    lineage = rundir.read_json(rundir.RunPaths(Path(run_dir)).lineage, default={}) or {}
    base = dict(lineage.get("base_model") or {})
    if not base:
        base = {"name_or_path": rundir.load_config(Path(run_dir)).model.name_or_path}
    return base


def _same_base(a: dict, b: dict) -> bool:
    for key in ("content_sha256", "commit"):
        if a.get(key) and b.get(key):
            return a[key] == b[key]
    return a.get("name_or_path") == b.get("name_or_path") and a.get("revision") == b.get("revision")


def check_same_base(version: Version, run_dir: Path) -> None:
    """Refuse comparing (or replacing) a release with a run trained on a different base."""
    released, trained = version.record.get("base_model") or {}, run_base(run_dir)
    if not _same_base(released, trained):
        raise ReleaseError(f"{version.label} was trained on base {_base_words(released)}, run "
                           f"'{Path(run_dir).name}' on {_base_words(trained)}: adapters of different bases cannot "
                           "share one copy of the base or replace each other.")


def _base_words(base: dict) -> str:
    ident = base.get("commit") or base.get("content_sha256") or base.get("revision") or "no hash"
    return f"'{base.get('name_or_path')}' ({str(ident)[:12]})"


# ----------------------------------------------------------------------------- promote and roll back
def _user() -> str | None:
    """Who acted, for the history (the OS account; None when it cannot be told)."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name (a container without one) must not block a release
        return None


def _chat_template(adapter_dir: Path) -> str | None:
    jinja = adapter_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = rundir.read_json(adapter_dir / "tokenizer_config.json", default={}) or {}
    template = config.get("chat_template")
    return template if isinstance(template, str) else None


def _generation_defaults(report: dict, base: dict) -> dict:
    defaults = dict(report.get("generation") or {})
    resolved = base.get("resolved")
    if resolved:
        config = rundir.read_json(Path(resolved) / "generation_config.json", default={}) or {}
        for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if config.get(key) is not None:
                defaults[key] = config[key]
    return defaults


def promote(releases_dir: Path, run_dir: Path, name: str, gate=None, force: bool = False, note: str | None = None,
            log=print) -> dict:
    """Make the run's adapter the next version of release ``name`` if its eval report passes ``gate``.

    Returns ``{"version", "path", "decision"}``; raises ``PromotionRefused`` (recorded in the
    history) when the gate refuses and ``force`` is not set. ``force`` is recorded too.
    """
    from engine.export.lock import export_lock
    from engine.lineage import file_sha256
    from engine.releases.files import read_report, report_dir
    from engine.releases.gate import Gate, decide

    root = release_root(releases_dir, name)  # the name is checked before anything else
    gate = (gate or Gate()).validated()
    run_dir = Path(run_dir)
    adapter_dir = rundir.RunPaths(run_dir).adapter
    if not rundir.has_adapter(adapter_dir):
        raise ReleaseError(f"Run '{run_dir.name}' has no final adapter to release (adapter/ is empty).")
    report = read_report(run_dir)
    if not report:
        raise ReleaseError(f"Run '{run_dir.name}' has no eval report: run `python -m engine eval {run_dir.name}"
                           + (f" --against {root.name}" if root.is_dir() else "") + "` first.")
    weights = next((adapter_dir / f for f in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter_dir / f).is_file()), None)
    if report["adapter"].get("weights_sha256") != file_sha256(weights)[0]:
        raise ReleaseError(f"The eval report of run '{run_dir.name}' was made for other adapter weights than "
                           "adapter/ holds now: evaluate it again.")
    Path(releases_dir).mkdir(parents=True, exist_ok=True)
    root.mkdir(exist_ok=True)
    with export_lock(root, f"a promotion of release '{root.name}'"):
        promoted = stack(history(releases_dir, root.name))
        current = promoted[-1] if promoted else None
        if current is not None:
            check_same_base(Version(root.name, current, root / f"v{current}"), run_dir)
            against = report.get("against") or {}
            if against.get("name") != root.name or against.get("version") != current:
                made = f"v{against['version']} of '{against['name']}'" if against else "no release"
                raise ReleaseError(f"The eval report of run '{run_dir.name}' was made against {made}, but the "
                                   f"current release is {root.name} v{current}: run `python -m engine eval "
                                   f"{run_dir.name} --against {root.name}` first, so both answer the same prompts "
                                   "on the same base.")
        decision = decide(report, gate)
        number = max(version_numbers(root), default=0) + 1
        entry = {"time": time.time(), "user": _user(), "run": run_dir.name, "run_path": str(run_dir.resolve()),
                 "from": current, "gate": gate.as_dict(), "decision": decision.as_dict(), "note": note}
        if not decision.passed and not force:
            rundir.append_jsonl(root / HISTORY, {"action": "refused", **entry})
            raise PromotionRefused(decision.sentence(), decision)
        decision.forced = not decision.passed
        entry["decision"] = decision.as_dict()

        staging = root / f".staging-v{number}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            target_adapter = staging / "adapter"
            target_adapter.mkdir()
            files = {}
            for source in _adapter_files(adapter_dir):
                copied = target_adapter / source.name
                shutil.copy2(source, copied)
                digest, copied_digest = file_sha256(source)[0], file_sha256(copied)[0]
                if digest != copied_digest:
                    raise ReleaseError(f"Copying {source.name} into the release changed it (sha256 {digest[:12]} "
                                       f"became {copied_digest[:12]}); the disk may be failing.")
                files[source.name] = {"sha256": digest, "bytes": copied.stat().st_size}
            (staging / "eval").mkdir()
            for item in ("report.json", "report.html"):
                if (report_dir(run_dir) / item).is_file():
                    shutil.copy2(report_dir(run_dir) / item, staging / "eval" / item)
            base = run_base(run_dir)
            adapter_config = rundir.read_json(adapter_dir / "adapter_config.json", default={}) or {}
            template = _chat_template(adapter_dir)
            record = {
                "name": root.name, "version": number, "created_at": time.time(), "run": run_dir.name,
                "run_path": str(run_dir.resolve()), "base_model": base,
                "adapter": {"files": files, "weights_sha256": files.get(weights.name, {}).get("sha256"),
                            "r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"),
                            "target_modules": adapter_config.get("target_modules"),
                            "peft_type": adapter_config.get("peft_type")},
                "chat_template": template, "generation_defaults": _generation_defaults(report, base),
                "eval": {"metric": report["metric"], "score": report["sides"]["adapter"]["score"], "n": report["n"],
                         "prompts_source": report["prompts_source"]},
                "gate": decision.as_dict(), "forced": decision.forced, "note": note,
            }
            rundir.write_json_atomic(staging / RECORD, record)
            lineage = rundir.read_json(rundir.RunPaths(run_dir).lineage, default={}) or {}
            rundir.write_json_atomic(staging / "lineage.json", lineage)
            from engine.releases.card import render_release_card

            rundir.write_text_atomic(staging / "README.md", render_release_card(record, report))
            os.replace(staging, root / f"v{number}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        rundir.append_jsonl(root / HISTORY, {"action": "promote", "version": number, **entry})
    log(f"{root.name} v{number} is now current (run '{run_dir.name}'). {decision.sentence()}")
    return {"version": number, "path": root / f"v{number}", "decision": decision}


def rollback(releases_dir: Path, name: str, reason: str | None = None, log=print) -> dict:
    """Make the previous version current again, in one action; recorded in the history."""
    from engine.export.lock import export_lock

    root = release_root(releases_dir, name)
    if not (root / HISTORY).is_file():
        raise ReleaseError(f"There is no release named '{name}' in {Path(releases_dir).resolve()}.")
    with export_lock(root, f"a rollback of release '{root.name}'"):
        promoted = stack(history(releases_dir, root.name))
        if len(promoted) < 2:
            raise ReleaseError(f"Release '{root.name}' has no previous version to roll back to (current: "
                               f"{', '.join(f'v{v}' for v in promoted) or 'none'}).")
        target = Version(root.name, promoted[-2], root / f"v{promoted[-2]}")
        verify_version(target)  # never roll back onto an adapter that changed on disk
        rundir.append_jsonl(root / HISTORY, {"action": "rollback", "time": time.time(), "user": _user(),
                                             "from": promoted[-1],
                                             "to": promoted[-2], "reason": reason})
    log(f"{root.name}: rolled back from v{promoted[-1]} to v{promoted[-2]}, which is current again.")
    return {"from": promoted[-1], "to": promoted[-2]}


def release_source(releases_dir: Path, name: str, which: str = "current"):
    """The Chat tab's ``AdapterSource`` for a release version (its adapter verified first)."""
    from engine.chat.sources import AdapterSource

    version = resolve_version(releases_dir, name, which)
    verify_version(version)
    record = version.record
    base = record.get("base_model") or {}
    quant = ()
    run_path = Path(record.get("run_path") or "")
    if (run_path / "config.yaml").is_file():
        run_quant = rundir.load_config(run_path).quant
        if run_quant.load_in_4bit or run_quant.load_in_8bit:
            quant = tuple(sorted(vars(run_quant).items()))
    return AdapterSource(path=version.adapter_dir, label=f"release {version.label} ({which})",
                         base_model=base.get("name_or_path") or "demo", run_dir=version.path,
                         revision=base.get("revision"), quant=quant,
                         held_out_run=run_path if (run_path / "config.yaml").is_file() else None)


RELEASE_PREFIX = "release:"


def release_ref(text: str) -> tuple[str, str] | None:
    """(name, which) of ``release:NAME`` or ``release:NAME@previous`` (or ``@vN``); None for any other text."""
    text = (text or "").strip()
    if not text.startswith(RELEASE_PREFIX):
        return None
    name, _, which = text[len(RELEASE_PREFIX):].partition("@")
    return name.strip(), which.strip() or "current"


def chat_source(runs_dir: Path, releases_dir: Path, text: str, which: str = "latest", allow_path: bool = True):
    """What a person typed to chat with, as an ``AdapterSource``: ``release:NAME[@which]``, a run name, a run
    folder or an adapter folder (``allow_path=False``: a run name inside ``runs_dir`` only)."""
    from engine.chat.sources import resolve_adapter

    ref = release_ref(text)
    if ref is not None:
        return release_source(releases_dir, *ref)
    return resolve_adapter(runs_dir, text, which, allow_path=allow_path)
