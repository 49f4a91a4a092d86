"""Worker overhead: the same small config through LoRA Lab's worker and through a bare TRL script.

Alternates the two, several runs each, on the offline demo model, and prints tokens/s of
each and the ratio (target: worker >= 0.97 x bare TRL). Both sides count the same thing:
non-padding tokens seen during ``trainer.train()`` divided by its runtime.

    python bench/overhead.py [--runs 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BARE_TRL = r'''
import json, sys
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer
from engine.config import load_preset
from engine.config.build import decide_runtime, to_lora_config, to_sft_config
model_dir, data_file, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
# The same arguments the worker builds (one builder), without the worker around the trainer.
config = load_preset("demo-lora", [f"train.max_steps={steps}"])
args = to_sft_config(config, decide_runtime(config), out, has_eval=False)
args.save_strategy = "no"
rows = [{"messages": json.loads(line)["messages"]} for line in open(data_file)]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                     peft_config=to_lora_config(config))
result = trainer.train()
print(json.dumps({"runtime": result.metrics["train_runtime"], "tokens": trainer.state.num_input_tokens_seen}))
'''


def run_worker(runs_dir: Path, steps: int) -> float:
    from engine.config import load_preset
    from engine.training import rundir

    config = load_preset("demo-lora", [f"train.max_steps={steps}", "data.eval_path=null", "data.eval_fraction=0",
                                       "eval.metric=none", f"train.save_steps={steps * 10}"])
    run_dir = rundir.create_run(runs_dir, config)
    subprocess.run([sys.executable, "-m", "engine.training.worker", str(run_dir)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = rundir.read_status(run_dir)
    return status["tokens_seen"] / status["train_runtime_s"]


def run_bare(model_dir: Path, steps: int, scratch: Path) -> float:
    from engine.demo import demo_dataset_path

    out = subprocess.run([sys.executable, "-c", BARE_TRL, str(model_dir), str(demo_dataset_path()), str(steps),
                          str(scratch / "bare")], capture_output=True, text=True, check=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tokens"] / result["runtime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from engine.demo import ensure_demo_model

    model_dir = ensure_demo_model()
    worker, bare = [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for index in range(args.runs):
            worker.append(run_worker(scratch / "runs", args.steps))
            bare.append(run_bare(model_dir, args.steps, scratch))
            print(f"pair {index + 1}: worker {worker[-1]:.0f} tok/s, bare TRL {bare[-1]:.0f} tok/s", flush=True)
    # Each pair runs back to back, so a ratio within a pair cancels most machine-load drift;
    # the median over pairs then drops an outlier pair.
    ratios = [w / b for w, b in zip(worker, bare)]
    print(f"median worker {statistics.median(worker):.0f} tok/s, median bare TRL {statistics.median(bare):.0f} tok/s; "
          f"per-pair ratios {', '.join(f'{r:.3f}' for r in ratios)}; median ratio {statistics.median(ratios):.3f} "
          "(target >= 0.97)")


if __name__ == "__main__":
    main()
