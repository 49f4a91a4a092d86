"""LoRA Lab engine: everything the dashboard does, headless. Never imports gradio."""

__version__ = "0.1.0"
