#!/usr/bin/env bash
# Set up a fresh machine and start the dashboard on the offline demo (the README's start command).
# Everything is installed into the project's .venv/ (made the first time, reused after); flags are app.py's.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
loralab_venv start requirements.txt
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"
"$PY" -m engine demo  # checks the shipped demo model against its sha256 manifest (under a second)
exec "$PY" app.py "$@"           # prints "LoRA Lab: open http://127.0.0.1:7860"
