"""LoRA Lab: ``python app.py`` (or ``loralab ui``) serves the dashboard on http://127.0.0.1:7860.

Only wiring and launch live here; the tabs are in ``ui/``, the work in ``engine/``. ``cli`` is
the ``loralab`` console script: ``ui`` plus every ``python -m engine`` command, one table.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent
# Runs and exports go in the project folder when run from a clone (or `pip install -e .`), else the current folder.
WORKSPACE = PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="LoRA Lab dashboard")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--runs-dir", type=Path, default=WORKSPACE / "runs")
    parser.add_argument("--exports-dir", type=Path, default=WORKSPACE / "exports")
    parser.add_argument("--releases-dir", type=Path, default=WORKSPACE / "releases")
    parser.add_argument("--auth", help="user:password, or a file with one user:password per line")
    parser.add_argument("--max-upload-mb", type=int, default=200, help="largest accepted upload")
    return parser.parse_args(argv)


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    if not value:
        return None
    lines = Path(value).read_text(encoding="utf-8").splitlines() if Path(value).is_file() else [value]
    pairs = [tuple(line.strip().split(":", 1)) for line in lines if ":" in line and not line.startswith("#")]
    if not pairs:
        raise SystemExit("--auth needs user:password, or a file of user:password lines")
    return [(user, password) for user, password in pairs]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None, prog: str | None = None) -> None:
    # Start-up allocates a few hundred thousand long-lived objects (Gradio, FastAPI, pydantic, the
    # tabs), and the cyclic collector would walk them again and again while they pile up: off until
    # the page is served, then those objects are frozen out of later collections (bench/startup.py).
    gc.disable()
    args = parse_args(argv, prog)
    auth = parse_auth(args.auth)
    if not is_loopback(args.host) and not auth:
        print(f"WARNING: serving on {args.host} without --auth: anyone who can reach this port can train "
              "models and read your runs. Add --auth user:password.", file=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # Four events at a time (a long chat generation must not block the Train tab's buttons). Said through
    # Gradio's environment variable rather than demo.queue(...), which would build the whole server app
    # a second time (about 0.4 s of start-up).
    os.environ.setdefault("GRADIO_DEFAULT_CONCURRENCY_LIMIT", "4")
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.exports_dir.mkdir(parents=True, exist_ok=True)

    from engine.training.jobs import JobManager
    from engine.training.sampler import GpuSampler
    from ui.context import AppContext
    from ui.layout import CSS, build_app

    sampler = GpuSampler(interval_s=1.0)
    sampler.start()
    jobs = JobManager(args.runs_dir).start()
    ctx = AppContext(runs_dir=args.runs_dir.resolve(), exports_dir=args.exports_dir.resolve(), jobs=jobs,
                     sampler=sampler, max_upload_mb=args.max_upload_mb, releases_dir=args.releases_dir.resolve())
    demo = build_app(ctx)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"LoRA Lab: open http://{shown_host}:{args.port} (runs in {args.runs_dir})", flush=True)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        max_file_size=f"{args.max_upload_mb}mb",
        allowed_paths=[str(ctx.exports_dir)],
        enable_monitoring=False,
        css=CSS,
        show_error=False,
        prevent_thread_lock=True,
    )
    gc.freeze()
    gc.enable()
    demo.block_thread()


def ui_main(argv: list[str]) -> int:
    main(argv, prog="loralab ui")
    return 0


UI_COMMAND = ("app", "ui_main", "serve the dashboard (the same flags as python app.py; --help lists them)")


def cli(argv: list[str] | None = None) -> int:
    """The ``loralab`` command: ``loralab ui`` and every ``python -m engine`` command."""
    from engine.__main__ import COMMANDS
    from engine.__main__ import main as dispatch

    return dispatch(argv, prog="loralab", commands={"ui": UI_COMMAND, **COMMANDS})


if __name__ == "__main__":
    main()
