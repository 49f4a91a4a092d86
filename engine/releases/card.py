"""A release version's model card: Hugging Face card metadata (``ModelCardData``) and the deploy unit in words."""

from __future__ import annotations

import time


def render_release_card(record: dict, report: dict) -> str:
    from huggingface_hub import ModelCardData

    from engine.export.card import base_identity
    from engine.hub import looks_like_hub_id

    base = record.get("base_model") or {}
    extra = {}
    if base.get("commit") and looks_like_hub_id(base.get("name_or_path") or ""):
        extra = {"base_model": base["name_or_path"], "base_model_relation": "adapter"}
    data = ModelCardData(model_name=f"{record['name']} v{record['version']}", library_name="peft",
                         pipeline_tag="text-generation", tags=["loralab", "lora", "release"], **extra)
    adapter, gate = record["adapter"], record["gate"]
    lines = ["---", data.to_yaml().strip(), "---", "", f"# {record['name']} v{record['version']}", "",
             f"Adapter of run `{record['run']}`, released "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['created_at']))}"
             + (" **by force, over the promotion gate**" if record.get("forced") else "") + ".", "",
             "## Deploy unit", "", "| | |", "|---|---|",
             f"| Base model | {base_identity(base)} |",
             f"| Adapter weights sha256 | `{adapter.get('weights_sha256')}` |",
             f"| LoRA rank / alpha | {adapter.get('r')} / {adapter.get('lora_alpha')} |",
             f"| Target modules | {adapter.get('target_modules')} |",
             f"| Generation defaults | `{record.get('generation_defaults')}` |", "",
             "## Evaluation", ""]
    for side, values in report["sides"].items():
        schema = "" if values["schema_errors"] is None else f", schema errors {values['schema_errors']}"
        lines.append(f"- {side}: {report['metric']} {values['score']:.3f}{schema}, policy violations "
                     f"{values['policy_violations']}")
    lines += ["", f"{report['n']} prompts from {report['prompts_source']}; the full report is `eval/report.html`.",
              "", "## Promotion gate", "", gate["sentence"], "", "## Prompt template", "", "```jinja",
              record.get("chat_template") or "(none: plain text)", "```", ""]
    return "\n".join(lines)
