"""The page: a header and one tab per module, in order.

Each tab module lays out its own components and wires them to its module-level handlers;
``app.py`` builds the ``AppContext`` and launches. Importing this module imports neither
gradio nor any tab: the tabs are imported when the page is built, and none of them imports
torch or transformers until a handler needs them, so the dashboard starts in seconds.
"""

from __future__ import annotations

import importlib

from ui.context import AppContext

TABS = (
    ("Train", "ui.train_tab"),
    ("Sweeps", "ui.sweep_tab"),
    ("Memory", "ui.memory_tab"),
    ("Dataset", "ui.data_tab"),
    ("Chat", "ui.chat_tab"),
    ("Export", "ui.export_tab"),
)

CSS = """
.loralab-status {font-size: 0.95rem}
.loralab-error {color: #b91c1c}
"""  # passed to launch(): Gradio 6 takes css there, not in Blocks


def build_app(ctx: AppContext):
    """The whole dashboard as one ``gr.Blocks``, every tab sharing ``ctx``."""
    import gradio as gr

    with gr.Blocks(title="LoRA Lab") as demo:
        gr.Markdown("# LoRA Lab\nLoRA / QLoRA fine-tuning on this machine: train, measure, compare, export.")
        with gr.Tabs():
            for title, module_name in TABS:
                with gr.Tab(title, id=title.lower()):
                    importlib.import_module(module_name).build(ctx)
    return demo
