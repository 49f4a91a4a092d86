#!/usr/bin/env bash
# One GPU proof, at most 8 minutes on one GPU: QLoRA vs LoRA on a 1B-class Llama with random
# weights (torch peak, NVML peak, tokens/s), the memory calculator against those peaks on more
# configurations, LoRA Lab's NVML sampler on the real device, a paged optimizer, and each speed
# booster on and off, printed as one table (bench/gpu_check.py says what each column is).
#
#   bash bench/gpu_check.sh              # the table (exits 0 with a sentence where there is no GPU)
#   bash bench/gpu_check.sh --dry-run    # the plan and the calculator's predictions, anywhere
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3); GPU_CHECK_BUDGET_S the
# total wall-clock budget in seconds (default 480, the 8 minutes).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    exec timeout --kill-after=10 120 "$PYTHON" bench/gpu_check.py "$@"
  fi
done

# Is there a GPU? Asked of torch (what training uses), with a timeout: a wedged driver must not hang us.
if ! found="$(timeout --kill-after=10 120 "$PYTHON" -c \
    'import torch; print("cuda" if torch.cuda.is_available() else "none")' 2>&1)"; then
  echo "Cannot ask $PYTHON whether there is a GPU (is torch installed?): ${found##*$'\n'}" >&2
  exit 1
fi
if [[ "${found##*$'\n'}" != "cuda" ]]; then
  echo "No CUDA GPU here, so there is nothing to measure: bench/gpu_check.sh shows what only a GPU can" \
       "(torch and NVML peaks, the sampler on a real device, paged optimizers, Liger and FlashAttention 2)." \
       "The CPU proofs hold without one: tests/test_memory.py and tests/test_boosters.py."
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# Rows stop starting 60 s before the budget; the whole run is killed at the budget whatever happens.
deadline=$(( BUDGET_S - 60 ))
exec timeout --kill-after=15 "$BUDGET_S" "$PYTHON" bench/gpu_check.py --deadline-s "$deadline" "$@"
