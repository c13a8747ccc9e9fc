"""The offline demo corpus, built from text every machine with Python already has.

Domain (SFT pairs): the installed Python's own documentation — the ``pydoc_data.topics`` reference
pages, cut into sections, and the docstrings of standard-library modules, classes and functions
("Explain `json.dumps`." -> its docstring). Rows are written in the three text shapes the job
accepts (prompt/response, Alpaca, chat) so the demo exercises each reader.
General text (forgetting): the licence texts under /usr/share/common-licenses, else Python's LICENSE.
Nothing here was written by us, and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Pure-Python standard modules that import without side effects on every platform.
STDLIB_MODULES = (
    "builtins abc argparse array ast base64 bisect calendar cmath codecs collections collections.abc "
    "colorsys configparser contextlib copy csv dataclasses datetime decimal difflib dis email "
    "enum filecmp fnmatch fractions functools getopt gettext glob graphlib gzip hashlib heapq hmac "
    "html html.parser http.client inspect io ipaddress itertools json keyword linecache locale "
    "logging math mimetypes numbers operator os os.path pathlib pickle pkgutil platform plistlib "
    "pprint queue quopri random re reprlib sched secrets selectors shelve shlex shutil signal "
    "smtplib socket sqlite3 statistics string struct subprocess tarfile tempfile textwrap "
    "threading time timeit tokenize traceback types typing unittest urllib.parse urllib.request "
    "uuid warnings weakref zipfile zlib"
).split()

PROMPTS = (
    "Explain `{name}`.",
    "What does `{name}` do in Python?",
    "Describe the Python API `{name}`.",
)
GENERAL_TEST_CHARS = 400_000  # the forgetting test's text: more than the demo's 128 blocks of 256 tokens
MAX_RESPONSE_CHARS = 1200
MIN_RESPONSE_CHARS = 40


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _trim(doc: str) -> str:
    doc = inspect.cleandoc(doc).strip()
    if len(doc) <= MAX_RESPONSE_CHARS:
        return doc
    cut = doc.rfind("\n\n", 0, MAX_RESPONSE_CHARS)
    return doc[: cut if cut > MIN_RESPONSE_CHARS else MAX_RESPONSE_CHARS].rstrip()


def _public(obj) -> Iterator[tuple[str, object]]:
    for name, member in sorted(vars(obj).items()):
        if not name.startswith("_"):
            yield name, member


def docstring_pairs() -> list[tuple[str, str]]:
    """(qualified name, docstring) for modules, their public classes/functions and class methods."""
    with warnings.catch_warnings():  # touching deprecated aliases (typing.io, ...) warns
        warnings.simplefilter("ignore")
        return list(_docstring_pairs())


def _docstring_pairs() -> Iterator[tuple[str, str]]:
    seen: set[int] = set()
    for modname in STDLIB_MODULES:
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue
        if module.__doc__:
            yield modname, module.__doc__
        for name, member in _public(module):
            if getattr(member, "__module__", None) != module.__name__ or id(member) in seen:
                continue
            if not (inspect.isclass(member) or inspect.isroutine(member)) or not member.__doc__:
                continue
            seen.add(id(member))
            yield f"{modname}.{name}", member.__doc__
            if inspect.isclass(member):
                for mname, meth in _public(member):
                    if inspect.isroutine(meth) and meth.__doc__ and id(meth) not in seen:
                        seen.add(id(meth))
                        yield f"{modname}.{name}.{mname}", meth.__doc__


def topic_pairs() -> Iterator[tuple[str, str]]:
    """(prompt, section) from the language reference pages in ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        sections = [s.strip() for s in topics[topic].split("\n\n") if len(s.strip()) >= 200]
        for k, section in enumerate(sections):
            yield f"From the Python language reference on '{topic}' (part {k + 1}), explain this part.", _trim(section)


def sft_rows() -> list[dict]:
    """Every demo pair as ``{"prompt", "response"}`` with a stable id, in a stable order."""
    rows = []
    for name, doc in docstring_pairs():
        response = _trim(doc)
        if len(response) >= MIN_RESPONSE_CHARS:
            prompt = PROMPTS[_stable_hash(name) % len(PROMPTS)].format(name=name)
            rows.append({"id": f"doc:{name}", "prompt": prompt, "response": response})
    for prompt, response in topic_pairs():
        rows.append({"id": f"topic:{_stable_hash(prompt + response[:64]):016x}", "prompt": prompt, "response": response})
    return rows


