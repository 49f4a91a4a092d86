"""The deploy unit's paperwork: ``lineage.json`` (for machines) and ``README.md`` (for people).

Both are written from one dictionary, so the card can never say something the
machine-readable record does not. The card is a Hugging Face model card (YAML front
matter + markdown) so the hub and other tools read its base model and library.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

CARD_TRAIN_FIELDS = ("max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "learning_rate", "lr_scheduler_type", "warmup_steps", "optim", "max_length",
                     "assistant_only_loss", "packing", "bf16", "seed")
ADAPTER_FIELDS = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "bias",
                  "modules_to_save")


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def base_identity(base: dict) -> str:
    """One line naming the base exactly: hub commit, else revision, else content hash."""
    name = base.get("name_or_path", "?")
    if base.get("commit"):
        return f"`{name}` at commit `{base['commit']}`"
    if base.get("content_sha256"):
        revision = f" (revision `{base['revision']}`)" if base.get("revision") else ""
        return f"`{name}`{revision}, content sha256 `{base['content_sha256']}` (resolved from `{base.get('resolved')}`)"
    if base.get("revision"):
        return f"`{name}` at revision `{base['revision']}` (commit unknown)"
    return f"`{name}` (no revision or content hash was recorded)"


def load_snippet(lineage: dict) -> str:
    export, base = lineage["export"], lineage["base_model"]
    folder = f"./{export['name']}"
    revision = base.get("load_revision")
    rev_arg = f', revision="{revision}"' if revision else ""
    base_ref = base.get("load_as") or base.get("name_or_path")
    question = "Extract as JSON: the big blue ball is under the chair." if base.get("name_or_path") == "demo" \
        else "Hello! What can you do?"
    ask = (f'messages = [{{"role": "user", "content": "{question}"}}]\n'
           'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
           'return_dict=True)\n'
           'output = model.generate(**inputs, max_new_tokens=64, do_sample=False)\n'
           'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n')
    if export["kind"] == "merged":
        load = (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'model = AutoModelForCausalLM.from_pretrained("{folder}", dtype="auto")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n')
    else:
        load = (f'from peft import PeftModel\n'
                f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'base = AutoModelForCausalLM.from_pretrained("{base_ref}"{rev_arg}, dtype="auto")\n'
                f'model = PeftModel.from_pretrained(base, "{folder}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n')
    return load + ask


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")


def hub_datasets(lineage: dict) -> list[str]:
    """The hub dataset ids a run trained or evaluated on (local files and the demo are not hub datasets)."""
    from engine.hub import looks_like_hub_id

    found = []
    for split in ("train", "eval"):
        item = (lineage.get("data") or {}).get(split)
        source = item.get("source") if isinstance(item, dict) else None
        if source and looks_like_hub_id(source) and not source.lower().endswith(DATA_SUFFIXES):
            found.append(source)
    return list(dict.fromkeys(found))


def base_license(base: dict) -> dict:
    """The base model's license fields, read from its own model card when one is on this machine."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    resolved = base.get("resolved") or base.get("name_or_path") or ""
    card_path = Path(resolved, "README.md")
    if not card_path.is_file() and base.get("commit"):
        cached = try_to_load_from_cache(base.get("name_or_path"), "README.md", revision=base["commit"])
        card_path = Path(cached) if isinstance(cached, str) else card_path
    if not card_path.is_file():
        return {}
    try:
        data = ModelCard.load(card_path, ignore_metadata_errors=True).data
    except Exception:  # noqa: BLE001 - an unreadable base card only means the license is unknown
        return {}
    return {key: getattr(data, key, None) for key in ("license", "license_name", "license_link")
            if getattr(data, key, None)}


def card_metadata(lineage: dict):
    """The card's YAML front matter as huggingface_hub's ``ModelCardData``: what the Hub shows and indexes.

    ``base_model`` only when the base is a hub id with a known commit (a local folder means nothing
    on the Hub); ``datasets`` only hub datasets; ``license`` when the base model's card states one; the
    final held-out loss as an eval result in the card's model-index format.
    """
    from huggingface_hub import EvalResult, ModelCardData

    export, base, metrics = lineage["export"], lineage["base_model"], lineage["metrics"]
    merged = export["kind"] == "merged"
    datasets = hub_datasets(lineage)
    extra = {}
    if base.get("commit"):
        extra["base_model"] = base.get("name_or_path")
        extra["base_model_relation"] = "finetune" if merged else "adapter"
    eval_results = None
    if metrics.get("final_eval_loss") is not None:
        eval_split = (lineage.get("data") or {}).get("eval") or {}
        source = eval_split.get("source") if isinstance(eval_split, dict) else None
        dataset = source or (datasets[0] if datasets else "held-out rows of the training data")
        eval_results = [EvalResult(task_type="text-generation", task_name="Supervised fine-tuning",
                                   dataset_type=dataset, dataset_name=dataset,
                                   dataset_split="eval" if source else "held out from train",
                                   metric_type="loss", metric_name="eval loss (cross-entropy per token)",
                                   metric_value=round(float(metrics["final_eval_loss"]), 6),
                                   verified=False)]
    return ModelCardData(
        model_name=export["name"], library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["loralab", "lora", lineage["method"], "trl", "sft"] + (["merged"] if merged else []))),
        datasets=datasets or None, eval_results=eval_results, **base_license(base), **extra)


