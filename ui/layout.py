"""The page: a header and one tab per module; each tab module only lays out and wires."""

from __future__ import annotations

import importlib

from ui.context import AppContext

TABS = [
    ("Train", "ui.train_tab"),
    ("Memory", "ui.memory_tab"),
    ("Dataset", "ui.data_tab"),
    ("Chat", "ui.chat_tab"),
    ("Export", "ui.export_tab"),
]

CSS = """
.loralab-status {font-size: 0.95rem}
.loralab-error {color: #b91c1c}
"""


def build_app(ctx: AppContext):
    import gradio as gr

    with gr.Blocks(title="LoRA Lab") as demo:
        gr.Markdown("# LoRA Lab\nLoRA / QLoRA fine-tuning on this machine: train, measure, compare, export.")
        with gr.Tabs():
            for title, module_name in TABS:
                with gr.Tab(title, id=title.lower()):
                    try:
                        module = importlib.import_module(module_name)
                    except ModuleNotFoundError as error:
                        if error.name != module_name:
                            raise
                        gr.Markdown(f"The {title} tab is not built yet.")
                        continue
                    module.build(ctx)
    return demo
