"""Export tab: ship a run as an adapter package or a merged model, verified, and download it.

Layout, wiring and module-level handlers; exporting, verifying and zipping are ``engine.export``
functions (the same ones ``python -m engine export`` runs), and so is the policy of one export
at a time per exports folder (``engine.export.lock``), which the command line obeys too.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ui.context import AppContext, bind, releases_folder

KIND_LABELS = {"Adapter package (PEFT)": "adapter", "Merged model (standalone)": "merged"}
EXPLANATION = (
    "Make something to ship from a finished run. **Adapter package**: the PEFT adapter with the tokenizer and chat "
    "template, for serving several adapters on one base. **Merged model**: the adapter merged into its base with "
    "`merge_and_unload`, a standalone model in bf16 or fp16 safetensors. Every export is reloaded from disk and "
    "checked against the run's model (logits and greedy decoding) before it is kept, and carries a model card "
    "(`README.md`) and `lineage.json` naming the base model, data, metrics and software."
)


def _error_text(error: Exception) -> str:
    from engine.errors import LoraLabError
    from engine.export.lock import ExportBusyError

    if isinstance(error, ExportBusyError):
        return f"**Export not started:** {error}"
    if isinstance(error, LoraLabError):
        return f"**Export failed:** {error}"
    return f"**Unexpected error** ({type(error).__name__}): {error}"


# ----------------------------------------------------------------------------- handlers
def run_choices(runs_dir: Path):
    from engine.export.exporter import exportable_runs

    names = exportable_runs(runs_dir)
    return gr.update(choices=names, value=names[0] if names else None)


def export_choices(exports_dir: Path, selected: str | None = None):
    from engine.export.exporter import list_exports

    names = [item["name"] for item in list_exports(exports_dir)]
    return gr.update(choices=names, value=selected if selected in names else (names[0] if names else None))


def refresh_lists(ctx: AppContext):
    """(runs dropdown, exports dropdown), both read again from disk."""
    return run_choices(ctx.runs_dir), export_choices(ctx.exports_dir)


def hide_download(_export_name):
    """A different export is chosen: the prepared zip's button no longer belongs to it."""
    return gr.update(visible=False)


def report_markdown(result) -> str:
    """The verification report as a person reads it: verdict, numbers, one row per prompt."""
    report = result.report
    lines = [f"**Exported** `{result.name}` ({result.kind}, {result.dtype}, {result.size_bytes / 2**20:.1f} MiB) "
             f"to `{result.path}`.", "", report.sentence(), "",
             "| prompt | largest logit difference | greedy tokens matching |", "|---|---|---|"]
    for row in report.per_prompt:
        margin = row["divergence_margin"]
        note = "" if margin is None else f" (diverged at a near tie, margin {margin:.3g})"
        lines.append(f"| {row['prompt']} | {row['max_abs_logit_diff']:.3g} | {row['greedy_match']}{note} |")
    gap = result.lineage.get("quantization_gap")
    if result.lineage.get("quantization_note"):
        lines += ["", f"QLoRA: {result.lineage['quantization_note']}"]
    if gap:
        lines += [f"On the 4-bit base it was trained with, the adapter's logits differ from the full-precision "
                  f"reference by up to {gap['max_abs_logit_diff']:.3g} ({gap['relative']:.1%} of the logit scale)."]
    lines += ["", "The model card is `README.md` in the export folder; prepare a zip below to download it."]
    return "\n".join(lines)


def do_export(ctx: AppContext, run_name, kind_label, dtype, shard_size, name, overwrite, progress=gr.Progress()):
    """Returns (status markdown, exports dropdown update). A second export while one runs is refused in words."""
    from engine.export.exporter import export_run
    from engine.training import rundir

    if not run_name:
        return "**Export failed:** choose a run with an adapter first (press Refresh if it just finished).", gr.update()
    try:
        report = (lambda fraction, message: progress(fraction, desc=message)) if progress else None
        run_dir = rundir.resolve_run(ctx.runs_dir, run_name)
        result = export_run(run_dir, ctx.exports_dir, kind=KIND_LABELS.get(kind_label, kind_label), dtype=dtype,
                            max_shard_size=shard_size, name=(name or "").strip() or None, overwrite=bool(overwrite),
                            progress=report)
        return report_markdown(result), export_choices(ctx.exports_dir, result.name)
    except Exception as error:  # noqa: BLE001 - shown as a sentence, never a stack trace
        return _error_text(error), gr.update()


