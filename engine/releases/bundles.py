"""Serving bundles of a release version, checked where they can be checked here.

``vllm_bundle``: the adapter in the layout vLLM's ``--lora-modules`` loads (``adapter_config.json``
+ ``adapter_model.safetensors``), the exact ``vllm serve`` command and an OpenAI-style request.
vLLM does not run here (no GPU), so what is checked is what vLLM checks when it loads an
adapter: the rank against ``--max-lora-rank`` (one of vLLM's allowed values), the target
modules, and ``adapter_config.json`` fields it refuses (DoRA, bias, modules_to_save).

``gguf_bundle``: the merged model (``engine.export``'s verified merged export) converted with
llama.cpp's own converter to GGUF f16 and Q8_0, an Ollama ``Modelfile`` with the chat template,
and a verification in llama.cpp itself (llama-cpp-python): the GGUF must tokenize the
verification prompts as the Hugging Face tokenizer does and produce the merged model's greedy
tokens, a divergence being allowed only at a near tie.

Tolerance for the GGUF check (why these numbers), in the terms of ``engine.export.verify``:
the allowed logit difference is ``8 x sqrt(layers) x u x (largest |logit|)``. For f16 the
weights are the merged fp16 export's, bit for bit, and ggml's CPU f16 matrix products round
the activations to f16 too: u = 2^-11, fp16's unit roundoff. Q8_0 stores each block of 32
weights as 8-bit integers times one scale ``d = max|w| / 127``, so a weight moves by up to
``d / 2``, i.e. 2^-8 of its block's largest weight, and ggml quantizes the activations to Q8_0
the same way before the dot product: two roundings of 2^-8 each, relative to block maxima
rather than to each value, so u = 2^-7 for Q8_0. A greedy token that differs from the
reference is accepted only where the reference's own margin between its pick and llama.cpp's
pick is below twice that tolerance (the rounding can flip a near tie, nothing else).
Measured on the demo (tests/test_releases.py prints it): f16 differs by at most 0.011 (limit
0.103) and Q8_0 by 0.16 (limit 1.65, 1.2% of the logit scale), and both agree on 96 of 96
greedy tokens: a 9-10x margin either way, while a wrong conversion (the adapter left out, a
wrong pre-tokenizer) moves logits by the whole logit scale (13) and breaks the tokenization check.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from engine.releases.store import ReleaseError, Version, verify_version
from engine.training import rundir

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
# Linear-layer names vLLM's LoRA layers replace in the common architectures (Llama/Mistral/Qwen, GPT-2/NeoX,
# Phi, MPT); vLLM decides per model, so a name outside this list is reported, not guessed at.
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                     "gate_up_proj", "dense", "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "c_attn",
                     "c_proj", "c_fc", "fc1", "fc2", "out_proj", "w1", "w2", "w3", "Wqkv", "wo"}
GGUF_TYPES = ("f16", "q8_0")
UNIT_ROUNDOFF = {"f16": 2.0**-11, "q8_0": 2.0**-7}
TOLERANCE_FACTOR = 8
GGUF_BUILD_NOTE = "llama-cpp-python builds llama.cpp from source: about 20 minutes on 2 cores"


class BundleError(ReleaseError):
    """A serving bundle cannot be made or did not verify; the message says why."""


@contextmanager
def _staged_bundle(version: Version, kind: str):
    """(final folder, fresh staging folder) inside the version, so nothing is written outside the releases folder;
    the staging folder replaces the final one when the block ends, and is removed when the block fails, so a
    half-made bundle never stands under the final name."""
    root = version.path / "serving"
    root.mkdir(exist_ok=True)
    staging, target = root / f".staging-{kind}-{uuid.uuid4().hex[:8]}", root / kind
    staging.mkdir()
    try:
        yield target, staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _base_ref(version: Version) -> tuple[str, str | None]:
    """What a server loads as the base: the hub id at its commit, else the local folder."""
    from engine.hub import looks_like_hub_id

    base = version.record.get("base_model") or {}
    name = base.get("name_or_path") or ""
    if looks_like_hub_id(name):
        return name, base.get("commit") or base.get("revision")
    return str(base.get("resolved") or name), None


# ----------------------------------------------------------------------------- vLLM
def vllm_problems(adapter_config: dict) -> list[str]:
    """What vLLM would refuse in this adapter_config.json, as sentences (empty when it loads)."""
    problems = []
    if adapter_config.get("peft_type") not in (None, "LORA"):
        problems.append(f"peft_type is {adapter_config.get('peft_type')}; vLLM serves LoRA adapters only.")
    if adapter_config.get("use_dora"):
        problems.append("use_dora is true: vLLM does not serve DoRA adapters; merge it (GGUF bundle) instead.")
    if adapter_config.get("bias") not in (None, "none") or adapter_config.get("lora_bias"):
        problems.append("the adapter trains biases (bias/lora_bias): vLLM does not load LoRA biases.")
    if adapter_config.get("modules_to_save"):
        problems.append(f"modules_to_save {adapter_config['modules_to_save']}: vLLM loads LoRA matrices only, not "
                        "fully trained modules; merge the model instead.")
    rank = adapter_config.get("r")
    ranks = [rank, *(adapter_config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and r >= 1 for r in ranks):
        problems.append(f"r is {rank!r}: a LoRA rank must be a whole number >= 1.")
    elif max(ranks) > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}).")
    targets = adapter_config.get("target_modules")
    if isinstance(targets, str):
        problems.append(f"target_modules is the pattern {targets!r}; vLLM needs the module names listed.")
    elif targets:
        unknown = sorted(set(targets) - VLLM_LORA_MODULES)
        if unknown:
            problems.append(f"target modules {unknown} are not linear layers vLLM applies LoRA to "
                            f"({', '.join(sorted(VLLM_LORA_MODULES))}).")
    return problems


def max_lora_rank_for(rank: int) -> int:
    return next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)


def vllm_bundle(version: Version, log=print) -> dict:
    """``serving/vllm/`` of a version: adapter, serve.sh, request.json, bundle.json.

    BundleError, before anything is written, when vLLM would refuse the adapter.
    """
    verify_version(version)
    adapter_config = rundir.read_json(version.adapter_dir / "adapter_config.json", default={}) or {}
    problems = vllm_problems(adapter_config)
    if problems:
        raise BundleError(f"{version.label} cannot be served by vLLM as a LoRA: " + " ".join(problems))
    with _staged_bundle(version, "vllm") as (target, staging):
        lora_name = f"{version.name}-v{version.version}"
        adapter = staging / "adapter" / lora_name
        adapter.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            if (version.adapter_dir / name).is_file():
                shutil.copy2(version.adapter_dir / name, adapter / name)
        ranks = [adapter_config["r"], *(adapter_config.get("rank_pattern") or {}).values()]
        max_rank = max_lora_rank_for(max(ranks))
        base, revision = _base_ref(version)
        final_adapter = target / "adapter" / lora_name
        command = ["vllm", "serve", base, *(["--revision", revision] if revision else []), "--enable-lora",
                   "--lora-modules", f"{lora_name}={final_adapter}", "--max-lora-rank", str(max_rank),
                   "--max-loras", "2"]
        record = version.record
        defaults = record.get("generation_defaults") or {}
        request = {"model": lora_name, "messages": [{"role": "user", "content": _example_prompt(version)}],
                   "temperature": 0, "max_tokens": defaults.get("max_new_tokens", 128)}
        (staging / "serve.sh").write_text("#!/bin/sh\n# Serve the base with this release's adapter (vLLM multi-LoRA).\n"
                                          + shlex.join(command) + "\n", encoding="utf-8")
        (staging / "request.json").write_text(json.dumps(request, indent=2), encoding="utf-8")
        (staging / "request.sh").write_text(
            "#!/bin/sh\ncurl -s http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d @{shlex.quote(str(target / 'request.json'))}\n", encoding="utf-8")
        info = {"made_at": time.time(), "lora_name": lora_name, "command": shlex.join(command),
                "max_lora_rank": max_rank, "rank": adapter_config["r"],
                "target_modules": adapter_config.get("target_modules"), "base": base, "revision": revision,
                "request": request, "checked": ["peft_type LORA", f"rank {max(ranks)} <= --max-lora-rank {max_rank}",
                                                "target modules are linear layers vLLM adapts",
                                                "no DoRA, biases or modules_to_save"],
                "not_checked": "vLLM itself is not run here (it needs a GPU); the chat template is the base's, which "
                               "vLLM applies from the base folder."}
        rundir.write_json_atomic(staging / "bundle.json", info)
    log(f"vLLM bundle: {target}\n  {info['command']}")
    return {**info, "path": str(target)}


def _example_prompt(version: Version) -> str:
    report = rundir.read_json(version.path / "eval" / "report.json", default={}) or {}
    items = report.get("items") or []
    return items[0]["prompt"] if items else "Hello!"


# ----------------------------------------------------------------------------- GGUF
def llama_cpp_problem() -> str | None:
    """Why the GGUF bundle cannot be made on this machine, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        from engine.config.trackers import pip_command

        return (f"llama-cpp-python is not installed, so a GGUF cannot be verified in llama.cpp: install it with "
                f"`{pip_command('-r requirements-gguf.txt')}` ({GGUF_BUILD_NOTE}). The vLLM bundle needs nothing "
                "extra.")
    return None


