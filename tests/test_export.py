"""Export: adapter package and merged model from a real demo run, reloaded and checked here.

The checks in this file do not trust ``engine.export.verify``: they reload the exports
with plain transformers / PEFT themselves and compare against the run's adapter on the
base. Corrupted exports must fail verification, so the check is shown to be able to fail.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from engine.export.cli import main as cli_main
from engine.export.exporter import ExportError, export_run, list_exports, safe_export_dir, zip_export
from engine.export.verify import UNIT_ROUNDOFF, VerificationError, tolerance_for
from engine.training import rundir

PROMPT = [{"role": "user", "content": "Extract as JSON: the small green key is near the door."}]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exports_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def adapter_export(demo_lora_run, exports_dir):
    return export_run(demo_lora_run, exports_dir, kind="adapter")


@pytest.fixture(scope="module")
def merged_export(demo_lora_run, exports_dir):
    # A tiny shard size forces several shards, so sharding is exercised on a 4 MB model.
    return export_run(demo_lora_run, exports_dir, kind="merged", dtype="bf16", max_shard_size="1MB")


@pytest.fixture(scope="module")
def tokenizer(demo_lora_run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(rundir.RunPaths(demo_lora_run).adapter))


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    encoded = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    return encoded["input_ids"]


def base_model(demo_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def run_model(demo_model_dir, demo_lora_run):
    """The run as trained: float32 base + the run's adapter, unmerged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(demo_model_dir), str(rundir.RunPaths(demo_lora_run).adapter)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def greedy(model, ids, tokenizer, n=20):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


# ----------------------------------------------------------------------------- the two exports
def test_adapter_package_reloads_with_peft_and_matches_the_run(adapter_export, demo_model_dir, run_model,
                                                              prompt_ids, tokenizer):
    from peft import PeftModel
    from transformers import AutoTokenizer

    folder = adapter_export.path
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "lineage.json"):
        assert (folder / name).is_file(), name
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    reloaded = PeftModel.from_pretrained(base_model(demo_model_dir), str(folder)).eval()
    expected, got = logits(run_model, prompt_ids), logits(reloaded, prompt_ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())
    # The adapter does something, so agreement above is not agreement between two bases.
    with run_model.disable_adapter():
        assert float((logits(run_model, prompt_ids) - expected).abs().max()) > 1.0
    assert greedy(reloaded, prompt_ids, tokenizer) == greedy(run_model, prompt_ids, tokenizer)
    report = adapter_export.report
    assert report.passed and report.max_abs_logit_diff <= report.tolerance
    assert report.stored_dtype == "float32" and report.greedy_agreement == 1.0


def test_merged_model_reloads_with_plain_transformers_within_bf16_tolerance(merged_export, run_model, prompt_ids,
                                                                          tokenizer):
    from transformers import AutoModelForCausalLM

    folder = merged_export.path
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("adapter_*"))
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    stored = AutoModelForCausalLM.from_pretrained(str(folder))
    assert next(stored.parameters()).dtype == torch.bfloat16
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    expected, got = logits(run_model, prompt_ids), logits(reloaded, prompt_ids)
    difference = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    # bf16 keeps 8 significant bits: the merged weights moved by at most 2^-8 of themselves.
    assert difference <= tolerance_for("bfloat16", scale, depth=4)
    assert difference > 0  # it really is bf16, not a float32 copy
    print(f"merged bf16: max logit difference {difference:.4f} = "
          f"{difference / scale / UNIT_ROUNDOFF['bfloat16']:.1f} u of logit scale {scale:.2f}")
    assert greedy(reloaded, prompt_ids, tokenizer) == greedy(run_model, prompt_ids, tokenizer)
    assert merged_export.report.passed and merged_export.report.stored_dtype == "bfloat16"