def do_zip(ctx: AppContext, export_name, progress=gr.Progress()):
    """Returns (zip status markdown, download button update)."""
    from engine.export.exporter import zip_export

    if not export_name:
        return "Choose an export first.", gr.update(visible=False)
    try:
        report = (lambda fraction, message: progress(fraction, desc=message)) if progress else None
        archive = zip_export(ctx.exports_dir, export_name, progress=report)
    except Exception as error:  # noqa: BLE001
        return _error_text(error), gr.update(visible=False)
    size = archive.stat().st_size / 2**20
    return (f"`{archive.name}` is ready ({size:.1f} MiB).",
            gr.update(value=str(archive), visible=True, label=f"Download {archive.name}"))


# ----------------------------------------------------------------------------- releases
def release_overview(releases_dir: Path) -> str:
    """Every release with its current and previous version, as Markdown."""
    from engine.releases import list_releases

    rows = list_releases(releases_dir)
    if not rows:
        return f"No releases yet in `{releases_dir}`: evaluate a run, then promote it."
    lines = ["| release | current | previous | versions |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | v{row['current']} | {'v' + str(row['previous']) if row['previous'] else '-'} "
                     f"| {', '.join(f'v{v}' for v in row['versions'])} |")
    return "\n".join(lines)


def report_markdown_summary(report: dict) -> str:
    """The eval report's headline numbers and flips (the whole report is report.html in the run)."""
    from engine.releases.report import summary_line

    lines = [summary_line(report), "",
             "| side | score | schema errors | policy violations | TTFT p95 | per token p95 |",
             "|---|---|---|---|---|---|"]
    for side, data in report["sides"].items():
        latency, schema = data["latency"], data["schema_errors"]
        lines.append(f"| {side} | {data['score']:.3f} | {'n/a' if schema is None else schema}"
                     f" | {data['policy_violations']} | {latency['ttft_p95_s'] * 1000:.1f} ms | "
                     f"{latency['per_token_p95_s'] * 1000:.1f} ms |")
    lines += ["", f"{len(report['failures'])} failure case(s); the full report with every answer is "
                  f"`{report['run']}/eval/report.html`."]
    return "\n".join(lines)


def do_eval_report(ctx: AppContext, run_name, release_name, policy_file, limit, progress=gr.Progress()):
    """The eval report of a run (base, adapter and, when it exists, the named release's current version)."""
    from engine.releases import list_releases
    from engine.releases.report import make_report
    from engine.training import rundir

    if not run_name:
        return "**Eval failed:** choose a run with an adapter first."
    try:
        run_dir = rundir.resolve_run(ctx.runs_dir, run_name)
        name = (release_name or "").strip()
        against = name if name in {row["name"] for row in list_releases(releases_folder(ctx))} else None
        say = (lambda message: progress(0.5, desc=message)) if progress else (lambda *_: None)
        report = make_report(run_dir, against=against, releases_dir=releases_folder(ctx),
                             policy_file=(policy_file or "").strip() or None, limit=int(limit) if limit else None,
                             log=say)
        return report_markdown_summary(report)
    except Exception as error:  # noqa: BLE001 - shown as a sentence, never a stack trace
        return _error_text(error).replace("Export failed", "Eval failed")


