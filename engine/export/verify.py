"""Checking an export against the model it came from: logits and greedy decoding.

The reference is the run's adapter on the base model, both in float32, exactly as PEFT
applies it in memory (unmerged). The export is reloaded from disk the way a user would
load it (plain transformers for a merged model, transformers + PEFT for an adapter) and
run on the same token sequences. Two numbers come out:

* the largest absolute difference of any logit over every position of every prompt
  (teacher-forced on the reference's own greedy continuation, so the generated
  positions are covered too), and
* greedy agreement: the share of generated tokens that match before the first
  divergence.

Tolerance (why these numbers). A merged export stores ``W + BA`` rounded to its dtype:
each weight moves by at most the dtype's unit roundoff ``u`` relative to itself
(bf16: 8 significant bits, u = 2^-8; fp16: 11 bits, u = 2^-11; fp32: u = 2^-24). The
exported model is run in float32 here, so rounding of the stored weights is the only
difference the check should see. Independent relative perturbations of size <= u in
every weight move each matmul's output by about u relative to itself (random signs
cancel inside the dot product); the errors of successive layers add up like a random
walk, so the logit error grows with the square root of the depth. The allowed difference
is therefore ``TOLERANCE_FACTOR * sqrt(layers) * u * scale``, where scale is the largest
|logit| of the reference on the same positions; with ``TOLERANCE_FACTOR = 8`` that is
16 u on the 4-layer demo. Measured (the tests print it; every export's report records
it): demo merged exports differ by 1-6 u in bf16 and 1.5-3.4 u in fp16 (40- and 120-step
runs), at least 3x below the limit; on random-initialised Llamas of 4/16/32 layers,
bf16 rounding gave 2.1/3.2/3.7 u, growing no faster than sqrt(depth). Real mistakes are far
above the limit: on the demo, leaving the adapter out moves logits by 255 u and a 10% error in the LoRA scaling by
70 u, and the tests check that corrupted exports fail. An adapter package keeps the
adapter's own dtype (float32 for every run LoRA Lab makes) on the same float32 base, so
its limit is the float32 one: the computations are identical, and any real difference
is a defect.

A greedy divergence is only acceptable where the reference's margin between its pick and
the export's pick is below twice the tolerance (a near tie that rounding may legitimately
flip); anywhere else it fails the export too.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import RunError

# A fixed, model-agnostic prompt set. The first ones exercise general ability; the
# last is shaped like the demo's fine-tuning task, so the adapter's change is exercised.
VERIFY_PROMPTS = (
    "Describe: the small red cup is on the table.",
    "What is the capital of France? Answer in one word.",
    "Write one sentence about the sea.",
    "Extract as JSON: the big blue ball is under the chair.",
)
NEW_TOKENS = 24
TOLERANCE_FACTOR = 8
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


class VerificationError(RunError):
    """The exported artifact does not reproduce the run's model; ``report`` says by how much."""

    def __init__(self, message: str, report: VerificationReport):
        self.report = report
        super().__init__(message)


@dataclass
class VerificationReport:
    kind: str
    stored_dtype: str
    depth: int
    prompts: int
    new_tokens: int
    max_abs_logit_diff: float
    logit_scale: float
    tolerance: float
    greedy_tokens_compared: int
    greedy_tokens_agreeing: int
    unexplained_divergences: int
    passed: bool
    per_prompt: list = field(default_factory=list)
    quantization_gap: dict | None = None  # QLoRA: 4-bit base + adapter vs the 16-bit reference

    @property
    def greedy_agreement(self) -> float:
        return self.greedy_tokens_agreeing / self.greedy_tokens_compared if self.greedy_tokens_compared else 1.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["greedy_agreement"] = self.greedy_agreement
        data["relative_diff"] = self.max_abs_logit_diff / self.logit_scale if self.logit_scale else 0.0
        return data

    def sentence(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"Verification {verdict}: largest logit difference {self.max_abs_logit_diff:.3g} "
                f"(tolerance {self.tolerance:.3g}: {TOLERANCE_FACTOR} x sqrt({self.depth} layers) x the "
                f"{self.stored_dtype} rounding of logits up to {self.logit_scale:.3g}); greedy decoding agreed on "
                f"{self.greedy_tokens_agreeing}/{self.greedy_tokens_compared} tokens over {self.prompts} prompts"
                + (f", {self.unexplained_divergences} divergence(s) not explained by a near tie" if
                   self.unexplained_divergences else "") + ".")


def tolerance_for(stored_dtype: str, logit_scale: float, depth: int) -> float:
    """The largest logit difference that rounding the weights to ``stored_dtype`` explains."""
    return TOLERANCE_FACTOR * math.sqrt(max(depth, 1)) * UNIT_ROUNDOFF[stored_dtype] * max(logit_scale, 1.0)


