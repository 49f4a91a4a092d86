"""Pretraining the offline demo's base model: corpus, tokenizer, curriculum, skill check.

``python -m engine demo --rebuild-weights`` runs this once (about half an hour on 2 busy
cores) and writes the model into ``presets/demo-model/`` with a manifest (sha256 of every
file, the recipe, the seed, the measured skills). The folder is committed, so nobody builds
it at start-up or in CI; ``engine.demo.ensure_demo_model`` only checks the hashes.

Why the base can be made to copy words at all (the earlier one-minute build could not):

- The tokenizer splits text into word runs and single non-word characters *before* BPE,
  so a word is the same token wherever it stands: ``cup`` in "the big black cup" and in
  ``"cup"`` is one id. Copying a word is then moving one embedding (tied to the output
  layer), not mapping " cup" to "cup".
- A curriculum: questions that each copy one word come first and alone, until attention
  has learned to find the size / color / object / place in a sentence; the mix of prose
  and list answers follows, with the copy questions kept in it so the skill is not forgotten.

The base never sees JSON objects: "Extract as JSON:" is what the LoRA adapter teaches, on
top of the copying skill the base has. ``check_skills`` measures both on held-out sentences.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from engine import demo

# The base's instructions. Each maps a scene to (prompt, answer); every answer but the
# prose ones is a word copied from the sentence, so the base learns to read it.
FIELDS = ("object", "size", "color", "relation", "place")


def _task_answers(scene: dict, sentence: str) -> dict[str, tuple[str, str]]:
    s = scene
    return {
        "object": (f"What is it? {sentence}", f"It is a {s['object']}."),
        "size": (f"What size is it? {sentence}", f"It is {s['size']}."),
        "color": (f"What color is it? {sentence}", f"It is {s['color']}."),
        "where": (f"Where is it? {sentence}", f"It is {s['relation']} the {s['place']}."),
        "place": (f"What place is named? {sentence}", f"The {s['place']}."),
        "list": (f"List the facts: {sentence}", ", ".join(f"{key}: {s[key]}" for key in FIELDS)),
        "repeat": (f"Repeat: {sentence}", sentence),
        "describe": (
            f"Describe: {sentence}",
            f"The {s['object']} is {s['size']} and {s['color']}. It is {s['relation']} the {s['place']}.",
        ),
        # Quotes, braces and commas, so those tokens have trained embeddings before fine-tuning.
        "quote": (f"Quote the words: {sentence}",
                  "{" + ", ".join(f'"{word}"' for word in sentence.rstrip(".").split()) + "}"),
        # Named, quoted values: a form a base meets in code and configs (not JSON, which the adapter teaches).
        "form": (f"Fill in the form: {sentence}", ", ".join(f'{key} = "{s[key]}"' for key in FIELDS)),
    }


TASKS = tuple(_task_answers(demo._random_scene(random.Random(0)), "x").keys())
# The tokenizer was trained on the instructions of the first stage; it stays the same when a later
# stage adds an instruction (its new characters are bytes every tokenizer here has).
TOKENIZER_TASKS = ("object", "size", "color", "where", "place", "list", "repeat", "describe", "quote")
COPY_TASKS = ("object", "size", "color", "place", "where", "repeat", "list")

# The recipe of the shipped weights. Stage 1: copy questions first and alone (attention learns to
# find each word of the sentence), then every instruction; the share of right greedy answers per
# instruction rose from about 0.3 at step 1,000 to 0.85-1.0 at 3,000. Stage 2 adds the quoted
# form; stage 3 dwells on colors and objects, which stage 1 left confusable (green for black).
# The base's skills after each stage are in the shipped manifest.
RECIPE = {
    "dimensions": demo.MODEL_DIMENSIONS,
    "stages": [
        {"lr": 2e-3, "batch": 32, "warmup": 0.05, "phases": [
            {"steps": 1000, "tasks": {**{task: 1 for task in COPY_TASKS}, "repeat": 2, "list": 2}},
            {"steps": 2000, "tasks": {task: 1 for task in TOKENIZER_TASKS}},
        ]},
        {"lr": 1e-3, "batch": 32, "warmup": 0.1, "rng_seed": 99, "phases": [
            {"steps": 600, "tasks": {**{task: 1 for task in TASKS}, "form": 3}},
        ]},
        {"lr": 1e-3, "batch": 32, "warmup": 0.1, "rng_seed": 99, "phases": [
            {"steps": 800, "tasks": {**{task: 1 for task in TASKS}, "color": 3, "object": 2, "list": 2}},
        ]},
    ],
}


def example(task: str, scene: dict) -> list[dict]:
    prompt, answer = _task_answers(scene, demo._sentence(scene))[task]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _held_out_sentences() -> set[str]:
    """The demo dataset's held-out sentences: the base never trains on them."""
    sentences = set()
    for line in demo.demo_dataset_path("eval").read_text(encoding="utf-8").splitlines():
        prompt = json.loads(line)["messages"][0]["content"]
        sentences.add(prompt.split(": ", 1)[1])
    return sentences


