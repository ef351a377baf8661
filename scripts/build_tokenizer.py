"""Train the default byte-level BPE tokenizer (DeepSeek special tokens) on text that ships with Python.

The corpus is the language-reference topics in `pydoc_data.topics` plus the docstrings of a fixed list of
pure-Python standard-library modules, collected in sorted order, so the same Python version always gives the
same files. Writes `tokenizer.json` and `tokenizer_config.json` (DeepSeek-V2 layout: bos at id 0, eos = pad
at id 1, the Coder FIM tokens after them, the DeepSeek-V2 chat template) and prints compression stats.

    python scripts/build_tokenizer.py [--out deepseek_v2/default_model] [--vocab-size 4000]
"""
import argparse
import hashlib
import importlib
import inspect
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deepseek_v2.tokenizer import DEEPSEEK_V2_CHAT_TEMPLATE  # noqa: E402

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
FIM = ["<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]  # DeepSeek-Coder order
SPECIAL_TOKENS = [BOS, EOS, *FIM]  # trained first, so bos = 0, eos = 1

# Pure-Python stdlib modules (no C-only modules, nothing platform specific, nothing with import side effects).
STDLIB_MODULES = [
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "colorsys",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis",
    "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "heapq", "hmac", "html", "html.parser", "http.client", "http.server", "imaplib",
    "inspect", "ipaddress", "json", "json.decoder", "json.encoder", "logging", "logging.handlers", "mailbox",
    "mimetypes", "numbers", "operator", "optparse", "pathlib", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "queue", "quopri", "random", "re", "reprlib", "sched",
    "secrets", "selectors", "shlex", "shutil", "smtplib", "socketserver", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "zipfile",
]


def stdlib_docstrings() -> list[str]:
    """Docstrings of the listed modules and of the classes, methods and functions they define."""
    docs = []

    def add(obj):
        doc = vars(obj).get("__doc__")  # own docstring only: getdoc would repeat inherited ones
        if isinstance(doc, str) and doc.strip():
            docs.append(inspect.cleandoc(doc))

    for name in sorted(STDLIB_MODULES):
        module = importlib.import_module(name)
        add(module)
        for _, obj in sorted(vars(module).items()):
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ != name:
                continue  # skip re-exports: each definition is collected once, from its own module
            add(obj)
            if inspect.isclass(obj):
                for _, fn in sorted(vars(obj).items()):
                    if inspect.isfunction(fn):
                        add(fn)
    return docs


def corpus() -> list[str]:
    from pydoc_data.topics import topics
    return [topics[key] for key in sorted(topics)] + stdlib_docstrings()


def build(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes: any text encodes
    tok.train_from_iterator(texts, trainer=trainer)
    # Like the official DeepSeek tokenizer.json: the BOS comes from the post-processor, once per sequence.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 0)])
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False, "special": True}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added(BOS),
        "eos_token": added(EOS),
        "pad_token": added(EOS),
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        # Not the official "LlamaTokenizerFast": in transformers 5 that class hardcodes a SentencePiece-style
        # pipeline (Metaspace pre-tokenizer, byte-fallback decoder) and replaces this file's byte-level one,
        # which drops spaces and CJK text. AutoTokenizer only dodges it through a ByteLevel-detection fallback
        # that logs a warning. PreTrainedTokenizerFast (v5 alias of TokenizersBackend; also valid in v4) keeps
        # tokenizer.json as is, so its encodings equal the raw `tokenizers` ones.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": DEEPSEEK_V2_CHAT_TEMPLATE,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "deepseek_v2", "default_model"))
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--model-max-length", type=int, default=16384)
    args = parser.parse_args()

    texts = corpus()
    tok = build(texts, args.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(args.model_max_length), f, indent=2, ensure_ascii=False)
        f.write("\n")

    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    with open(os.path.join(args.out, "tokenizer.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    print(f"corpus: {len(texts)} texts, {n_bytes:,} bytes (Python {sys.version.split()[0]})")
    print(f"vocab: {tok.get_vocab_size()} (bos {tok.token_to_id(BOS)}, eos {tok.token_to_id(EOS)})")
    print(f"tokens: {n_tokens:,}, {n_bytes / n_tokens:.2f} bytes/token")
    print(f"wrote {os.path.normpath(args.out)}/tokenizer.json (sha256 {digest}) and tokenizer_config.json")


if __name__ == "__main__":
    main()