def test_card_and_lineage_name_the_right_hashes(adapter_export, merged_export, demo_model_dir, demo_lora_run):
    from engine.demo import demo_dataset_path
    from engine.lineage import folder_content_hash, git_commit

    base_hash = folder_content_hash(demo_model_dir)["content_sha256"]
    train_hash, eval_hash = sha256(demo_dataset_path("train")), sha256(demo_dataset_path("eval"))
    adapter_hash = sha256(rundir.RunPaths(demo_lora_run).adapter / "adapter_model.safetensors")
    summary = rundir.summarize_run(demo_lora_run)
    for export in (adapter_export, merged_export):
        card = (export.path / "README.md").read_text()
        record = json.loads((export.path / "lineage.json").read_text())
        for value in (base_hash, train_hash, eval_hash, adapter_hash):
            assert value in card
        assert record["base_model"]["content_sha256"] == base_hash
        assert record["data"]["train"]["sha256"] == train_hash and record["data"]["train"]["num_rows"] == 1200
        assert record["data"]["eval"]["sha256"] == eval_hash and record["data"]["eval"]["num_rows"] == 200
        assert record["adapter"]["weights_sha256"] == adapter_hash
        assert record["adapter"]["config"]["r"] == 16 and "| r | 16 |" in card
        assert record["metrics"]["final_eval_loss"] == pytest.approx(summary.eval_loss)
        assert f"{summary.eval_loss:.4f}" in card and f"{summary.train_loss:.4f}" in card
        assert record["software"]["at_export"]["loralab_git"]["commit"] == git_commit()["commit"]
        commit = record["software"]["at_training"]["loralab_git"]["commit"]
        assert commit is None or commit in card
        assert "Blind A/B win rate" in card
        assert record["prompt_template"]["text"] in card
        # Every other file in the folder is hashed in lineage.json, and the hashes are right.
        files = {p.name for p in export.path.iterdir()} - {"README.md", "lineage.json"}
        assert set(record["export"]["files"]) == files
        for name, entry in record["export"]["files"].items():
            assert entry["sha256"] == sha256(export.path / name)
    assert (adapter_export.path / "adapter_model.safetensors").read_bytes() == \
        (rundir.RunPaths(demo_lora_run).adapter / "adapter_model.safetensors").read_bytes()


def test_card_metadata_reads_back_with_huggingface_hubs_own_parser(adapter_export, merged_export, demo_lora_run):
    from huggingface_hub import ModelCard

    summary = rundir.summarize_run(demo_lora_run)
    for export, library in ((adapter_export, "peft"), (merged_export, "transformers")):
        card = ModelCard.load(export.path / "README.md")
        data = card.data
        assert data.library_name == library and data.pipeline_tag == "text-generation"
        assert {"loralab", "lora", "trl", "sft"} <= set(data.tags) and ("merged" in data.tags) == (library != "peft")
        assert data.base_model is None and data.datasets is None  # the demo base and data are not on the Hub
        assert data.model_name == export.name
        (result,) = data.eval_results  # the model-index entry
        assert result.metric_type == "loss" and result.metric_value == pytest.approx(summary.eval_loss, abs=1e-6)
        assert result.task_type == "text-generation" and result.dataset_split == "eval"
        assert card.text.lstrip().startswith(f"# {export.name}")


def test_card_snippet_loads_and_generates(adapter_export, merged_export, exports_dir, monkeypatch, capsys):
    monkeypatch.chdir(exports_dir)
    for export in (adapter_export, merged_export):
        card = (export.path / "README.md").read_text()
        snippet = card.split("## Load it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
        exec(compile(snippet, f"{export.name}/README.md", "exec"), {})
        printed = capsys.readouterr().out.strip()
        assert printed  # the model answered something
        assert "{" in printed or "object" in printed, printed  # the demo adapter answers in JSON


# ----------------------------------------------------------------------------- verification can fail
@pytest.fixture(scope="module")
def reference(run_model, tokenizer):
    from engine.export.verify import reference_outputs

    return reference_outputs(run_model, tokenizer)


def test_merged_export_without_the_adapter_fails_verification(tmp_path, demo_model_dir, reference, tokenizer):
    from engine.export.verify import verify_export

    base = base_model(demo_model_dir).to(torch.bfloat16)
    base.save_pretrained(str(tmp_path))
    with pytest.raises(VerificationError) as caught:
        verify_export(tmp_path, "merged", "bfloat16", reference, tokenizer)
    assert caught.value.report.max_abs_logit_diff > caught.value.report.tolerance
    assert "does not reproduce" in str(caught.value)


def test_merged_export_with_wrong_lora_scaling_fails_verification(tmp_path, demo_model_dir, demo_lora_run, reference,
                                                                  tokenizer):
    """A 10% error in alpha/r, a plausible bug, is far outside bf16 rounding."""
    from peft import PeftModel

    from engine.export.verify import verify_export

    model = PeftModel.from_pretrained(base_model(demo_model_dir), str(rundir.RunPaths(demo_lora_run).adapter))
    for module in model.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] *= 1.1
    model.merge_and_unload().to(torch.bfloat16).save_pretrained(str(tmp_path))
    with pytest.raises(VerificationError) as caught:
        verify_export(tmp_path, "merged", "bfloat16", reference, tokenizer)
    report = caught.value.report
    assert report.max_abs_logit_diff > 2 * report.tolerance


