"""A larger real domain for the evidence benchmark (issue 22): the installed Python standard
library's own functions, methods and classes as instruction -> code pairs.

Every ``.py`` file under the standard library's folder (tests, IDLE, lib2to3, turtledemo, ensurepip,
site-packages and the ``encodings`` codecs, a hundred copies of the same few classes, left out) is parsed with :mod:`ast`; each function, method and class defined at a
module's top level or in a top-level class (not inside a function) whose code is
``MIN_CODE``..``MAX_CODE`` characters becomes one pair:

- instruction: "Write the Python function `json.decoder.py_scanstring`, whose signature is
  `py_scanstring(s, end, strict=True, ...)`." and, where it has one, the first paragraph of its
  docstring ("Scan the string s for a JSON string. ...");
- response: its code as :func:`ast.unparse` writes it (comments dropped, formatting normalised),
  without the docstring: the answer is the code.

Ids are ``code:<module>:<qualified name>``: a name defined twice at a module's top level keeps its
first definition of the right size (definitions inside ``if``/``try`` blocks are not read). A
response already given by an earlier pair (the same code under another name) is left out too, so the
same answer never lands on both sides of the held-out split. The order is the files' sorted order,
so the corpus is the same on every machine with the same Python. Nothing is downloaded; nobody here
wrote the text.
"""

from __future__ import annotations

import ast
import copy
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
                       "dist-packages", "__pycache__", "pydoc_data", "encodings"})
MIN_CODE, MAX_CODE = 60, 2000
MAX_DOC = 600  # characters of the docstring's first paragraph kept in the instruction


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(rel: Path) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``email/__init__.py`` -> ``email``."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(module name, path) of the library's source files, sorted, outside :data:`SKIP_DIRS`."""
    root = root or stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not any(part in SKIP_DIRS for part in rel.parts[:-1]) and "-" not in rel.stem:
            yield module_name(rel), path


def first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    para = doc.strip().split("\n\n", 1)[0]
    para = " ".join(line.strip() for line in para.splitlines())
    return para if len(para) <= MAX_DOC else para[:MAX_DOC].rsplit(" ", 1)[0] + " ..."


def without_docstring(node: ast.AST) -> ast.AST:
    """A copy of a def/class node with its docstring statement removed (a body left empty gets
    ``pass``), and the same done to the methods of a class."""
    node = copy.deepcopy(node)
    for n in ast.walk(node):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(n) is not None:
            n.body = n.body[1:] or [ast.Pass()]
    return node


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def definitions(tree: ast.Module) -> Iterator[tuple[str, str, ast.AST]]:
    """(qualified name, kind, node) for the top-level functions and classes and the methods of
    top-level classes."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, "function", node
        elif isinstance(node, ast.ClassDef):
            yield node.name, "class", node
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{sub.name}", "method", sub


def pair(module: str, qual: str, kind: str, node: ast.AST) -> dict | None:
    """One instruction -> code row, or None when the code is too short or too long."""
    code = ast.unparse(without_docstring(node))
    if not MIN_CODE <= len(code) <= MAX_CODE:
        return None
    name = f"{module}.{qual}"
    if kind == "class":
        prompt = f"Write the Python class `{name}`."
    else:
        prompt = f"Write the Python {kind} `{name}`, whose signature is `{signature(node)}`."
    doc = first_paragraph(ast.get_docstring(node))
    if doc:
        prompt += f"\n\n{doc}"
    return {"id": f"code:{module}:{qual}", "prompt": prompt, "response": code}


def code_rows(root: Path | None = None, limit: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """Every pair, in a stable order, and counts (files read, files skipped, pairs, too short or
    long, repeated names, repeated code)."""
    rows: list[dict] = []
    seen: set[str] = set()
    answers: set[str] = set()
    counts = {"files": 0, "unreadable_files": 0, "pairs": 0, "out_of_size": 0, "repeated_names": 0,
              "repeated_code": 0}
    for module, path in source_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            counts["unreadable_files"] += 1
            continue
        counts["files"] += 1
        for qual, kind, node in definitions(tree):
            row = pair(module, qual, kind, node)
            if row is None:
                counts["out_of_size"] += 1
            elif row["id"] in seen:
                counts["repeated_names"] += 1
            elif row["response"] in answers:
                counts["repeated_code"] += 1
            else:
                seen.add(row["id"])
                answers.add(row["response"])
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    counts["pairs"] = len(rows)
                    return rows, counts
    counts["pairs"] = len(rows)
    return rows, counts


def documentation_text() -> str:
    """The library's documentation as plain text, for pre-training the code domain's base model
    beside the man pages: the language reference topics and the docstrings (grads_ray/demo/corpus.py)."""
    from pydoc_data.topics import topics

    from grads_ray.demo.corpus import docstring_pairs

    parts = [topics[t] for t in sorted(topics)]
    parts += [f"{name}\n{doc}" for name, doc in docstring_pairs()]
    return "\n\n".join(parts)
