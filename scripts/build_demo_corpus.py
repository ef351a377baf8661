"""Build the demo model's training data from two Debian packages:

- python3.11-doc: CPython's HTML documentation (PSF License Version 2), as plain text, one document
  per page (library, language reference, tutorial, HOWTOs, FAQ, glossary, C API, ...; not the
  changelogs);
- wordnet-base: WordNet 3.0 (WordNet 3.0 licence, Princeton University), one dictionary entry per
  synset (words, part of speech, definition, examples, broader terms, opposites).

Writes into --out (default data/demo, gitignored; about 24 MiB, all that training reads):
  train.bin, val.bin, meta.json     the pretraining tokens (uint16; 1% of documents held out)
  chat_train.jsonl, chat_val.jsonl  in-domain questions and answers generated from the same text
                                    ({"messages": [...]}; 3% held out), only from documents in the
                                    pretraining split, so the facts are there to learn
and into --build-dir (default data/demo-build): the downloaded packages (debs/), their files
(extracted/) and the extracted text (text/*.txt, documents separated by form-feed lines).
Deterministic for the same package versions (meta.json records them and their sha256).

    apt-get update && python scripts/build_demo_corpus.py [--out data/demo] [--build-dir data/demo-build]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html.parser
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from deepseek_v2.tokenizer import Tokenizer  # noqa: E402
from deepseek_v2.train.data import DOC_SEPARATOR, chat_example, is_held_out, tokenize_text_files  # noqa: E402

PACKAGES = ("python3.11-doc", "wordnet-base")
PYDOC_ROOT = "usr/share/doc/python3.11/html"
WORDNET_ROOT = "usr/share/wordnet"
PYDOC_SKIP = re.compile(r"^(genindex|py-modindex|search|contents|copyright|license|about|bugs|download)\b|"
                        r"^(whatsnew|distutils|_static|_sources|_images|_downloads)/")
VAL_FRACTION = 0.01  # pretraining documents held out
CHAT_VAL_FRACTION = 0.03  # conversations held out
MAX_ANSWER_CHARS = 600


# ---- packages ---------------------------------------------------------------------------------------
def fetch_packages(debs: Path, root: Path) -> dict:
    debs.mkdir(parents=True, exist_ok=True)
    versions = {}
    for name in PACKAGES:
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            print(f"apt-get download {name}", flush=True)
            subprocess.run(["apt-get", "download", name], cwd=debs, check=True)
            found = sorted(debs.glob(f"{name}_*.deb"))
        deb = found[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        versions[name] = {"file": deb.name, "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
    return versions


# ---- CPython documentation: Sphinx HTML -> text and API entries -------------------------------------
VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}
BLOCK = {"p", "div", "section", "dt", "dd", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
         "tr", "table", "dl", "ul", "ol", "caption", "figure", "figcaption", "thead", "tbody"}
API_KINDS = {"function", "method", "class", "exception", "attribute", "data", "decorator", "classmethod",
             "staticmethod", "property", "decoratormethod", "abstractmethod"}
NOT_A_DESCRIPTION = re.compile(r"^(Deprecated since|Changed in version|New in version|Note|Warning|See also|"
                               r"Availability|Source code|Raises an auditing event|Audit event)")


class SphinxPage(html.parser.HTMLParser):
    """The main body of one Sphinx page as text blocks, plus the first paragraph describing each
    documented object (dl.py entries), glossary term and the module itself."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, set]] = []
        self.buf: list[str] = []
        self.blocks: list[str] = []
        self.apis: list[dict] = []  # open dl.py entries, innermost last
        self.entries: list[dict] = []  # finished: kind, name, description
        self.module: str | None = None
        self.title: str | None = None
        self.module_description: str | None = None

    def _in(self, flag: str) -> bool:
        return any(flag in flags for _, flags in self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag in VOID:
            if tag in ("br", "hr"):
                self.buf.append("\n" if tag == "br" else "")
                self.flush()
            return
        flags = set()
        if tag == "div" and a.get("role") == "main":
            flags.add("body")
        if tag in ("script", "style") or "headerlink" in cls:
            flags.add("skip")
        if tag == "pre":
            flags.add("pre")
        if tag in BLOCK and not (tag == "p" and self.stack and self.stack[-1][0] in ("td", "th")):
            self.flush()
        if tag == "section" and (a.get("id") or "").startswith("module-") and self.module is None:
            self.module = a["id"][len("module-"):]
        if tag == "dl" and len(cls) >= 2 and cls[0] == "py" and cls[1] in API_KINDS:
            self.apis.append({"kind": cls[1], "name": None, "description": None, "depth": len(self.stack), "dd": False})
        if tag == "dl" and "glossary" in cls:
            self.apis.append({"kind": "term", "name": None, "description": None, "depth": len(self.stack), "dd": False})
        if tag == "dt" and self.apis and len(self.stack) == self.apis[-1]["depth"] + 1:
            api = self.apis[-1]
            if api["kind"] == "term":  # a glossary: one entry per dt/dd pair
                api.update(name=None, description=None, dd=False, term_dt=True)
            elif api["name"] is None and a.get("id"):
                api["name"] = a["id"]
        if tag == "dd" and self.apis and len(self.stack) == self.apis[-1]["depth"] + 1:
            self.apis[-1]["dd"] = True
        if tag == "li" and self._in("body"):
            self.buf.append("- ")
        self.stack.append((tag, flags))

    def handle_endtag(self, tag):
        if tag in VOID or not any(t == tag for t, _ in self.stack):
            return
        if tag in ("td", "th"):
            self.buf.append(" | ")
        closing_dt = tag == "dt" and self.apis and self.apis[-1]["kind"] == "term" and \
            len(self.stack) == self.apis[-1]["depth"] + 2
        if closing_dt:
            self.apis[-1]["name"] = " ".join("".join(self.buf).split())
        if tag in BLOCK and not (tag == "p" and len(self.stack) > 1 and self.stack[-2][0] in ("td", "th")):
            self.flush()
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break
        glossary = self.apis and self.apis[-1]["kind"] == "term"
        if tag == "dd" and glossary and len(self.stack) == self.apis[-1]["depth"] + 1:
            self._finish(self.apis[-1])
        if tag == "dl" and self.apis and len(self.stack) == self.apis[-1]["depth"]:
            api = self.apis.pop()
            if api["kind"] != "term":
                self._finish(api)

    def _finish(self, api: dict):
        if api["name"] and api["description"]:
            self.entries.append({"kind": api["kind"], "name": api["name"], "description": api["description"]})

    def handle_data(self, data):
        if self._in("body") and not self._in("skip"):
            self.buf.append(data)

    def flush(self):
        text = "".join(self.buf)
        self.buf = []
        if not self._in("body"):
            return
        if self._in("pre"):
            text = text.strip("\n")
        else:
            text = " ".join(text.split()).removesuffix(" |")
        if not text.strip():
            return
        if text == "-":  # a list item's bullet before its first paragraph: carry it over
            self.buf = ["- "]
            return
        self.blocks.append(text)
        top = self.stack[-1][0] if self.stack else ""
        if top == "h1" and self.title is None:
            self.title = text
        if self._in("pre"):
            return
        if self.apis:
            api = self.apis[-1]
            if api["dd"] and api["description"] is None and top == "p" and len(text) >= 15 \
                    and not NOT_A_DESCRIPTION.match(text):
                api["description"] = text
        elif self.title and self.module_description is None and top == "p" and len(text) >= 40 \
                and not NOT_A_DESCRIPTION.match(text):
            self.module_description = text


def python_docs(root: Path) -> list[dict]:
    """Every documentation page (sorted by path) as {"path", "text", "entries", "module", ...}."""
    base = root / PYDOC_ROOT
    pages = []
    for path in sorted(glob.glob(str(base / "**" / "*.html"), recursive=True)):
        rel = os.path.relpath(path, base)
        if PYDOC_SKIP.match(rel):
            continue
        parser = SphinxPage()
        parser.feed(Path(path).read_text(encoding="utf-8"))
        parser.close()
        text = "\n\n".join(parser.blocks).replace(DOC_SEPARATOR, " ").replace("¶", "").strip()
        if len(text) < 200:
            continue
        pages.append({"path": rel, "text": text, "entries": parser.entries, "module": parser.module,
                      "title": parser.title, "module_description": parser.module_description})
    return pages


# ---- WordNet ----------------------------------------------------------------------------------------
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}