def converter_dir(log=print) -> Path:
    """llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/) of the same version as the runtime.

    ``LORALAB_LLAMA_CPP_DIR`` (a llama.cpp checkout) wins; else the converter shipped inside the
    llama-cpp-python source of the installed version, fetched once with pip into the cache.
    """
    import llama_cpp

    from engine.demo import cache_root

    override = os.environ.get("LORALAB_LLAMA_CPP_DIR")
    if override:
        folder = Path(override).expanduser()
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise BundleError(f"LORALAB_LLAMA_CPP_DIR is {folder}, which has no convert_hf_to_gguf.py.")
        return folder
    version = llama_cpp.__version__
    folder = cache_root() / "llama-cpp-converter" / version
    if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "conversion").is_dir():
        return folder
    log(f"Fetching llama.cpp's converter from the llama-cpp-python {version} source (pip download, once).")
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "-d", scratch], capture_output=True, text=True)
        archives = list(Path(scratch).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise BundleError(f"llama.cpp's converter could not be fetched (pip download of the llama-cpp-python "
                              f"{version} source failed: {(done.stderr or '').strip().splitlines()[-1:]}); set "
                              "LORALAB_LLAMA_CPP_DIR to a llama.cpp checkout of the same version.")
        staging = folder.with_name(f".{version}-{uuid.uuid4().hex[:8]}")
        with tarfile.open(archives[0]) as archive:
            prefix = archive.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            wanted = [m for m in archive.getmembers() if m.name.startswith(prefix) and (
                m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith(prefix + "conversion/")
                or m.name.startswith(prefix + "gguf-py/gguf/"))]
            for member in wanted:
                member.name = member.name[len(prefix):]
            archive.extractall(staging, members=wanted, filter="data")
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another process fetched it first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
            if not (folder / "convert_hf_to_gguf.py").is_file():
                raise
    return folder


def convert(converter: Path, model_dir: Path, outfile: Path, outtype: str) -> None:
    done = subprocess.run([sys.executable, "-m", "engine.releases.gguf_convert", str(converter), str(model_dir),
                           str(outfile), outtype], capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parents[2]), env={**os.environ, "NO_LOCAL_GGUF": ""})
    if done.returncode == 3:
        raise BundleError(f"llama.cpp's converter does not support the architecture {done.stdout.strip()}: no GGUF "
                          "can be made for this base; serve the adapter with vLLM or the merged model with "
                          "transformers instead.")
    if done.returncode == 4:
        raise BundleError(f"llama.cpp's converter does not recognise this base's tokenizer ({done.stdout.strip()}); "
                          "a GGUF made anyway would split text differently from the trained model.")
    if done.returncode != 0 or not outfile.is_file():
        tail = " ".join((done.stderr or done.stdout or "").strip().splitlines()[-3:])[:600]
        raise BundleError(f"llama.cpp's converter failed for {outtype} (exit {done.returncode}): {tail}")