def render_card(lineage: dict) -> str:
    export, base, run = lineage["export"], lineage["base_model"], lineage["run"]
    adapter, training, data = lineage["adapter"], lineage["training"], lineage.get("data") or {}
    metrics, ratings, verification = lineage["metrics"], lineage.get("ratings") or {}, lineage["verification"]
    software = lineage["software"]
    merged = export["kind"] == "merged"
    lines = ["---", card_metadata(lineage).to_yaml().strip(), "---", "",
             f"# {export['name']}", ""]
    what = (f"A standalone model: the LoRA adapter of run `{run['name']}` merged into its base with PEFT's "
            f"`merge_and_unload`, stored in {export['dtype']} safetensors "
            f"(shards of at most {export['max_shard_size']})."
            if merged else
            f"The LoRA adapter of run `{run['name']}` as a PEFT adapter package, to load on top of its base model "
            "(or to serve beside other adapters on one base).")
    lines += [what, ""]
    if lineage.get("quantization_note"):
        lines += [f"> **QLoRA:** {lineage['quantization_note']}", ""]
    lines += ["## Deploy unit", "",
              "| | |", "|---|---|",
              f"| Base model | {base_identity(base)} |",
              f"| Adapter weights sha256 | `{adapter.get('weights_sha256')}` |",
              f"| Prompt template sha256 | `{lineage['prompt_template'].get('sha256')}` |",
              f"| Method | {lineage['method']} |",
              f"| Run | `{run['name']}` ({run.get('state')}, step {run.get('step')}) |",
              f"| Exported | {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(export['created_at']))} |",
              ""]
    lines += ["## Evaluation", "",
              f"- Final train loss: {_fmt(metrics.get('final_train_loss'))}",
              f"- Final eval loss: {_fmt(metrics.get('final_eval_loss'))}"
              + (f" (before training: {_fmt(metrics.get('baseline_eval_loss'))})"
                 if metrics.get("baseline_eval_loss") is not None else ""),
              "- Blind A/B win rate: " + (
                  f"{ratings['win_rate']:.0%} ({ratings['wins']} of {ratings['count']} ratings preferred the "
                  "fine-tuned answer)" if ratings.get("win_rate") is not None else "no blind ratings recorded"),
              f"- Export verification: {verification['sentence']}", ""]
    if lineage.get("quantization_gap"):
        gap = lineage["quantization_gap"]
        lines += [f"- On the 4-bit base it was trained with, the same adapter's logits differ from the 16-bit "
                  f"reference by up to {gap['max_abs_logit_diff']:.3g} ({gap['relative']:.2%} of the logit scale).", ""]
    lines += ["## Data", "", "| split | rows | sha256 | source |", "|---|---|---|---|"]
    for split in ("train", "eval"):
        item = data.get(split)
        if isinstance(item, dict) and item.get("sha256"):
            source = item.get("path") or item.get("source")
            lines.append(f"| {split} | {item.get('num_rows')} | `{item['sha256']}` | `{source}` |")
        elif isinstance(item, dict) and item.get("held_out_from_train"):
            lines.append(f"| {split} | {item.get('num_rows')} | (held out from train, fraction "
                         f"{item.get('eval_fraction')}) | |")
    lines += ["", "## Adapter configuration", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_fmt(adapter['config'].get(key))} |" for key in ADAPTER_FIELDS if key in adapter["config"]]
    lines += ["", "## Training configuration", "", "| | |", "|---|---|"]
    train = training.get("train", {})
    lines += [f"| {key} | {_fmt(train.get(key), 6)} |" for key in CARD_TRAIN_FIELDS if key in train]
    if training.get("quant", {}).get("load_in_4bit"):
        quant = training["quant"]
        lines.append(f"| quantization | 4-bit {quant.get('bnb_4bit_quant_type')}, double quant "
                     f"{quant.get('bnb_4bit_use_double_quant')} |")
    lines += ["", "<details><summary>Full run configuration (config.yaml)</summary>", "", "```yaml",
              yaml.safe_dump(training, sort_keys=False).strip(), "```", "", "</details>", ""]
    lines += ["## Prompt template", "", "The tokenizer in this folder carries the chat template the model was "
              "trained with; `tokenizer.apply_chat_template` applies it.", "", "```jinja",
              lineage["prompt_template"].get("text") or "(none: plain text)", "```", ""]
    lines += ["## Load it", "", "```python", load_snippet(lineage).strip(), "```", ""]
    git = software.get("at_training", {}).get("loralab_git") or {}
    export_git = software.get("at_export", {}).get("loralab_git") or {}
    lines += ["## Software", "",
              f"- LoRA Lab {software.get('at_training', {}).get('loralab_version')}, git commit "
              f"`{git.get('commit')}`{' (with uncommitted changes)' if git.get('dirty') else ''} at training; "
              f"exported with commit `{export_git.get('commit')}`"
              f"{' (with uncommitted changes)' if export_git.get('dirty') else ''}.",
              "- Packages at training: " + ", ".join(
                  f"{k} {v}" for k, v in (software.get("at_training", {}).get("packages") or {}).items() if v), "",
              "`lineage.json` beside this card carries all of the above in machine-readable form, with the sha256 "
              "of every other file in this folder.", ""]
    return "\n".join(lines)


def write_card_and_lineage(folder: Path, lineage: dict) -> None:
    Path(folder, "lineage.json").write_text(json.dumps(lineage, indent=2, default=str), encoding="utf-8")
    Path(folder, "README.md").write_text(render_card(lineage), encoding="utf-8")
