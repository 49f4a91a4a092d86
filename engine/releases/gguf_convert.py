"""Run llama.cpp's own ``convert_hf_to_gguf.py`` in a child process: ``python -m engine.releases.gguf_convert
CONVERTER_DIR MODEL_DIR OUTFILE OUTTYPE``.

A child process because the converter configures logging, calls ``sys.exit`` and imports its
own ``gguf`` package (the ``gguf-py`` of the same llama.cpp commit as the runtime).

One adjustment, and only when the converter would otherwise refuse: llama.cpp recognises a
BPE tokenizer's pre-tokenizer by hashing how it splits a test string, against a list of known
models. A tokenizer it has never seen is refused even when its ``tokenizer.json`` declares
exactly GPT-2's pre-tokenizer (``ByteLevel`` with the GPT-2 regex, and no normalizer), which
llama.cpp implements as ``gpt-2``, or the offline demo's finer split (word runs and single other
characters, then byte-level BPE), which tokenizes the same under GPT-2's split. For those cases
only we name it ``gpt-2``; any other unknown tokenizer is still refused. The caller then checks that
llama.cpp tokenizes the verification prompts exactly as the Hugging Face tokenizer does, so
the assumption is tested, not trusted.

Exit codes: 0 converted; 3 architecture not supported (the architecture on stdout);
4 tokenizer not recognised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

UNSUPPORTED_EXIT, TOKENIZER_EXIT = 3, 4


def _declares_gpt2_pretokenizer(model_dir: Path) -> bool:
    try:
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre, model = data.get("pre_tokenizer") or {}, data.get("model") or {}
    if model.get("type") != "BPE" or data.get("normalizer") is not None:
        return False
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
    # The demo's own: every word run and every other character split apart before byte-level BPE.
    # Its merges never cross those boundaries, so GPT-2's coarser split (a space kept before a word,
    # runs of punctuation together) yields the same tokens; the caller's tokenization check proves it.
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    return (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and (steps[0].get("pattern") or {}).get("Regex") == r"\w+|[^\w]"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space", False))


def main(argv: list[str]) -> int:
    converter_dir, model_dir, outfile, outtype = Path(argv[0]), Path(argv[1]), argv[2], argv[3]
    sys.path.insert(0, str(converter_dir))
    sys.path.insert(1, str(converter_dir / "gguf-py"))
    import conversion
    from conversion import base

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architecture = (config.get("architectures") or ["?"])[0]
    try:
        conversion.get_model_class(architecture, mmproj=False)
    except NotImplementedError:
        print(architecture)
        return UNSUPPORTED_EXIT

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if _declares_gpt2_pretokenizer(Path(self.dir_model)):
                return "gpt-2"  # llama.cpp's name for the GPT-2 pre-tokenizer (openai-community/gpt2)
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", outfile, "--outtype", outtype]
    import convert_hf_to_gguf

    try:
        convert_hf_to_gguf.main()
    except NotImplementedError as error:
        print(str(error))
        return TOKENIZER_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
