"""The evidence benchmark's corpora: man pages as plain text, planted noise, the code domain's pairs."""

from __future__ import annotations

import ast
import gzip
from pathlib import Path

import pytest

from grads_ray.demo import code_corpus as cc
from grads_ray.demo.manpages import MAN_ROOT, groff_to_text, manpage_texts
from grads_ray.demo.noise import plant_noise, truncate_text

PAGE = r""".\" Copyright and licence comment
.TH FOO 2 2023-02-05 "Linux man-pages 6.03"
.de XX
.ft B
..
.SH NAME
foo \- do a thing
.SH SYNOPSIS
.nf
.B #include <foo.h>
.PP
.BI "int foo(const char *" path ", int " flags );
.fi
.SH DESCRIPTION
The
.BR foo ()
call opens \fIpath\fP and returns \(em on success \(em a descriptor;
see \fBbar\fR(2).
.TP
.B O_THING
A flag\
 continued.
.TS
allbox;
l l.
cell one	cell two
.TE
.SS Notes
It\(aqs fine.
"""


def test_groff_to_text_reads_headings_fonts_escapes_and_tables():
    text = groff_to_text(PAGE)
    paras = text.split("\n\n")
    assert paras[:3] == ["NAME", "foo - do a thing", "SYNOPSIS"]
    assert "int foo(const char *path, int flags);" in text
    assert "The foo() call opens path and returns — on success — a descriptor; see bar(2)." in paras
    assert "O_THING A flag continued." in paras
    assert "cell one cell two" in text and "allbox" not in text and "l l." not in text
    assert "It's fine." in paras and "Notes" in paras
    for junk in ("\\", ".ft", "Copyright", "FOO 2"):
        assert junk not in text
    assert groff_to_text(".so man2/other.2\n") == ""


@pytest.mark.skipif(not (MAN_ROOT / "man2").is_dir(), reason="no manual pages installed")
def test_installed_man_pages_become_readable_text():
    page = sorted((MAN_ROOT / "man2").glob("*.gz"))
    text = groff_to_text(gzip.decompress(page[len(page) // 2].read_bytes()).decode("utf-8", "replace"))
    pages = manpage_texts(sections=("2",))
    assert len(pages) > 50 and all(len(t) >= 200 for _, t in pages)
    joined = "\n".join(t for _, t in pages)
    assert "\\f" not in joined and "\n.B " not in joined and "DESCRIPTION" in joined
    assert text == "" or "NAME" in text


def test_plant_noise_counts_kinds_and_ground_truth():
    rows = [{"id": f"r{i}", "prompt": f"q{i}", "response": f"answer number {i} " * 20} for i in range(100)]
    noisy, kinds = plant_noise(rows, swapped=0.1, truncated=0.05, seed=3)
    assert sum(k == "swapped" for k in kinds.values()) == 10 and sum(k == "truncated" for k in kinds.values()) == 5
    by_id = {r["id"]: r for r in rows}
    for r in noisy:
        kind = kinds.get(r["id"])
        if kind == "swapped":
            assert r["response"] != by_id[r["id"]]["response"]
            assert r["response"] in {x["response"] for x in rows}
        elif kind == "truncated":
            assert by_id[r["id"]]["response"].startswith(r["response"]) and len(r["response"]) < 0.2 * len(by_id[r["id"]]["response"])
        else:
            assert r == by_id[r["id"]]
    assert [r["id"] for r in noisy] == [r["id"] for r in rows] and rows[0]["response"].startswith("answer")
    assert plant_noise(rows, 0.1, 0.05, seed=3) == (noisy, kinds)  # seeded
    assert plant_noise(rows, 0.1, 0.05, seed=4)[1] != kinds
    with pytest.raises(ValueError):
        plant_noise(rows, 0.6, 0.5, seed=0)


def test_truncate_text_at_a_blank():
    assert truncate_text("alpha beta gamma delta epsilon zeta eta theta", keep=0.3, min_chars=5) == "alpha beta"
    assert truncate_text("short", keep=0.15, min_chars=20) == "sh"


# ------------------------------------------------------------------ the code domain (issue 22)
SOURCE = '''
"""A module."""
import os


def join_all(parts, sep="/", *rest, strict=False, **kw):
    """Join the parts with sep.

    A second paragraph that the instruction leaves out.
    """
    out = sep.join(parts)
    return out + "".join(rest)


def tiny():
    return 1


class Box(object):
    """A box of things."""

    def put(self, item):
        """Put an item in the box, unless it is None."""
        if item is not None:
            self.items.append(item)

    def _helper(self):
        def inner():
            return "never a pair of its own: defined inside a function"
        return inner() + "and more text to be long enough for a pair"


def join_all(parts):
    return "a second definition of the same name: counted, not kept, but long enough"

'''


def test_code_pairs_from_a_small_library(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(SOURCE)
    (tmp_path / "pkg" / "again.py").write_text(SOURCE.split("class Box")[0])  # the same code in another module
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text(SOURCE)  # skipped: a test folder
    (tmp_path / "broken.py").write_text("def f(:\n")
    rows, counts = cc.code_rows(tmp_path)
    ids = [r["id"] for r in rows]
    assert ids == ["code:pkg:join_all", "code:pkg:Box", "code:pkg:Box.put", "code:pkg:Box._helper"]
    assert counts == {"files": 2, "unreadable_files": 1, "pairs": 4, "out_of_size": 2, "repeated_names": 1,
                      "repeated_code": 1}
    first = rows[0]
    assert first["prompt"] == ("Write the Python function `pkg.join_all`, whose signature is "
                               "`join_all(parts, sep='/', *rest, strict=False, **kw)`.\n\nJoin the parts with sep.")
    assert first["response"] == "def join_all(parts, sep='/', *rest, strict=False, **kw):\n    out = sep.join(parts)\n" \
                                "    return out + ''.join(rest)"
    box = rows[1]
    assert box["prompt"] == "Write the Python class `pkg.Box`.\n\nA box of things."
    assert '"""' not in box["response"] and "Put an item" not in box["response"]  # the methods' docstrings too
    assert rows[2]["prompt"].startswith("Write the Python method `pkg.Box.put`, whose signature is `put(self, item)`.")
    for r in rows:
        ast.parse(r["response"])
    assert cc.code_rows(tmp_path) == (rows, counts)  # deterministic


def test_code_module_names_and_a_docstring_only_body():
    assert cc.module_name(Path("json/decoder.py")) == "json.decoder"
    assert cc.module_name(Path("email/__init__.py")) == "email"
    node = ast.parse('def f():\n    """Only a docstring, and long enough to count as one."""\n').body[0]
    assert ast.unparse(cc.without_docstring(node)) == "def f():\n    pass"
    assert ast.get_docstring(node) is not None  # the original is left as it was


def test_code_pairs_from_the_installed_library():
    rows, counts = cc.code_rows(limit=300)
    assert len(rows) == 300 and counts["files"] >= 1
    assert len({r["id"] for r in rows}) == 300
    for r in rows:
        tree = ast.parse(r["response"])
        assert cc.MIN_CODE <= len(r["response"]) <= cc.MAX_CODE
        assert all(ast.get_docstring(n) is None for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