def test_merged_export_with_a_non_finite_weight_fails_verification(tmp_path, merged_export, reference, tokenizer):
    """NaN logits must fail (a plain max() would skip them): an fp16 overflow looks like this."""
    from safetensors.torch import load_file, save_file

    from engine.export.verify import verify_export

    shutil.copytree(merged_export.path, tmp_path / "corrupt")
    shard = sorted((tmp_path / "corrupt").glob("model-*.safetensors"))[-1]
    weights = load_file(str(shard))
    victim = sorted(k for k in weights if k.endswith("weight"))[0]
    weights[victim][0, 0] = float("nan")
    save_file(weights, str(shard), metadata={"format": "pt"})
    with pytest.raises(VerificationError) as caught:
        verify_export(tmp_path / "corrupt", "merged", "bfloat16", reference, tokenizer)
    assert caught.value.report.max_abs_logit_diff == float("inf")


def test_adapter_package_with_a_zeroed_matrix_fails_verification(tmp_path, adapter_export, demo_model_dir,
                                                                 reference, tokenizer):
    from safetensors.torch import load_file, save_file

    from engine.export.verify import verify_export

    shutil.copytree(adapter_export.path, tmp_path / "corrupt")
    weights_path = tmp_path / "corrupt" / "adapter_model.safetensors"
    weights = load_file(str(weights_path))
    victim = sorted(k for k in weights if "layers.0." in k and "lora_B" in k)[0]
    weights[victim] = torch.zeros_like(weights[victim])
    save_file(weights, str(weights_path), metadata={"format": "pt"})
    with pytest.raises(VerificationError):
        verify_export(tmp_path / "corrupt", "adapter", "float32", reference, tokenizer, base_path=str(demo_model_dir))


def test_a_failed_verification_keeps_nothing(demo_lora_run, tmp_path, monkeypatch):
    """A merge that silently drops the adapter (unload instead of merge) fails the export loudly."""
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(VerificationError) as caught:
        export_run(demo_lora_run, tmp_path, kind="merged", dtype="bf16", name="broken")
    assert "was not kept" in str(caught.value) and "FAILED" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", ["../evil", "..", "a/../b", "/tmp/evil", "sub/dir", "back\\slash", ".hidden", "",
                                  "  ", "x.zip", "C:evil", "a" * 101])
def test_unsafe_export_names_are_refused(name, tmp_path):
    with pytest.raises(ExportError) as caught:
        safe_export_dir(tmp_path, name)
    assert "not a valid export name" in str(caught.value)


def test_export_with_a_traversal_name_writes_nothing(demo_lora_run, tmp_path):
    exports = tmp_path / "exports"
    with pytest.raises(ExportError, match="not a valid export name"):
        export_run(demo_lora_run, exports, kind="adapter", name="../escaped")
    assert not (tmp_path / "escaped").exists()
    assert not exports.exists() or list(exports.iterdir()) == []
    with pytest.raises(ExportError, match="not a valid export name"):
        zip_export(exports, "../../etc")


def test_export_name_through_a_symlink_is_refused(tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "link").symlink_to(tmp_path)
    with pytest.raises(ExportError, match="outside the exports folder"):
        safe_export_dir(exports, "link")


def make_run(runs_dir: Path, state: str | None, **fields) -> Path:
    from engine.config import load_preset

    run_dir = rundir.create_run(runs_dir, load_preset("demo-lora"))
    if state:
        rundir.update_status(run_dir, state, **fields)
    return run_dir