def _tolerance(outtype: str, scale: float, depth: int) -> float:
    return TOLERANCE_FACTOR * math.sqrt(max(depth, 1)) * UNIT_ROUNDOFF[outtype] * max(scale, 1.0)


def verify_gguf(path: Path, outtype: str, reference: list[dict], tokenizer, depth: int, n_ctx: int) -> dict:
    """Load ``path`` in llama.cpp; check prompt tokenization and greedy tokens against the HF reference."""
    import numpy as np
    from llama_cpp import Llama

    # logits_all: llama-cpp-python keeps the logits (``scores``) only then; the check reads every position.
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=max(1, min(2, os.cpu_count() or 1)), verbose=False,
                seed=0, logits_all=True)
    per_prompt, compared, agreeing, unexplained, worst, scale = [], 0, 0, 0, 0.0, 0.0
    tokenization_ok = True
    for item in reference:
        text = tokenizer.decode(item["ids"], skip_special_tokens=False)
        llama_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        same_tokens = list(llama_ids) == list(item["ids"])
        tokenization_ok &= same_tokens
        ref_logits = item["logits"].numpy()
        llm.reset()
        llm.eval(item["ids"])
        first_divergence, margins = None, []
        for step, token in enumerate(item["generated"]):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            ref = ref_logits[len(item["ids"]) + step - 1].astype(np.float64)
            scale = max(scale, float(np.abs(ref).max()))
            worst = max(worst, float(np.abs(logits - ref).max()))
            pick = int(logits.argmax())
            compared += 1
            if pick == token:
                agreeing += 1
            else:
                margins.append((step, float(ref[token] - ref[pick])))
                first_divergence = step if first_divergence is None else first_divergence
            llm.eval([token])  # teacher-forced on the reference's tokens, so every position is compared
        per_prompt.append({"prompt": item["prompt"], "tokenization_matches": same_tokens,
                           "greedy_tokens": len(item["generated"]), "first_divergence": first_divergence,
                           "divergence_margins": margins})
    tolerance = _tolerance(outtype, scale, depth)
    for row in per_prompt:
        row["unexplained"] = [step for step, margin in row["divergence_margins"] if margin >= 2 * tolerance]
        unexplained += len(row["unexplained"])
    del llm
    passed = tokenization_ok and unexplained == 0 and worst <= tolerance
    return {"type": outtype, "file": path.name, "bytes": path.stat().st_size, "passed": passed,
            "tokenization_matches": tokenization_ok, "tokens_compared": compared, "tokens_agreeing": agreeing,
            "agreement": agreeing / compared if compared else 1.0, "unexplained_divergences": unexplained,
            "max_abs_logit_diff": worst, "logit_scale": scale, "tolerance": tolerance,
            "unit_roundoff": UNIT_ROUNDOFF[outtype], "per_prompt": per_prompt}


