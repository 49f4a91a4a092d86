#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite (the README's test command; .ci/run calls it for CI).
# Everything is installed into the project's .venv/ (made the first time, reused after).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/venv.sh
loralab_venv test requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
"$PY" -m pytest -q -p no:cacheprovider --durations=15 "$@"
code=$?
set -e
if [ "$code" = 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi
exit "$code"