def sample_scenes(rng: random.Random, count: int, exclude: set[str]) -> list[dict]:
    scenes = []
    while len(scenes) < count:
        scene = demo._random_scene(rng)
        if demo._sentence(scene) not in exclude:
            scenes.append(scene)
    return scenes


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE over word runs and single other characters (any text still encodes, no UNK)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Split first, then map bytes: a word never carries the space or quote before it, so it
    # is one token in the prompt and in the answer alike (see the module docstring).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+|[^\w]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=demo.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=demo.MODEL_DIMENSIONS["max_position_embeddings"],
    )
    fast.chat_template = demo.CHAT_TEMPLATE
    return fast


def tokenizer_corpus() -> list[str]:
    """Every word of the world and of every instruction, so each is one token."""
    rng = random.Random(0)
    texts = []
    for _ in range(400):
        scene = demo._random_scene(rng)
        for task in TOKENIZER_TASKS:
            texts += [m["content"] for m in example(task, scene)]
    words = demo.SIZES + demo.COLORS + demo.OBJECTS + demo.RELATIONS + demo.PLACES
    texts += [" ".join(words), "Extract as JSON:", "system user assistant"] + demo.SPECIAL_TOKENS
    return texts


# ----------------------------------------------------------------------------- training
def _encode(tokenizer, conversations):
    import torch

    encoded = [tokenizer.apply_chat_template(c, return_dict=True, return_assistant_tokens_mask=True)
               for c in conversations]
    width = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, item in enumerate(encoded):
        ids = torch.tensor(item["input_ids"])
        trained = torch.tensor(item["assistant_masks"]) == 1
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = torch.where(trained, ids, -100)
        attention[row, : len(ids)] = 1
    return input_ids, attention, labels


def _phase_batches(recipe: dict, rng: random.Random, exclude: set[str]):
    """(phase index, conversations) for every step of the curriculum."""
    for index, phase in enumerate(recipe["phases"]):
        tasks, weights = zip(*phase["tasks"].items())
        for _ in range(phase["steps"]):
            scenes = sample_scenes(rng, recipe["batch"], exclude)
            yield index, [example(rng.choices(tasks, weights)[0], scene) for scene in scenes]


