"""The offline demo: a tiny Llama-architecture base model, its tokenizer and a dataset.

Nothing here downloads anything. The base model was *pretrained here* (``engine.demo_pretrain``)
on a synthetic corpus of simple instructions about a tiny world of objects ("What size is
it?", "Repeat:", "List the facts:", "Quote the words:", ...), so it follows the chat template
and can read a sentence and copy its words. The demo dataset then teaches it a skill it has
never seen: extracting the sentence into a JSON object ("Extract as JSON:"), which the base
answers right 0% of the time. That is what LoRA is for in practice (a new output format on
top of general ability), and a person sees the difference in the Chat tab.

The weights ship in ``presets/demo-model`` with a manifest of sha256 sums (about 3.5 MB in
float16), in the standard Hugging Face layout, so the demo loads through exactly the same
``from_pretrained`` path as a hub model or a local folder. ``python -m engine demo
--rebuild-weights`` makes them again from ``DEMO_SEED``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from engine import IN_CHECKOUT, PRESETS_DIR, PROJECT_ROOT

DEMO_MODEL_NAME = "demo"
DEMO_SEED = 1234
DEMO_DATA_DIR = PRESETS_DIR / "data"

SIZES = ["big", "small", "tiny", "huge", "long", "short"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "gray"]
OBJECTS = [
    "apple", "ball", "book", "box", "cat", "chair", "cup", "dog", "door", "egg", "fish", "flower",
    "hat", "key", "lamp", "leaf", "letter", "map", "mouse", "pen", "phone", "plate", "rock", "rope",
    "shoe", "sock", "spoon", "star", "stone", "table", "toy", "tree", "truck", "vase", "watch",
    "wheel", "bird", "bottle", "coin", "drum",
]
RELATIONS = ["on", "under", "near", "behind", "inside"]
PLACES = [
    "bed", "bench", "box", "car", "chair", "desk", "floor", "garden", "house", "kitchen", "road",
    "roof", "room", "school", "shelf", "sofa", "table", "tent", "wall", "window",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# Architecture: small enough to fine-tune in two minutes on 2 CPU cores, with GQA so the
# memory calculator's grouped-query path is exercised by the demo too.
MODEL_DIMENSIONS = dict(
    vocab_size=512,  # word-level pieces: every word of the world is one token
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


# ----------------------------------------------------------------------------- the world
def _random_scene(rng: random.Random) -> dict:
    return {
        "object": rng.choice(OBJECTS),
        "size": rng.choice(SIZES),
        "color": rng.choice(COLORS),
        "relation": rng.choice(RELATIONS),
        "place": rng.choice(PLACES),
    }


def _sentence(scene: dict) -> str:
    return f"the {scene['size']} {scene['color']} {scene['object']} is {scene['relation']} the {scene['place']}."


def _general_example(rng: random.Random) -> list[dict]:
    """One instruction of the kind the base model is pretrained on."""
    scene = _random_scene(rng)
    sentence = _sentence(scene)
    kind = rng.randrange(6)
    if kind == 0:
        prompt = f"Describe: {sentence}"
        answer = (
            f"The {scene['object']} is {scene['size']} and {scene['color']}. "
            f"It is {scene['relation']} the {scene['place']}."
        )
    elif kind == 1:
        prompt, answer = f"Repeat: {sentence}", sentence
    elif kind == 2:
        prompt, answer = f"What color is it? {sentence}", f"It is {scene['color']}."
    elif kind == 3:
        prompt, answer = f"Where is it? {sentence}", f"It is {scene['relation']} the {scene['place']}."
    elif kind == 4:
        # Key names and "key: value" lists: the vocabulary the JSON task later reuses.
        prompt = f"List the facts: {sentence}"
        answer = ", ".join(f"{key}: {scene[key]}" for key in ("object", "size", "color", "relation", "place"))
    else:
        # Quotes and braces, so those tokens have trained embeddings before fine-tuning.
        prompt = f"Quote the words: {sentence}"
        answer = "{" + ", ".join(f'"{word}"' for word in sentence.rstrip(".").split()) + "}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def json_extraction_example(scene: dict) -> list[dict]:
    """The fine-tuning task: the same sentence, answered as a JSON object."""
    answer = json.dumps(
        {k: scene[k] for k in ("object", "size", "color", "relation", "place")}, separators=(", ", ": ")
    )
    return [
        {"role": "user", "content": f"Extract as JSON: {_sentence(scene)}"},
        {"role": "assistant", "content": answer},
    ]


def build_demo_dataset_rows(seed: int = DEMO_SEED, n_train: int = 1200, n_eval: int = 200):
    """Train and held-out rows; no eval sentence appears in train."""
    rng = random.Random(seed + 1)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        scene = _random_scene(rng)
        key = _sentence(scene)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": json_extraction_example(scene)})
    return rows[:n_train], rows[n_train:]


def write_demo_dataset(directory: Path = DEMO_DATA_DIR) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    train, held_out = build_demo_dataset_rows()
    paths = directory / "demo_train.jsonl", directory / "demo_eval.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def demo_dataset_path(split: str = "train") -> Path:
    """The bundled demo JSONL (committed; regenerated by ``write_demo_dataset``)."""
    return DEMO_DATA_DIR / ("demo_eval.jsonl" if split == "eval" else "demo_train.jsonl")


# ----------------------------------------------------------------------------- the shipped base
SHIPPED_MODEL_DIR = PRESETS_DIR / "demo-model"  # the pretrained base, committed with its sha256 manifest
MANIFEST = "loralab_demo.json"
_verified: set[Path] = set()


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_demo_model(folder: Path = SHIPPED_MODEL_DIR) -> Path:
    """The folder, once every file listed in its manifest has its recorded sha256; a sentence otherwise."""
    from engine.errors import ModelNotFoundError

    folder = Path(folder)
    if folder in _verified:
        return folder
    rebuild = "`python -m engine demo --rebuild-weights` makes it again (tens of minutes on 2 cores)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelNotFoundError(f"The demo model in {folder} has no readable manifest ({MANIFEST}: {error}); "
                                 f"{rebuild}, or `git checkout -- {folder.name}` restores it.") from None
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file() or _sha256(path) != expected:
            raise ModelNotFoundError(f"The demo model's {name} in {folder} is missing or changed (its sha256 differs "
                                     f"from the manifest); {rebuild}, or `git checkout` restores it.")
    _verified.add(folder)
    return folder


def demo_model_dir() -> Path:
    return SHIPPED_MODEL_DIR


def ensure_demo_model(log=print) -> Path:
    """The demo base model's folder, checked against its manifest.

    The weights ship with the code (a few MB): pretraining a base that can read a sentence
    takes tens of minutes on 2 cores, far more than a start-up may cost, and shipped
    weights are the same for every user and every CI run. ``engine.demo_pretrain`` is the
    recipe that made them.
    """
    return verify_demo_model(SHIPPED_MODEL_DIR)


def cache_root() -> Path:
    """Where generated models live (random-weight models of the memory measurements)."""
    default = PROJECT_ROOT / ".cache" if IN_CHECKOUT else Path.home() / ".cache" / "loralab"
    return Path(os.environ.get("LORALAB_CACHE", default))
