"""Build hook only (the metadata is in pyproject.toml): ship presets/ inside the package as engine/presets.

A clone and ``pip install -e .`` read presets/ in the project folder; a plain ``pip install .``
has no project folder, so the build copies presets/ (the method presets, the demo data and the
architectures of the memory calculator) into the installed engine package, where
``engine.PRESETS_DIR`` finds it. setuptools cannot map a folder outside a package into one
from pyproject.toml while packages are discovered, hence this small hook.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PRESETS = Path(__file__).resolve().parent / "presets"


class BuildWithPresets(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "engine" / "presets"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(PRESETS, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithPresets})