def do_promote(ctx: AppContext, run_name, release_name, min_gain, max_schema, max_violations, max_latency, force):
    """Promote the run's adapter through the gate; returns (status markdown, releases overview)."""
    from engine.releases import Gate, PromotionRefused, promote
    from engine.training import rundir

    folder = releases_folder(ctx)
    try:
        gate = Gate(min_gain_points=float(min_gain), max_new_schema_errors=int(max_schema),
                    max_new_policy_violations=int(max_violations), max_latency_increase_pct=float(max_latency))
        run_dir = rundir.resolve_run(ctx.runs_dir, run_name or "")
        result = promote(folder, run_dir, (release_name or "").strip(), gate=gate, force=bool(force),
                         log=lambda *_: None)
        text = f"**{(release_name or '').strip()} v{result['version']} is current.** {result['decision'].sentence()}"
    except PromotionRefused as error:
        text = f"**Refused.** {error}"
    except Exception as error:  # noqa: BLE001
        text = _error_text(error).replace("Export failed", "Promotion failed")
    return text, release_overview(folder)


def do_rollback(ctx: AppContext, release_name):
    """Make the previous version current; returns (status markdown, releases overview)."""
    from engine.releases import rollback

    folder = releases_folder(ctx)
    try:
        moved = rollback(folder, (release_name or "").strip(), reason="Export tab", log=lambda *_: None)
        text = f"**Rolled back** {release_name.strip()} from v{moved['from']} to v{moved['to']}."
    except Exception as error:  # noqa: BLE001
        text = _error_text(error).replace("Export failed", "Rollback failed")
    return text, release_overview(folder)


def do_bundle(ctx: AppContext, release_name, which, kinds, progress=gr.Progress()):
    """Serving bundles of a release version (vLLM and/or GGUF), verified; status markdown."""
    from engine.releases import resolve_version
    from engine.releases.bundles import gguf_bundle, vllm_bundle

    try:
        version = resolve_version(releases_folder(ctx), (release_name or "").strip(), (which or "current").strip())
        say = (lambda message: progress(0.5, desc=message)) if progress else (lambda *_: None)
        lines = []
        if "vLLM" in (kinds or []):
            info = vllm_bundle(version, log=say)
            lines.append(f"**vLLM bundle** in `{info['path']}`:\n\n```\n{info['command']}\n```")
        if "GGUF" in (kinds or []):
            info = gguf_bundle(version, log=say)
            lines.append(f"**GGUF bundle** in `{info['path']}`:")
            lines += [f"- {c['file']}: {c['bytes'] / 2**20:.2f} MiB, llama.cpp greedy tokens agree on "
                      f"{c['tokens_agreeing']}/{c['tokens_compared']} (largest logit difference "
                      f"{c['max_abs_logit_diff']:.3g}, tolerance {c['tolerance']:.3g})" for c in info["verification"]]
        return "\n".join(lines) or "Choose vLLM and/or GGUF."
    except Exception as error:  # noqa: BLE001
        return _error_text(error).replace("Export failed", "Bundle failed")


# ----------------------------------------------------------------------------- layout
def build(ctx: AppContext) -> None:
    from engine.export.exporter import exportable_runs, list_exports

    gr.Markdown(EXPLANATION)
    runs_now = exportable_runs(ctx.runs_dir)
    with gr.Row():
        # Custom values are allowed so a run finished after page load can be typed or refreshed in;
        # every name still goes through engine.training.rundir.resolve_run, which refuses paths.
        run = gr.Dropdown(label="Run (runs with a saved adapter)", choices=runs_now, allow_custom_value=True,
                          value=runs_now[0] if runs_now else None, scale=4)
        refresh = gr.Button("Refresh runs", size="sm", scale=1)
    with gr.Row():
        kind = gr.Radio(list(KIND_LABELS), value="Adapter package (PEFT)", label="What to export")
        dtype = gr.Radio(["bf16", "fp16"], value="bf16", label="Merged dtype",
                         info="Merged only. bf16 keeps fp32's range; fp16 is more precise but can overflow.")
        shard = gr.Textbox(value="2GB", label="Max shard size", info="Merged only, e.g. 2GB, 500MB, 5GiB.")
    with gr.Row():
        name = gr.Textbox(label="Export name (optional)", placeholder="default: <run>-adapter or <run>-merged-<dtype>",
                          scale=3)
        overwrite = gr.Checkbox(value=False, label="Replace an export of the same name", scale=1)
    export_button = gr.Button("Export and verify", variant="primary")
    status = gr.Markdown(elem_classes=["loralab-status"])

    gr.Markdown("#### Download")
    exports_now = [item["name"] for item in list_exports(ctx.exports_dir)]
    with gr.Row():
        existing = gr.Dropdown(label="Export", choices=exports_now, value=exports_now[0] if exports_now else None,
                               allow_custom_value=True, scale=4)
        zip_button = gr.Button("Prepare zip", scale=1)
    zip_status = gr.Markdown()
    download = gr.DownloadButton("Download zip", visible=False)

    refresh.click(bind(refresh_lists, ctx), outputs=[run, existing], api_name="export_refresh")
    # Exports and zips queue in their own group of one: they are long and heavy, and must never delay the
    # Train tab's updates or each other (the export lock also refuses a second export from the CLI).
    exporting = dict(concurrency_id="export", concurrency_limit=1)
    export_button.click(bind(do_export, ctx), inputs=[run, kind, dtype, shard, name, overwrite],
                        outputs=[status, existing], api_name="export_run", **exporting)
    existing.change(hide_download, inputs=existing, outputs=download, api_name=False)
    zip_button.click(bind(do_zip, ctx), inputs=existing, outputs=[zip_status, download], api_name="export_zip",
                     **exporting)

    build_releases(ctx, run)


