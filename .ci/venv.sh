# Sourced by start.sh and test.sh: the project's virtual environment, .venv/, made once and reused.
#
# Debian 12 and Ubuntu 24.04 mark their system Python as externally managed (PEP 668): pip refuses to
# install into it, so everything goes into .venv. `loralab_venv NAME FILE` makes .venv with
# `python3 -m venv` (installing Debian's python3-venv first when it is missing and we are root),
# installs torch (pinned), the requirements FILE and LoRA Lab itself (editable, for the `loralab`
# command) unless nothing changed since the last install (a stamp in .venv holds the hash of every
# requirements*.txt, pyproject.toml and setup.py), and sets $PY.
# A .venv that is a symbolic link belongs to someone else: it is used as it is and never changed.

VENV=.venv
TORCH_PIN="torch==2.13.0"

loralab_say() { echo "[setup] $*" >&2; }

loralab_make_venv() {
  local base="${PYTHON:-python3}"
  if ! command -v "$base" >/dev/null 2>&1; then
    loralab_say "no $base found: install Python 3.11 or newer (Debian/Ubuntu: apt-get install python3 python3-venv)"
    return 1
  fi
  if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    loralab_say "LoRA Lab needs Python 3.11 or newer; $base is $("$base" --version 2>&1)"
    return 1
  fi
  if ! "$base" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian and Ubuntu ship venv's pip bootstrap separately, in python3-venv.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      loralab_say "python3 -m venv needs Debian's python3-venv package: installing it with apt-get"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
      loralab_say "python3 -m venv needs the python3-venv package: run 'sudo apt-get install python3-venv', then this again"
      return 1
    fi
  fi
  loralab_say "creating the project's virtual environment in $VENV ($("$base" --version 2>&1))"
  if ! "$base" -m venv "$VENV"; then
    rm -rf "$VENV"  # half made (no pip): the next attempt starts clean
    loralab_say "python3 -m venv failed (see above); on Debian/Ubuntu install python3-venv"
    return 1
  fi
}

loralab_venv() {
  local name="$1" requirements="$2"
  if [ -L "$VENV" ]; then
    loralab_say "$VENV is a link to an environment managed elsewhere: using it as it is, installing nothing"
    PY="$VENV/bin/python"
    return 0
  fi
  if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
    loralab_say "$VENV is broken (no working python or pip): making it again"
    rm -rf "$VENV"
  fi
  if [ ! -e "$VENV" ]; then
    loralab_make_venv || return 1
  fi
  PY="$VENV/bin/python"
  local stamp="$VENV/.loralab-$name.sha256" wanted
  wanted="$( { echo "$TORCH_PIN"; "$PY" --version; cat requirements*.txt pyproject.toml setup.py; } | sha256sum \
    | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    loralab_say "$VENV is up to date for $requirements (nothing to install)"
    return 0
  fi
  local started=$SECONDS
  loralab_say "installing $TORCH_PIN, $requirements and LoRA Lab into $VENV (the first time takes minutes)"
  "$PY" -m pip install --quiet --disable-pip-version-check "$TORCH_PIN"
  # llama-cpp-python (requirements-gguf.txt, in the test set) compiles llama.cpp here: every core, and
  # without the multimodal library LoRA Lab never loads (about a third of the build).
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PY" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$wanted" > "$stamp"
  loralab_say "installed in $((SECONDS - started)) s"
}