def model_depth(model) -> int:
    """Number of transformer layers (what rounding errors accumulate over)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", None) or 1)


# ----------------------------------------------------------------------------- running models
def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the served model sees it: through the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_dict=True)
        return list(encoded["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _generate(model, ids: list[int], tokenizer) -> list[int]:
    import torch

    input_ids = torch.tensor([ids], device=model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=NEW_TOKENS, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    return output[0, len(ids):].tolist()


def _logits(model, sequence: list[int]):
    import torch

    with torch.no_grad():
        ids = torch.tensor([sequence], device=model.device)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().cpu()


def reference_outputs(model, tokenizer) -> list[dict]:
    """Per prompt: its ids, the greedy continuation and the logits along prompt + continuation."""
    model.eval()
    outputs = []
    for prompt in VERIFY_PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        generated = _generate(model, ids, tokenizer)
        outputs.append({"prompt": prompt, "ids": ids, "generated": generated,
                        "logits": _logits(model, ids + generated)})
    return outputs


def compare(model, tokenizer, reference: list[dict], kind: str, stored_dtype: str) -> VerificationReport:
    """Run ``model`` (the reloaded export) on the reference's sequences and judge the difference."""
    model.eval()
    scale = max(float(item["logits"].abs().max()) for item in reference)
    depth = model_depth(model)
    tolerance = tolerance_for(stored_dtype, scale, depth)
    worst, compared, agreeing, unexplained, rows = 0.0, 0, 0, 0, []
    for item in reference:
        logits = _logits(model, item["ids"] + item["generated"])
        diff = float((logits - item["logits"]).abs().max()) if logits.shape == item["logits"].shape else math.inf
        if not math.isfinite(diff):  # NaN or inf logits (an fp16 overflow, say) must fail, and max() skips NaN
            diff = math.inf
        worst = max(worst, diff)
        generated = _generate(model, item["ids"], tokenizer)
        ref_gen = item["generated"]
        matched = 0
        while matched < min(len(ref_gen), len(generated)) and ref_gen[matched] == generated[matched]:
            matched += 1
        total = max(len(ref_gen), len(generated))
        explained, margin = True, None
        if matched < total:
            # Near tie? The reference's margin between its pick and the export's pick at that position.
            position = len(item["ids"]) - 1 + matched
            ref_logits = item["logits"][position]
            ref_pick = ref_gen[matched] if matched < len(ref_gen) else None
            exp_pick = generated[matched] if matched < len(generated) else None
            if ref_pick is not None and exp_pick is not None:
                margin = float(ref_logits[ref_pick] - ref_logits[exp_pick])
            else:  # one stopped (end of sequence) where the other went on
                top2 = ref_logits.topk(2).values
                margin = float(top2[0] - top2[1])
            explained = margin <= 2 * tolerance
        unexplained += 0 if explained else 1
        compared += total
        agreeing += matched
        rows.append({"prompt": item["prompt"], "max_abs_logit_diff": diff, "greedy_match": f"{matched}/{total}",
                     "divergence_margin": margin, "divergence_explained": explained})
    passed = worst <= tolerance and unexplained == 0
    return VerificationReport(kind=kind, stored_dtype=stored_dtype, depth=depth, prompts=len(reference),
                              new_tokens=NEW_TOKENS,
                              max_abs_logit_diff=worst, logit_scale=scale, tolerance=tolerance,
                              greedy_tokens_compared=compared, greedy_tokens_agreeing=agreeing,
                              unexplained_divergences=unexplained, passed=passed, per_prompt=rows)


def quantization_gap(model, reference: list[dict]) -> dict:
    """Largest logit difference between ``model`` (4-bit base + adapter) and the 16-bit reference."""
    worst = 0.0
    for item in reference:
        logits = _logits(model, item["ids"] + item["generated"])
        worst = max(worst, float((logits - item["logits"]).abs().max()))
    scale = max(float(item["logits"].abs().max()) for item in reference)
    return {"max_abs_logit_diff": worst, "relative": worst / scale if scale else 0.0}


# ----------------------------------------------------------------------------- loading exports
def load_exported(export_dir: Path, kind: str, base_path: str, base_kwargs: dict):
    """Reload an export the way its user will: transformers alone, or transformers + PEFT."""
    import torch
    from transformers import AutoModelForCausalLM

    if kind == "merged":
        model = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **base_kwargs)
        model = PeftModel.from_pretrained(base, str(export_dir))
    return model.to(device())


def verify_export(export_dir: Path, kind: str, stored_dtype: str, reference: list[dict], tokenizer,
                  base_path: str | None = None, base_kwargs: dict | None = None) -> VerificationReport:
    """Reload ``export_dir``, compare with ``reference``; raise ``VerificationError`` when they disagree."""
    model = load_exported(Path(export_dir), kind, base_path, base_kwargs or {})
    try:
        report = compare(model, tokenizer, reference, kind, stored_dtype)
    finally:
        del model
        gc.collect()
    if not report.passed:
        raise VerificationError(
            f"The exported {kind} model does not reproduce the run's model, so it was not kept. "
            + report.sentence(), report)
    return report
