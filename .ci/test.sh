#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0
python3 -m pip install --quiet -r requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
python3 -m pytest -q -p no:cacheprovider --durations=15 "$@"
code=$?
set -e
if [ "$code" = 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit "$code"
