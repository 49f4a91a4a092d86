"""Releases: names and paths refused, promotion refused and accepted, --force recorded, rollback, tampering
caught, the vLLM bundle's checks, and a GGUF from a demo run verified in llama.cpp."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.releases import store
from engine.releases.bundles import max_lora_rank_for, modelfile, vllm_problems
from engine.releases.gate import Gate
from engine.releases.store import ReleaseError


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "a\\b", "C:evil", "x" * 101])
def test_bad_release_names_are_refused_before_any_path(tmp_path, name):
    with pytest.raises(ReleaseError, match="is not a valid release name"):
        store.release_root(tmp_path, name)
    with pytest.raises(ReleaseError, match="is not a valid release name"):
        store.resolve_version(tmp_path, name)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_a_planted_symlink_cannot_lead_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    releases = tmp_path / "releases"
    releases.mkdir()
    os.symlink(outside, releases / "linked")
    with pytest.raises(ReleaseError, match="would resolve outside the releases folder"):
        store.release_root(releases, "linked")


def test_versions_and_history_replay():
    assert store.parse_version("v3") == 3 and store.parse_version("12") == 12
    assert store.parse_version("v0") is None and store.parse_version("../v1") is None
    log = [{"action": "promote", "version": 1}, {"action": "refused"}, {"action": "promote", "version": 2},
           {"action": "promote", "version": 3}, {"action": "rollback"}]
    assert store.stack(log) == [1, 2]


def test_vllm_checks_what_vllm_refuses():
    good = {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    assert vllm_problems(good) == [] and max_lora_rank_for(16) == 16 and max_lora_rank_for(17) == 32
    assert "DoRA" in " ".join(vllm_problems({**good, "use_dora": True}))
    assert "biases" in " ".join(vllm_problems({**good, "bias": "all"}))
    assert "above vLLM's largest" in " ".join(vllm_problems({**good, "r": 1024}))
    assert "modules_to_save" in " ".join(vllm_problems({**good, "modules_to_save": ["lm_head"]}))
    assert "not linear layers" in " ".join(vllm_problems({**good, "target_modules": ["embed_tokens"]}))


def test_modelfile_carries_the_chat_template():
    text, how = modelfile("model-q8_0.gguf", "{{ '<|im_start|>' }}...<|im_end|>", {"max_new_tokens": 64})
    assert text.startswith("FROM ./model-q8_0.gguf") and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "num_predict 64" in text and "ChatML" in how
    text, how = modelfile("m.gguf", "{{ bos_token }}[INST]", {})
    assert "TEMPLATE" not in text and "not ChatML" in how


# ----------------------------------------------------------------------------- on the demo run
@pytest.fixture(scope="module")
def release_run(demo_lora_run, tmp_path_factory) -> Path:
    """A copy of the session's demo run (without checkpoints), so its eval/ folder is this module's own."""
    target = tmp_path_factory.mktemp("release-runs") / demo_lora_run.name
    shutil.copytree(demo_lora_run, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target


@pytest.fixture(scope="module")
def promoted(release_run, tmp_path_factory):
    """Release 'extract': v1 accepted against the base, then the same adapter again, refused and forced as v2."""
    from engine.releases.report import make_report

    releases = tmp_path_factory.mktemp("releases")
    quiet = lambda *_: None
    make_report(release_run, limit=4, metric="token_f1", log=quiet)
    first = store.promote(releases, release_run, "extract", gate=Gate(), log=quiet)
    make_report(release_run, limit=4, metric="token_f1", against="extract", releases_dir=releases, log=quiet)
    # The same adapter against itself gains 0 points; latency is measured on a shared machine, so its limit
    # here is wide (the latency criterion's sentence is checked in tests/test_eval_report.py).
    gate = Gate(max_latency_increase_pct=500)
    with pytest.raises(store.PromotionRefused) as refused:
        store.promote(releases, release_run, "extract", gate=gate, log=quiet)
    second = store.promote(releases, release_run, "extract", gate=gate, force=True, note="forced in a test",
                           log=quiet)
    return releases, first, refused.value, second


@pytest.mark.slow
def test_promotion_accepted_refused_forced_and_rolled_back(promoted, release_run):
    releases, first, refused, second = promoted
    assert first["version"] == 1 and first["decision"].passed and first["decision"].baseline == "base"
    assert "task metric FAILED" in str(refused) and "+0.0 points, required +2.0" in str(refused)
    assert "2.0 points short" in str(refused)
    assert second["version"] == 2 and second["decision"].forced
    record = json.loads((releases / "extract" / "v2" / "release.json").read_text())
    assert record["forced"] is True and record["base_model"]["content_sha256"]
    assert record["adapter"]["files"]["adapter_model.safetensors"]["sha256"] == record["adapter"]["weights_sha256"]
    assert "<|im_start|>" in record["chat_template"] and record["generation_defaults"]["do_sample"] is False
    for item in ("adapter/adapter_model.safetensors", "eval/report.json", "eval/report.html", "README.md",
                 "lineage.json"):
        assert (releases / "extract" / "v2" / item).is_file(), item
    assert "by force" in (releases / "extract" / "v2" / "README.md").read_text()
    assert not (releases / "extract" / "v2" / "adapter" / "training_args.bin").exists()  # a pickle: not shipped
    assert [r["action"] for r in store.history(releases, "extract")] == ["promote", "refused", "promote"]
    assert store.resolve_version(releases, "extract", "current").version == 2
    assert store.resolve_version(releases, "extract", "previous").version == 1

    source = store.release_source(releases, "extract", "previous")  # the Chat tab's loader
    assert source.path == releases / "extract" / "v1" / "adapter" and source.base_model == "demo"

    store.rollback(releases, "extract", reason="test", log=lambda *_: None)
    assert store.resolve_version(releases, "extract").version == 1
    assert [r["action"] for r in store.history(releases, "extract")][-1] == "rollback"
    with pytest.raises(ReleaseError, match="no previous version"):
        store.rollback(releases, "extract", log=lambda *_: None)
    info = store.show(releases, "extract")
    assert info["current"] == 1 and [v["version"] for v in info["versions"]] == [1, 2]
    assert store.list_releases(releases)[0]["current"] == 1
    with pytest.raises(ReleaseError, match="There is no release named 'other'"):
        store.show(releases, "other")

    # Nothing outside the releases folder was written by the release actions (the run gained only eval/).
    assert sorted(p.name for p in releases.iterdir()) == ["extract"]
    with pytest.raises(ReleaseError, match="would resolve|not a valid release name"):
        store.promote(releases, release_run, "../escape", log=lambda *_: None)


@pytest.mark.slow
def test_tampered_release_and_stale_report_are_refused(promoted, release_run, tmp_path):
    releases = tmp_path / "releases"
    shutil.copytree(promoted[0], releases)
    weights = releases / "extract" / "v1" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ReleaseError, match="adapter_model.safetensors has sha256 .* do not serve it"):
        store.verify_version(store.resolve_version(releases, "extract", "v1"))
    # A report made against v1 is stale once v2 is current again.
    store.promote(releases, release_run, "extract", gate=Gate(), force=True, log=lambda *_: None)
    with pytest.raises(ReleaseError, match="was made against v1 of 'extract', but the current release is extract v3"):
        store.promote(releases, release_run, "extract", gate=Gate(), log=lambda *_: None)


@pytest.mark.slow
def test_vllm_bundle_of_a_release(promoted):
    from engine.releases.bundles import vllm_bundle

    releases = promoted[0]
    info = vllm_bundle(store.resolve_version(releases, "extract", "v1"), log=lambda *_: None)
    folder = Path(info["path"])
    assert folder == releases / "extract" / "v1" / "serving" / "vllm"
    assert f"--lora-modules extract-v1={folder}/adapter/extract-v1" in info["command"]
    assert "--enable-lora" in info["command"] and "--max-lora-rank 16" in info["command"]
    assert (folder / "adapter" / "extract-v1" / "adapter_config.json").is_file()
    assert json.loads((folder / "request.json").read_text())["model"] == "extract-v1"


@pytest.mark.slow
def test_a_bundle_that_fails_midway_leaves_the_last_good_one(promoted, monkeypatch):
    """A bundle is made in a staging folder: a failure (here the disk, while writing bundle.json) removes it and
    leaves the bundle made before untouched; nothing half-made stands under serving/."""
    from engine.releases import bundles

    version = store.resolve_version(promoted[0], "extract", "v2")
    good = Path(bundles.vllm_bundle(version, log=lambda *_: None)["path"])
    before = (good / "bundle.json").read_text()

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundles.rundir, "write_json_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        bundles.vllm_bundle(version, log=lambda *_: None)
    assert sorted(p.name for p in good.parent.iterdir()) == ["vllm"]  # no .staging-* folder left
    assert (good / "bundle.json").read_text() == before


@pytest.mark.slow
def test_gguf_bundle_verified_in_llama_cpp(promoted):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional: pip install -r requirements-gguf.txt")
    from engine.releases.bundles import gguf_bundle

    releases = promoted[0]
    info = gguf_bundle(store.resolve_version(releases, "extract", "v1"), log=print)
    folder = Path(info["path"])
    for check in info["verification"]:
        print(f"{check['file']}: {check['bytes']} bytes, tokens {check['tokens_agreeing']}/{check['tokens_compared']}, "
              f"max logit diff {check['max_abs_logit_diff']:.4g} (tolerance {check['tolerance']:.4g})")
        assert check["passed"] and check["tokenization_matches"] and check["unexplained_divergences"] == 0
        assert (folder / check["file"]).is_file()
    assert {c["type"] for c in info["verification"]} == {"f16", "q8_0"}
    assert (folder / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf")
    assert not (folder / ".merged").exists()


@pytest.mark.slow
def test_ui_handlers_release_section_and_chat(promoted, release_run, tmp_path):
    from ui import chat_tab, export_tab
    from ui.context import AppContext

    releases = tmp_path / "releases"
    shutil.copytree(promoted[0], releases)
    ctx = AppContext(runs_dir=release_run.parent, exports_dir=tmp_path / "exports", releases_dir=releases)
    assert "| extract | v1 | - | v1, v2 |" in export_tab.release_overview(releases)
    text, _ = export_tab.do_promote(ctx, release_run.name, "../x", 2, 0, 0, 10, False)
    assert "Promotion failed" in text and "is not a valid release name" in text
    text, _ = export_tab.do_rollback(ctx, "extract")
    assert "no previous version" in text  # v1 is current after the module's rollback; nothing before it
    text, overview = export_tab.do_promote(ctx, release_run.name, "extract", 2, 0, 0, 500, True)
    assert "v3 is current" in text and "FORCED" in text and "| extract | v3 | v1 |" in overview
    check_current_beside_previous(ctx, chat_tab)
    text, overview = export_tab.do_rollback(ctx, "extract")
    assert "from v3 to v1" in text
    folder, against, state, _ = chat_tab.load_release_pair(ctx, "extract")
    assert "Release 'extract' has no previous version" in state  # after the rollback only v1 has been current
    # The Chat tab loads a release's versions on one base: current, then previous, without reloading it.
    state, _ = chat_tab.load_adapter(ctx, None, None, "release:extract@v2")
    assert "release extract v2" in state
    state, _ = chat_tab.load_adapter(ctx, None, None, "release:extract")
    assert "release extract v1 (current)" in state and "read from disk once" in state
    state, _ = chat_tab.load_adapter(ctx, None, None, "release:../etc")
    assert "is not a valid release name" in state


def check_current_beside_previous(ctx, chat_tab):
    """Current (v3) on the right beside previous (v1) on the left, both on one copy of the base: the left side
    answers with v1's adapter (the same weights as v3 here, so the same greedy answer), not with the base, and its
    blind ratings are tallied apart from the ratings against the base."""
    from engine.chat import BASE, FINETUNED, Sampling
    from engine.chat.ratings import read_ratings

    assert chat_tab.release_choices(ctx.releases_dir) == [("extract (current v3, previous v1)", "extract")]
    folder, against, state, rate = chat_tab.load_release_pair(ctx, "extract")
    assert (folder, against) == ("release:extract@current", "release:extract@previous")
    assert "Active adapter: release extract v3 (current)" in state and "read from disk once" in state
    assert "Left side: release extract v1 (previous)" in state
    assert rate == "No blind ratings against release extract v1 (previous) yet."
    left, right = chat_tab.side_labels(ctx)
    assert left["label"] == "Left: release extract v1 (previous)"
    assert right["label"] == "Right: release extract v3 (current)"

    models = ctx.chat
    prompt = [{"role": "user", "content": "Extract as JSON: the big red box is on the table."}]
    sampling = Sampling(greedy=True, max_new_tokens=40)
    previous, current = (models.answer(prompt, side, sampling) for side in (BASE, FINETUNED))
    assert previous == current  # v1 and v3 hold the same adapter weights
    chat_tab.load_adapter(ctx, None, None, "release:extract", "")  # left side empty again: the base, adapter off
    base = models.answer(prompt, BASE, sampling)
    assert base != current and models.base_loads == 1, (base, current)

    chat_tab.load_release_pair(ctx, "extract")
    *_, session, _, _, _, _, _ = list(chat_tab.run_batch(ctx, chat_tab.SOURCE_LINES, None, prompt[0]["content"], 0,
                                                         True, "", 0.2, 0.9, 40, 1.0, 0, True))[-1]
    assert session.against_label == "release extract v1 (previous)"
    assert chat_tab.labeled_headers(session)[1:3] == ["release extract v1 (previous) (left)",
                                                      "release extract v3 (current) (right)"]
    assert session.rows[0]["base"] == session.rows[0]["finetuned"] == current
    *_, tally = chat_tab.rate("tie", session)
    assert tally.startswith("Right side preferred over release extract v1 (previous) in 0 of 1 blind rating")
    version_dir = ctx.releases_dir / "extract" / "v3"
    assert [r["against"] for r in read_ratings(version_dir, session.against)] == [session.against]
    assert read_ratings(version_dir) == []  # nothing counted as a win (or loss) against the base

    # The CLI twin: `release compare` answers the release run's held-out prompts with previous and current.
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    done = subprocess.run([sys.executable, "-m", "engine", "release", "compare", "extract", "--limit", "1", "--greedy",
                           "--max-new-tokens", "40", "--json", "--releases-dir", str(ctx.releases_dir)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["sides"] == {"left": "release extract v1 (previous)", "right": "release extract v3 (current)"}
    assert document["against"].endswith("extract/v1/adapter") and document["blind_ratings"]["count"] == 1
    (row,) = document["results"]
    assert row["prompt"].startswith("Extract as JSON") and row["base"] == row["finetuned"] and row["reference"]


def test_missing_llama_cpp_is_a_sentence(monkeypatch):
    from engine.releases import bundles

    real = bundles.importlib.util.find_spec
    monkeypatch.setattr(bundles.importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real(name))
    sentence = bundles.llama_cpp_problem()
    assert "llama-cpp-python is not installed" in sentence and "-r requirements-gguf.txt" in sentence


def test_an_unsupported_architecture_is_a_sentence(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional: pip install -r requirements-gguf.txt")
    from engine.releases.bundles import BundleError, convert, converter_dir

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(BundleError, match="does not support the architecture NoSuchModelForCausalLM"):
        convert(converter_dir(), model, tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()