def build_releases(ctx: AppContext, run) -> None:
    """The Releases section: eval report, promotion through the gate, rollback, serving bundles."""
    from engine.releases.gate import Gate

    folder = releases_folder(ctx)
    gr.Markdown("#### Releases\nEvaluate the run chosen above against the current release (one base in memory), "
                "promote it through the gate, roll back in one action, and make serving bundles. The same actions "
                "are `python -m engine eval` and `python -m engine release ...`.")
    with gr.Row():
        release_name = gr.Textbox(label="Release name", placeholder="e.g. extract", scale=2)
        policy = gr.Textbox(label="Policy file (optional)", placeholder="policy.yaml: forbidden_phrases, must_refuse",
                            scale=3)
        limit = gr.Number(label="Prompts (blank: all)", precision=0, minimum=1, scale=1)
    eval_button = gr.Button("Eval report (against the release, if it exists)")
    eval_status = gr.Markdown()
    defaults = Gate()
    with gr.Row():
        min_gain = gr.Number(defaults.min_gain_points, label="Min gain (points)")
        max_schema = gr.Number(defaults.max_new_schema_errors, label="Max new schema errors", precision=0)
        max_violations = gr.Number(defaults.max_new_policy_violations, label="Max new policy violations", precision=0)
        max_latency = gr.Number(defaults.max_latency_increase_pct, label="Max p95 latency increase (%)")
        force = gr.Checkbox(False, label="Force (recorded)")
    with gr.Row():
        promote_button = gr.Button("Promote", variant="primary")
        rollback_button = gr.Button("Roll back to previous")
    release_status = gr.Markdown()
    overview = gr.Markdown(release_overview(folder))
    with gr.Row():
        which = gr.Textbox("current", label="Version", info="current, previous or vN", scale=1)
        kinds = gr.CheckboxGroup(["vLLM", "GGUF"], value=["vLLM"], label="Serving bundles", scale=2)
        bundle_button = gr.Button("Make bundles", scale=1)
    bundle_status = gr.Markdown()

    exporting = dict(concurrency_id="export", concurrency_limit=1)
    eval_button.click(bind(do_eval_report, ctx), inputs=[run, release_name, policy, limit], outputs=eval_status,
                      api_name="release_eval", **exporting)
    promote_button.click(bind(do_promote, ctx), inputs=[run, release_name, min_gain, max_schema, max_violations,
                                                        max_latency, force],
                         outputs=[release_status, overview], api_name="release_promote")
    rollback_button.click(bind(do_rollback, ctx), inputs=release_name, outputs=[release_status, overview],
                          api_name="release_rollback")
    bundle_button.click(bind(do_bundle, ctx), inputs=[release_name, which, kinds], outputs=bundle_status,
                        api_name="release_bundle", **exporting)