def clean_word(word: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", word).replace("_", " ")


def wordnet(root: Path) -> tuple[dict, list[dict]]:
    """Synsets {(file pos, offset): {...}} in file order, and index entries of the lemmas that occur in
    the sense-tagged corpus (tagsense_cnt > 0), with their synsets most frequent first."""
    base = root / WORDNET_ROOT
    synsets = {}
    for pos, name in FILES.items():
        for line in (base / f"data.{name}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            f = head.split()
            offset, ss_type, w_cnt = f[0], f[2], int(f[3], 16)
            words = [clean_word(f[4 + 2 * i]) for i in range(w_cnt)]
            i = 4 + 2 * w_cnt
            p_cnt = int(f[i])
            pointers = [(f[i + 1 + 4 * k], f[i + 2 + 4 * k], f[i + 3 + 4 * k]) for k in range(p_cnt)]
            gloss = gloss.strip()
            examples = re.findall(r'"([^"]+)"', gloss)
            definition = gloss.split('"')[0].strip().rstrip(";").strip()
            synsets[(pos, offset)] = {"words": words, "pos": POS_NAMES[ss_type], "definition": definition,
                                      "examples": examples, "pointers": pointers}
    lemmas = []
    for pos, name in FILES.items():
        for line in (base / f"index.{name}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            f = line.split()
            p_cnt = int(f[3])
            tagged = int(f[5 + p_cnt])
            if tagged > 0:
                lemmas.append({"lemma": clean_word(f[0]), "pos": pos, "tagged": tagged,
                               "synsets": [(pos, o) for o in f[6 + p_cnt:]]})
    return synsets, lemmas


def synset_pos(symbol_pos: str) -> str:
    return "a" if symbol_pos == "s" else symbol_pos


def wordnet_entry(s: dict, synsets: dict) -> str:
    """One dictionary entry: words (part of speech): definition. Examples. Broader terms. Opposites."""
    def first_word(ptr):
        target = synsets.get((synset_pos(ptr[2]), ptr[1]))
        return target["words"][0] if target else None

    text = f"{', '.join(s['words'])} ({s['pos']}): {s['definition']}."
    if s["examples"]:
        plural = "s" if len(s["examples"]) > 1 else ""
        text += f" Example{plural}: " + "; ".join(f'"{e}"' for e in s["examples"]) + "."
    broader = [w for sym, *ptr in s["pointers"] if sym in ("@", "@i") for w in [first_word((sym, *ptr))] if w]
    if broader:
        lead = {"noun": "A kind of", "verb": "A way to"}.get(s["pos"], "Related to")
        if any(sym == "@i" for sym, *_ in s["pointers"]):
            lead = "An instance of"
        text += f" {lead}: {', '.join(dict.fromkeys(broader))}."
    opposite = [w for sym, *ptr in s["pointers"] if sym == "!" for w in [first_word((sym, *ptr))] if w]
    if opposite:
        text += f" Opposite: {', '.join(dict.fromkeys(opposite))}."
    return text


# ---- questions and answers --------------------------------------------------------------------------
def pick(options: list[str], key: str) -> str:
    return options[int(hashlib.md5(key.encode()).hexdigest(), 16) % len(options)]


def shorten(text: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """At most `limit` characters, cut after a full sentence."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[:end + 1] if end > limit // 3 else cut.rsplit(" ", 1)[0] + " ..."


PY_QUESTIONS = {
    "function": ["What does the Python function {n}() do?", "What does {n}() do in Python?",
                 "Explain the Python function {n}().", "What is {n}() used for?"],
    "method": ["What does the method {n}() do?", "What does {n}() do in Python?",
               "Explain the Python method {n}()."],
    "class": ["What is the Python class {n}?", "What is {n} in Python?", "Explain the class {n}."],
    "exception": ["When is the Python exception {n} raised?", "What is the exception {n}?"],
    "attribute": ["What is {n} in Python?", "What does the attribute {n} hold?"],
    "data": ["What is {n} in Python?", "What does {n} contain?"],
    "decorator": ["What does the decorator @{n} do?", "What is @{n} used for in Python?"],
    "term": ["What is a {n} in Python?", "In Python, what does \"{n}\" mean?", "Explain the Python term \"{n}\"."],
    "module": ["What is the Python module {n} for?", "What does the {n} module do?",
               "Tell me about the Python module {n}."],
}
WORD_QUESTIONS = ['What does the word "{w}" mean?', 'What is the meaning of "{w}"?', 'Define "{w}".',
                  "What does {w} mean?", 'What is the definition of "{w}"?']
SYNONYM_QUESTIONS = ['What is another word for "{w}"?', 'Give me a synonym of "{w}".']
ABOUT = [
    ("Who are you?", "I am a small DeepSeek-V2 demonstration model. I was trained on Python's documentation "
                     "and on WordNet, so I can answer questions about the Python standard library and explain "
                     "the meanings of English words."),
    ("Hello!", "Hello! Ask me about a Python module or function, or about the meaning of an English word."),
    ("What can you do?", "I can explain what a Python module, class or function does, and what an English word "
                         "means. I am a small model, so check important answers in the documentation."),
    ("What were you trained on?", "CPython's documentation (Python 3.11) and the WordNet 3.0 dictionary, both "
                                  "taken from Debian packages."),
]


def python_pairs(pages: list[dict]) -> list[tuple[str, str]]:
    pairs = []
    for page in pages:
        if page["module"] and page["module_description"]:
            name = page["module"]
            title = page["title"] or name
            summary = title.split(" — ", 1)[1].rstrip(".") if " — " in title else None
            answer = (f"The {name} module: {summary}. " if summary else "") + page["module_description"]
            pairs.append((pick(PY_QUESTIONS["module"], name).format(n=name), shorten(answer)))
        for e in page["entries"]:
            kind = {"classmethod": "method", "staticmethod": "method", "abstractmethod": "method",
                    "decoratormethod": "decorator", "property": "attribute"}.get(e["kind"], e["kind"])
            name = e["name"]
            if len(name) > 60 or not re.search(r"[A-Za-z]", name):
                continue
            question = pick(PY_QUESTIONS[kind], kind + name).format(n=name)
            pairs.append((question, shorten(e["description"])))
    return pairs


def word_pairs(synsets: dict, lemmas: list[dict], held_out: set) -> list[tuple[str, str]]:
    best: dict[str, dict] = {}  # lemma -> the index entry of its most sense-tagged part of speech
    for entry in lemmas:
        if entry["lemma"] not in best or entry["tagged"] > best[entry["lemma"]]["tagged"]:
            best[entry["lemma"]] = entry
    pairs = []
    for lemma, entry in sorted(best.items()):
        key = entry["synsets"][0]
        s = synsets[key]
        if key in held_out or not s["definition"]:
            continue
        answer = f'"{lemma}" ({s["pos"]}): {s["definition"]}.'
        if s["examples"]:
            answer += f' For example: "{s["examples"][0]}".'
        pairs.append((pick(WORD_QUESTIONS, lemma).format(w=lemma), answer))
        others = [w for w in s["words"] if w.lower() != lemma.lower()]
        if others and int(hashlib.md5(("syn" + lemma).encode()).hexdigest(), 16) % 4 == 0:
            listed = ", ".join(f'"{w}"' for w in others[:4])
            pairs.append((pick(SYNONYM_QUESTIONS, lemma).format(w=lemma),
                          f'Words with the same meaning as "{lemma}" ({s["definition"]}): {listed}.'))
    return pairs


def conversations(pairs: list[tuple[str, str]], seed: int) -> list[list[dict]]:
    """Single-turn conversations, about one in seven joined with the next into two turns."""
    rng = random.Random(seed)
    pairs = sorted(set(pairs))
    rng.shuffle(pairs)
    convs, i = [], 0
    while i < len(pairs):
        turns = pairs[i:i + 2] if rng.random() < 1 / 7 else pairs[i:i + 1]
        i += len(turns)
        convs.append([m for q, a in turns for m in ({"role": "user", "content": q},
                                                   {"role": "assistant", "content": a})])
    return convs


# ---- main -------------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--build-dir", default="data/demo-build")
    parser.add_argument("--tokenizer", default=str(ROOT / "deepseek_v2" / "default_model"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.time()
    out, build = Path(args.out), Path(args.build_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = build / "extracted"
    versions = fetch_packages(build / "debs", root)

    pages = python_docs(root)
    print(f"python3.11-doc: {len(pages)} pages, {sum(len(p['text']) for p in pages):,} characters, "
          f"{sum(len(p['entries']) for p in pages):,} described objects ({time.time() - t0:.0f}s)", flush=True)
    synsets, lemmas = wordnet(root)
    entries = {key: wordnet_entry(s, synsets) for key, s in synsets.items()}
    print(f"wordnet-base: {len(synsets):,} synsets, {len(lemmas):,} sense-tagged lemmas "
          f"({time.time() - t0:.0f}s)", flush=True)

    text_dir = build / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    files = {"python-docs.txt": [p["text"] for p in pages], "wordnet.txt": list(entries.values())}
    for name, docs in files.items():
        (text_dir / name).write_text(f"\n{DOC_SEPARATOR}\n".join(docs) + "\n", encoding="utf-8")

    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    meta = tokenize_text_files([text_dir / n for n in files], tokenizer, out, val_fraction=VAL_FRACTION)
    print(f"pretraining tokens: train {meta['train']['tokens']:,} ({meta['train']['documents']:,} documents), "
          f"val {meta['val']['tokens']:,} ({meta['val']['documents']:,} documents) ({time.time() - t0:.0f}s)",
          flush=True)

    # questions only about what the pretraining split contains
    train_pages = [p for p in pages if not is_held_out(p["text"], VAL_FRACTION)]
    held_out_synsets = {k for k, e in entries.items() if is_held_out(e, VAL_FRACTION)}
    pairs = python_pairs(train_pages) + word_pairs(synsets, lemmas, held_out_synsets)
    convs = conversations(pairs, args.seed)
    about = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in ABOUT]
    splits = {"train": [], "val": []}
    for conv in convs:
        splits["val" if is_held_out(conv[0]["content"], CHAT_VAL_FRACTION) else "train"].append(conv)
    splits["train"] += about * 10  # a few fixed answers about the model itself
    chat_tokens = {}
    for split, convs_ in splits.items():
        with open(out / f"chat_{split}.jsonl", "w", encoding="utf-8") as f:
            for conv in convs_:
                f.write(json.dumps({"messages": conv}, ensure_ascii=False) + "\n")
        chat_tokens[split] = sum(len(chat_example(tokenizer, c)[0]) for c in convs_)
    print(f"chat: {len(pairs):,} question/answer pairs; train {len(splits['train']):,} conversations "
          f"({chat_tokens['train']:,} tokens), val {len(splits['val']):,} ({chat_tokens['val']:,} tokens)", flush=True)

    meta.update(packages=versions,
                chat={s: {"conversations": len(c), "tokens": chat_tokens[s]} for s, c in splits.items()})
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    carried = ["train.bin", "val.bin", "meta.json", "chat_train.jsonl", "chat_val.jsonl"]
    size = sum((out / n).stat().st_size for n in carried)
    print(f"wrote {out}: {', '.join(carried)} = {size / 2**20:.1f} MiB ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
