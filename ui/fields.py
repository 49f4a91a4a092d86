"""Input components shared by the tabs.

``Number``: Gradio's number box rounds and bounds-checks what it receives before the handler
runs, so a client of the API that sends ``"abc"`` or NaN to an integer field got Gradio's
generic error instead of the sentence the engine gives the same value typed in the form or
passed with ``--set``. This one hands anything that is not a finite number to the handler
unchanged, where the engine's rule (``RunConfig``'s metadata, ``Sampling.validated``) names
the field and its range; finite numbers are processed exactly as ``gr.Number`` does.
"""

from __future__ import annotations

import math

import gradio as gr


class Number(gr.Number):
    def preprocess(self, payload):
        if isinstance(payload, str):
            try:
                payload = float(payload.strip())
            except ValueError:
                return payload  # "abc": the engine says what the field takes
        if isinstance(payload, bool) or not isinstance(payload, (int, float)) or not math.isfinite(payload):
            return payload  # None, NaN, inf, anything else: the engine's sentence, not a generic error
        return super().preprocess(payload)