def pretrain(recipe: dict, seed: int, log=print, check_every: int = 0, check_count: int = 48):
    """The trained model and tokenizer, and the log of losses (and skills, when checked)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(tokenizer_corpus(), recipe["dimensions"]["vocab_size"])
    torch.manual_seed(seed)
    config = LlamaConfig(
        **recipe["dimensions"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    exclude = _held_out_sentences()
    history, started, step = [], time.time(), 0
    # A hand-written loop rather than Trainer: this builds the base, it is not the product's
    # training path, and forty lines keep the curriculum obvious. Each stage has its own
    # optimizer and one-cycle schedule (a later stage continues from the weights only).
    for number, stage in enumerate(recipe["stages"]):
        total = sum(phase["steps"] for phase in stage["phases"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=stage["lr"], weight_decay=0.01, betas=(0.9, 0.98))
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=stage["lr"], total_steps=total, pct_start=stage.get("warmup", 0.03),
            anneal_strategy="cos", final_div_factor=stage.get("final_div", 100),
        )
        rng, running = random.Random(stage.get("rng_seed", seed)), None
        if stage.get("split_collapsed") is not None:
            pairs = split_collapsed_words(model, tokenizer, stage["split_collapsed"], stage.get("rng_seed", seed))
            log(json.dumps({"stage": number, "split_collapsed_words": pairs}))
        for stage_step, (phase, conversations) in enumerate(_phase_batches(stage, rng, exclude), start=1):
            step += 1
            model.train()
            input_ids, attention, labels = _encode(tokenizer, conversations)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if stage_step % 50 == 0 or stage_step == total:
                entry = {"step": step, "stage": number, "phase": phase, "loss": round(running, 4),
                         "seconds": round(time.time() - started, 1)}
                if check_every and (stage_step % check_every == 0 or stage_step == total):
                    entry["skills"] = check_skills(model, tokenizer, count=check_count)
                history.append(entry)
                log(json.dumps(entry))
    return model, tokenizer, history


def split_collapsed_words(model, tokenizer, threshold: float, seed: int) -> list[tuple[str, str]]:
    """Draw new embeddings for world words that collapsed onto another one; returns the pairs.

    Two words whose (tied) embeddings became nearly the same vector are a saddle that training
    does not leave: a question about either sends the same hidden state, so the gradients of
    the two rows cancel. Stage 1 ends with a few such pairs (green/black at cosine 0.99), and
    the base then copies one for the other. A fresh row for the second word of each pair
    breaks the tie; the next stage teaches it.
    """
    import torch

    words = sorted(set(demo.SIZES + demo.COLORS + demo.OBJECTS + demo.RELATIONS + demo.PLACES))
    ids = tokenizer.convert_tokens_to_ids(words)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        unit = torch.nn.functional.normalize(weight[ids].float(), dim=-1)
        similar = (unit @ unit.T).triu(diagonal=1)
        pairs = [(words[a], words[b]) for a, b in (similar > threshold).nonzero().tolist()]
        generator = torch.Generator().manual_seed(seed)
        scale = weight[ids].float().std()
        for _, word in pairs:
            row = torch.randn(weight.shape[1], generator=generator) * scale
            weight[tokenizer.convert_tokens_to_ids(word)] = row.to(weight.dtype)
    return pairs


# ----------------------------------------------------------------------------- skills
def check_skills(model, tokenizer, count: int = 200) -> dict:
    """Share of exactly right greedy answers per instruction, on the held-out sentences (never trained on).

    ``extract_json`` is the fine-tuning task scored as the demo run scores it (JSON
    equality), on the held-out prompts: the base must not already do it.
    """
    from engine.evals.generate import generate_greedy
    from engine.evals.metrics import json_equal

    held_out = [json.loads(line)["messages"]
                for line in demo.demo_dataset_path("eval").read_text(encoding="utf-8").splitlines()][:count]
    scenes = [json.loads(messages[1]["content"]) for messages in held_out]
    skills = {}
    for task in TASKS:
        conversations = [example(task, scene) for scene in scenes]
        answers = generate_greedy(model, tokenizer, [c[:1] for c in conversations], 48, batch_size=100)
        skills[task] = round(sum(a == c[1]["content"] for a, c in zip(answers, conversations)) / len(scenes), 3)
    answers = generate_greedy(model, tokenizer, [m[:1] for m in held_out], 64, batch_size=100)
    right = sum(json_equal(a, m[1]["content"]) for a, m in zip(answers, held_out))
    skills["extract_json"] = round(right / len(held_out), 3)
    skills["extract_json_example"] = answers[0]
    return skills


# ----------------------------------------------------------------------------- shipping
def build_weights(target: Path, recipe: dict | None = None, seed: int = demo.DEMO_SEED, log=print) -> Path:
    """Pretrain with ``recipe`` and write the model, tokenizer and manifest into ``target``."""
    recipe = recipe or RECIPE
    started = time.time()
    model, tokenizer, history = pretrain(recipe, seed, log=log)
    return save_weights(model, tokenizer, target, {"seed": seed, "recipe": recipe,
                                                   "build_seconds": round(time.time() - started, 1),
                                                   "final_loss": history[-1]["loss"]}, log=log)


def save_weights(model, tokenizer, target: Path, facts: dict, log=print, skill_count: int = 200) -> Path:
    """Write the base in float16 with a manifest (sha256 of every file, ``facts``, skills), atomically."""
    import torch

    staging = Path(target).with_name(Path(target).name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    # float16 halves the committed size; the worker loads it in the run's dtype. The skills are
    # measured on the rounded weights, as every user gets them.
    model.to(torch.float16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    skills = check_skills(model.to(torch.float32), tokenizer, count=skill_count)
    files = {path.name: demo._sha256(path) for path in sorted(staging.iterdir()) if path.is_file()}
    manifest = {**facts, "parameters": sum(p.numel() for p in model.parameters()), "skills": skills, "files": files}
    (staging / demo.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log(f"demo base model written to {target}; skills {skills}")
    return Path(target)


def measure_skills(folder: Path, count: int = 200) -> dict:
    """``check_skills`` of a saved base model (``python -m engine demo --skills``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    return check_skills(model, AutoTokenizer.from_pretrained(folder), count=count)


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m engine demo``: check the shipped demo model (or pretrain it again) and print its folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine demo", description="Check the offline demo model that "
                                     f"ships in {demo.SHIPPED_MODEL_DIR} against its sha256 manifest "
                                     "and print its folder.")
    parser.add_argument("--rebuild-weights", action="store_true", help="pretrain the base again with the recipe in "
                        "engine/demo_pretrain.py (tens of minutes on 2 cores) and write it with a new manifest")
    parser.add_argument("--into", type=Path, default=demo.SHIPPED_MODEL_DIR,
                        help="folder to write with --rebuild-weights")
    parser.add_argument("--skills", action="store_true", help="also measure the base's skills on held-out sentences")
    args = parser.parse_args(argv)
    if args.rebuild_weights:
        build_weights(args.into)
        print(args.into)
        return 0
    folder = demo.ensure_demo_model()
    print(folder)
    if args.skills:
        print(json.dumps(measure_skills(folder), indent=2))
    return 0
