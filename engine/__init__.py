"""LoRA Lab engine: everything the dashboard does, headless. Never imports gradio.

Where the project's files are is decided here, once: run from a clone (or after
``pip install -e .``), presets, runs, exports and the demo-model cache live in the project
folder; after a plain ``pip install .`` the presets are the copy shipped inside the package
(engine/presets) and what LoRA Lab writes goes to the current folder (runs/, exports/) and
~/.cache/loralab.
"""

from pathlib import Path

__version__ = "0.2.0"

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
IN_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "presets").is_dir()
PRESETS_DIR = PROJECT_ROOT / "presets" if IN_CHECKOUT else PACKAGE_DIR / "presets"
