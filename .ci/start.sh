#!/usr/bin/env bash
# Set up a fresh machine and start the dashboard on the offline demo (the README's start command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0
python3 -m pip install --quiet -r requirements.txt
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}"
python3 -m engine demo
exec python3 app.py "$@"