CHATML_GO_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile(gguf_name: str, template: str | None, defaults: dict) -> tuple[str, str]:
    """The Ollama Modelfile and a sentence on how its template was made."""
    lines = [f"FROM ./{gguf_name}"]
    if template and "<|im_start|>" in template and "<|im_end|>" in template:
        lines += [f'TEMPLATE """{CHATML_GO_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"']
        how = ("The chat template is ChatML (<|im_start|>role ... <|im_end|>), written as Ollama's Go template; "
               "the Jinja original travels inside the GGUF as tokenizer.chat_template.")
    else:
        how = ("The chat template is not ChatML, so the Modelfile sets no TEMPLATE: Ollama uses the Jinja template "
               "the GGUF carries (tokenizer.chat_template) where it recognises it; check it before serving.")
    lines += ["PARAMETER temperature 0", f"PARAMETER num_predict {defaults.get('max_new_tokens', 128)}"]
    return "\n".join(lines) + "\n", how


def gguf_bundle(version: Version, log=print) -> dict:
    """``serving/gguf/`` of a version: model-f16.gguf, model-q8_0.gguf, Modelfile, bundle.json, all verified."""
    problem = llama_cpp_problem()
    if problem:
        raise BundleError(problem)
    verify_version(version)
    record = version.record
    run_dir = Path(record.get("run_path") or "")
    if not (run_dir / "config.yaml").is_file():
        raise BundleError(f"{version.label} came from run folder {run_dir}, which is gone: the merged model is made "
                          "from the run (base + adapter); restore the run to make a GGUF.")
    from engine.lineage import file_sha256

    run_weights = rundir.RunPaths(run_dir).adapter / "adapter_model.safetensors"
    if not run_weights.is_file() or file_sha256(run_weights)[0] != record["adapter"].get("weights_sha256"):
        raise BundleError(f"Run '{run_dir.name}' no longer holds the adapter of {version.label} (its weights' sha256 "
                          "changed since the release): a GGUF made now would not be this release.")
    converter = converter_dir(log)
    with _staged_bundle(version, "gguf") as (target, staging):
        from engine.export.exporter import export_run

        log(f"Merging {version.label} into its base (engine.export, verified) as fp16 safetensors.")
        merged = export_run(run_dir, staging / ".merged", kind="merged", dtype="fp16", name="merged",
                            progress=lambda fraction, message: None)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engine.export.verify import model_depth, reference_outputs

        tokenizer = AutoTokenizer.from_pretrained(str(merged.path))
        model = AutoModelForCausalLM.from_pretrained(str(merged.path), dtype=torch.float32).eval()
        reference = reference_outputs(model, tokenizer)
        depth = model_depth(model)
        n_ctx = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        del model
        results = []
        for outtype in GGUF_TYPES:
            path = staging / f"model-{outtype}.gguf"
            started = time.time()
            log(f"Converting with llama.cpp's convert_hf_to_gguf.py to {outtype}.")
            convert(converter, merged.path, path, outtype)
            seconds = time.time() - started
            check = verify_gguf(path, outtype, reference, tokenizer, depth, min(n_ctx, 4096))
            check["convert_seconds"] = round(seconds, 2)
            results.append(check)
            log(f"{path.name}: {check['bytes'] / 2**20:.2f} MiB; llama.cpp greedy tokens agree on "
                f"{check['tokens_agreeing']}/{check['tokens_compared']}, largest logit difference "
                f"{check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:.3g}); prompt tokenization "
                f"{'matches' if check['tokenization_matches'] else 'DIFFERS'}.")
        failed = [r for r in results if not r["passed"]]
        if failed:
            raise BundleError("The GGUF did not verify in llama.cpp: " + "; ".join(
                f"{r['file']}: tokenization {'matches' if r['tokenization_matches'] else 'differs'}, "
                f"{r['unexplained_divergences']} greedy divergence(s) not at a near tie, largest logit difference "
                f"{r['max_abs_logit_diff']:.3g} vs tolerance {r['tolerance']:.3g}" for r in failed) + ".")
        text, how = modelfile("model-q8_0.gguf", record.get("chat_template"), record.get("generation_defaults") or {})
        (staging / "Modelfile").write_text(text, encoding="utf-8")
        shutil.rmtree(staging / ".merged")
        import llama_cpp

        info = {"made_at": time.time(), "llama_cpp_python": llama_cpp.__version__, "converter": str(converter),
                "merged_from": "engine.export merged fp16 export (verified against base + adapter)",
                "template": how, "ollama": f"ollama create {version.name}-v{version.version} -f Modelfile",
                "files": {r["file"]: {"sha256": file_sha256(staging / r["file"])[0], "bytes": r["bytes"]}
                          for r in results}, "verification": results}
        rundir.write_json_atomic(staging / "bundle.json", info)
    log(f"GGUF bundle: {target}")
    return {**info, "path": str(target)}
