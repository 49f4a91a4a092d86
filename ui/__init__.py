"""LoRA Lab's Gradio layer: one module per tab, thin, calling the engine."""