@pytest.mark.parametrize("state, expected", [
    (None, "has no adapter yet: it is queued"),
    ("training", "has no adapter yet: it is training"),
    ("failed", "failed before saving one (CUDA out of memory)"),
    ("completed", "holds no adapter_config.json"),
])
def test_a_run_without_an_adapter_says_why(tmp_path, state, expected):
    run_dir = make_run(tmp_path / "runs", state, **({"error": "CUDA out of memory"} if state == "failed" else {}))
    with pytest.raises(ExportError) as caught:
        export_run(run_dir, tmp_path / "exports", kind="merged")
    assert expected in str(caught.value)
    assert run_dir.name in str(caught.value)


def test_a_run_that_is_training_again_is_not_exported(demo_lora_run, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(demo_lora_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    with rundir.hold_worker_lock(copy):  # this test plays its live worker
        rundir.update_status(copy, "training")
        with pytest.raises(ExportError, match="is training right now"):
            export_run(copy, tmp_path / "exports", kind="adapter")


def test_existing_export_is_not_overwritten_unless_asked(adapter_export, demo_lora_run, exports_dir):
    with pytest.raises(ExportError, match="already exists"):
        export_run(demo_lora_run, exports_dir, kind="adapter", name=adapter_export.name)


def test_shard_sizes_are_read_by_transformers_and_handed_on_as_bytes():
    """save_pretrained gets bytes: given text, transformers 5 hands it to huggingface_hub, which has no GiB."""
    from huggingface_hub.serialization._base import parse_size_to_int

    from engine.export.exporter import parse_shard_size

    assert parse_shard_size("2GB") == 2 * 10**9 and parse_shard_size(" 500 MB ") == 500 * 10**6
    assert parse_shard_size("5GiB") == 5 * 2**30 and parse_shard_size("1MiB") == 2**20
    assert parse_shard_size("2gb") == 2 * 10**9 and parse_shard_size("5gib") == 5 * 2**30  # units in any case
    with pytest.raises(ValueError, match="not supported"):
        parse_size_to_int("5GiB")  # why the text must not reach save_pretrained


@pytest.mark.parametrize("size", ["2 gigabytes", "0.5GB", "-1GB", "100KB", ""])
def test_bad_shard_sizes_and_dtypes_are_refused(demo_lora_run, tmp_path, size):
    with pytest.raises(ExportError, match="shard size"):
        export_run(demo_lora_run, tmp_path, kind="merged", max_shard_size=size)
    with pytest.raises(ExportError, match="use bf16 or fp16"):
        export_run(demo_lora_run, tmp_path, kind="merged", dtype="int8")


def test_merge_is_refused_when_the_disk_is_too_full(demo_lora_run, tmp_path, monkeypatch):
    import engine.export.exporter as export

    real = shutil.disk_usage
    monkeypatch.setattr(export.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1000))  # this machine's disk is not full: pretend
    with pytest.raises(ExportError, match="Not enough free disk space") as caught:
        export_run(demo_lora_run, tmp_path, kind="merged")
    assert "merged model needs about" in str(caught.value)
    assert [p for p in tmp_path.iterdir()] == []


def test_a_changed_base_model_is_refused(demo_lora_run, tmp_path):
    record = json.loads(rundir.RunPaths(demo_lora_run).lineage.read_text())
    fake_run = tmp_path / "run"
    shutil.copytree(demo_lora_run, fake_run, ignore=shutil.ignore_patterns("checkpoints"))
    record["base_model"]["content_sha256"] = "0" * 64
    rundir.write_json_atomic(rundir.RunPaths(fake_run).lineage, record)
    with pytest.raises(ExportError, match="has changed since run"):
        export_run(fake_run, tmp_path / "exports", kind="adapter")


# ----------------------------------------------------------------------------- zip, listing, CLI
def test_zip_holds_the_export_and_is_reused(adapter_export, exports_dir):
    steps = []
    archive = zip_export(exports_dir, adapter_export.name, progress=lambda f, m: steps.append(f))
    assert archive.parent == exports_dir.resolve() and archive.name == f"{adapter_export.name}.zip"
    with zipfile.ZipFile(archive) as handle:
        names = set(handle.namelist())
        expected = {f"{adapter_export.name}/{p.name}" for p in adapter_export.path.iterdir()}
        assert names == expected
        assert handle.read(f"{adapter_export.name}/adapter_model.safetensors") == \
            (adapter_export.path / "adapter_model.safetensors").read_bytes()
    assert steps and steps[-1] == 1.0
    mtime = archive.stat().st_mtime_ns
    assert zip_export(exports_dir, adapter_export.name) == archive and archive.stat().st_mtime_ns == mtime
    listed = {item["name"]: item for item in list_exports(exports_dir)}
    assert listed[adapter_export.name]["kind"] == "adapter" and listed[adapter_export.name]["verified"] is True


def test_cli_exports_merged_fp16_with_zip(demo_lora_run, tmp_path, capsys):
    code = cli_main([demo_lora_run.name, "--runs-dir", str(demo_lora_run.parent), "--exports-dir", str(tmp_path),
                     "--merged", "--dtype", "fp16", "--name", "cli-fp16", "--zip"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Verification passed" in out
    config = json.loads((tmp_path / "cli-fp16" / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert (tmp_path / "cli-fp16.zip").is_file()
    record = json.loads((tmp_path / "cli-fp16" / "lineage.json").read_text())
    relative = record["verification"]["relative_diff"]
    print(f"merged fp16: relative logit difference {relative:.2e} = {relative / UNIT_ROUNDOFF['float16']:.1f} u")


def test_cli_errors_are_sentences(demo_lora_run, tmp_path, capsys):
    code = cli_main([demo_lora_run.name, "--runs-dir", str(demo_lora_run.parent), "--exports-dir", str(tmp_path),
                     "--name", "../x"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: '../x' is not a valid export name") and "Traceback" not in err
    assert cli_main(["no-such-run", "--runs-dir", str(tmp_path)]) == 1
    assert "No run named 'no-such-run'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- QLoRA
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, demo_model_dir) -> Path:
    """A QLoRA run folder with a (random, untrained) adapter: the export path does not need training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from engine.config import load_preset
    from engine.lineage import model_lineage, software_lineage

    run_dir = rundir.create_run(tmp_path_factory.mktemp("qruns"), load_preset("demo-qlora"), name="qlora-run")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    model = get_peft_model(base_model(demo_model_dir), lora)
    paths = rundir.RunPaths(run_dir)
    model.save_pretrained(str(paths.adapter))
    AutoTokenizer.from_pretrained(str(demo_model_dir)).save_pretrained(str(paths.adapter))
    rundir.write_json_atomic(paths.lineage, {"base_model": model_lineage("demo", str(demo_model_dir), None),
                                           "data": {}, "software": software_lineage(), "method": "qlora"})
    rundir.update_status(run_dir, "completed", step=0)
    return run_dir


def test_qlora_merge_is_onto_the_full_precision_base_and_the_card_says_so(qlora_run, tmp_path):
    result = export_run(qlora_run, tmp_path, kind="merged", dtype="bf16")
    card = (result.path / "README.md").read_text()
    assert "4-bit NF4" in card and "not onto the 4-bit weights" in card
    assert result.report.passed
    gap = result.lineage["quantization_gap"]
    assert gap is not None and gap["max_abs_logit_diff"] > result.report.max_abs_logit_diff
    assert "On the 4-bit base it was trained with" in card
    config = json.loads((result.path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def test_card_reports_the_blind_win_rate(adapter_export):
    from engine.export.card import render_card

    record = json.loads((adapter_export.path / "lineage.json").read_text())
    record["ratings"] = {"win_rate": 0.75, "wins": 6, "count": 8}
    assert "75% (6 of 8 ratings preferred the fine-tuned answer)" in render_card(record)
    # The written card says what its own lineage.json says (other tests may have rated this run).
    written = json.loads((adapter_export.path / "lineage.json").read_text())["ratings"]
    card = (adapter_export.path / "README.md").read_text()
    if written["win_rate"] is None:
        assert "no blind ratings recorded" in card
    else:
        assert f"{written['win_rate']:.0%} ({written['wins']} of {written['count']} ratings" in card