def _as_shape(row: dict) -> tuple[str, dict]:
    """Spread rows over the three text shapes by a hash of their id (stable)."""
    which = _stable_hash(row["id"]) % 3
    if which == 0:
        return "pairs.jsonl", row
    if which == 1:
        return "alpaca.jsonl", {"id": row["id"], "instruction": row["prompt"], "input": "", "output": row["response"]}
    return "chat.jsonl", {"id": row["id"], "messages": [
        {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]}


def general_text() -> str:
    """General English prose for the forgetting measure (licence texts), never from the domain."""
    folder = Path("/usr/share/common-licenses")
    texts, seen = [], set()
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            real = p.resolve()
            if real.is_file() and real not in seen:
                seen.add(real)
                texts.append(real.read_text(errors="replace"))
    if not texts:
        texts.append((Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(errors="replace"))
    return "\n\n".join(texts)


def general_pages() -> tuple[str, list[tuple[str, str]]]:
    """General prose as (name, text) pages, and where it comes from: the Linux manual pages when
    installed (grads_ray/demo/manpages.py), else the licence texts."""
    from grads_ray.demo.manpages import manpage_texts

    pages = manpage_texts()
    if pages:
        return "Linux man pages (sections 2, 3, 4, 5, 7, 8)", pages
    pages = [(f"licence-{k}", t) for k, t in enumerate(general_text().split("\n\n\n")) if len(t) > 200]
    return "licence texts under /usr/share/common-licenses (no man pages installed)", pages


def general_split(train_chars: int, test_chars: int | None = None, seed: int = 0) -> dict:
    """General prose cut into a pre-training text and a test text from other pages (a page is a
    test page by a hash of its name: about one in ten), each in a seeded order, the training text
    up to about ``train_chars`` characters, the test text up to ``test_chars`` (None: all).
    -> {train, test, source, pages_train, pages_test, train_chars, test_chars}."""
    source, pages = general_pages()
    test = [p for p in pages if _stable_hash("general-test:" + p[0]) % 10 == 0]
    train = [p for p in pages if _stable_hash("general-test:" + p[0]) % 10 != 0]

    def take(chosen: list[tuple[str, str]], limit: int | None) -> list[str]:
        chosen = sorted(chosen, key=lambda p: _stable_hash(f"order:{seed}:{p[0]}"))
        out, n = [], 0
        for _, text in chosen:
            if limit is not None and n >= limit:
                break
            out.append(text)
            n += len(text)
        return out

    tr, te = take(train, train_chars), take(test, test_chars)
    return {"train": "\n\n".join(tr), "test": "\n\n".join(te), "source": source, "pages_train": len(tr),
            "pages_test": len(te), "train_chars": sum(map(len, tr)), "test_chars": sum(map(len, te))}


def build_corpus(out_dir: str | Path, heldout_fraction: float = 0.05, limit: int | None = None,
                 pretrain_chars: int = 0) -> dict:
    """Write ``corpus/{pairs,alpaca,chat}.jsonl``, ``heldout.jsonl`` and ``general.txt`` under out_dir;
    with ``pretrain_chars``, also ``pretrain.txt`` (general prose for pre-training the base model;
    ``general.txt``, the forgetting test, then comes from other pages of the same source).

    -> a small dict of paths and counts. Held-out rows are chosen by a hash of the id.
    """
    out = Path(out_dir)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    rows = sft_rows()
    if limit is not None:
        rows = rows[:limit]
    files: dict[str, list[str]] = {"pairs.jsonl": [], "alpaca.jsonl": [], "chat.jsonl": []}
    heldout = []
    for row in rows:
        if (_stable_hash("heldout:" + row["id"]) % 10_000) < heldout_fraction * 10_000:
            heldout.append(json.dumps(row, ensure_ascii=False))
            continue
        name, shaped = _as_shape(row)
        files[name].append(json.dumps(shaped, ensure_ascii=False))
    for name, lines in files.items():
        (out / "corpus" / name).write_text("\n".join(lines) + "\n")
    (out / "heldout.jsonl").write_text("\n".join(heldout) + "\n")
    info = {"corpus": str(out / "corpus"), "heldout": str(out / "heldout.jsonl"),
            "general": str(out / "general.txt"), "n_train": sum(len(v) for v in files.values()),
            "n_heldout": len(heldout)}
    if pretrain_chars:
        general = general_split(pretrain_chars, test_chars=GENERAL_TEST_CHARS)
        (out / "pretrain.txt").write_text(general["train"])
        (out / "general.txt").write_text(general["test"])
        info.update(pretrain=str(out / "pretrain.txt"), general_source=general["source"],
                    pages_pretrain=general["pages_train"], pages_general=general["pages_test"])
    else:
        (out / "general.txt").write_text(general_text())
    return info
