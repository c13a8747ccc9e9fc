"""General technical prose from the Linux manual pages installed on the machine (Debian's ``manpages``
and ``manpages-dev``: sections 2, 3, 4, 5, 7, 8 of /usr/share/man), as plain text: the general-text
side of the evidence benchmark (pre-training corpus and forgetting test set). Nobody here wrote it,
nothing is downloaded.

:func:`groff_to_text` is a small, forgiving reader of the ``man`` macro package: headings become
lines of their own, font changes and escapes are dropped, tables keep their cells. It is not a
typesetter; it only has to give readable running text.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
SECTIONS = ("2", "3", "4", "5", "7", "8")  # manpages / manpages-dev: system calls, library, files, overviews

_NAMED = {"em": "—", "en": "–", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "bu": "•",
          "co": "©", "rg": "®", "mu": "×", "di": "÷", "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→",
          "hy": "-", "ti": "~", "ha": "^", "rs": "\\", "ga": "`", "at": "@", "sh": "#", "Do": "$", "ba": "|",
          "lh": "", "rh": "", "de": "°", "sc": "§", "ul": "_"}
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string interpolation
    (re.compile(r"\\\((..)"), lambda m: _NAMED.get(m.group(1), "")),
    (re.compile(r"\\\[([^\]]*)\]"), lambda m: _NAMED.get(m.group(1), "")),
    (re.compile(r"\\[&:%|^cdu]"), ""),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), "\\\\"),
]
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
_JOINING = {"B", "I", "SM", "SB"}
_BREAKS = {"PP", "P", "LP", "sp", "br", "HP", "TP", "RS", "RE", "EX", "EE"}


def _inline(text: str) -> str:
    for pattern, repl in _ESCAPES:
        text = pattern.sub(repl, text)
    return text.replace("\\", "")


def _args(rest: str) -> list[str]:
    """A macro line's arguments: blank-separated, "double quoted" ones may hold blanks."""
    return [a[1:-1] if a.startswith('"') and a.endswith('"') and len(a) > 1 else a
            for a in re.findall(r'"[^"]*"?|\S+', rest)]


def groff_to_text(source: str) -> str:
    """The running text of one man page's groff source ('' for a ``.so`` redirect)."""
    lines = source.replace("\\\n", "").splitlines()  # a trailing backslash continues the line
    out: list[str] = []
    para: list[str] = []
    skip_until = None
    table_format = False  # after .TS: options and format lines, up to the one ending in '.'

    def flush() -> None:
        if para:
            out.append(" ".join(" ".join(para).split()))
            para.clear()

    for line in lines:
        if skip_until is not None:  # inside a macro definition (.de ... ..) or an ignored block
            if line.strip().startswith(skip_until):
                skip_until = None
            continue
        if table_format:
            table_format = not line.rstrip().endswith(".")
            continue
        if line.startswith(('.\\"', "'\\\"", '.\\#')) or line.strip() in (".", "'"):
            continue
        if not line.startswith((".", "'")):
            if line.strip():
                para.append(_inline(line.replace("\t", " ")))
            else:
                flush()
            continue
        m = re.match(r"[.'][ \t]*([A-Za-z0-9]+)(.*)", line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2).strip()
        if name == "so":
            return ""
        if name in ("de", "ig"):
            skip_until = ".."
        elif name == "TS":  # tables: the format lines are skipped, the cells kept as text
            flush()
            table_format = True
        elif name in ("SH", "SS"):
            flush()
            title = _inline(" ".join(_args(rest)))
            if title:
                out.append(title)
        elif name in _ALTERNATING:
            para.append(_inline("".join(_args(rest))))
        elif name in _JOINING:
            para.append(_inline(" ".join(_args(rest))))
        elif name == "IP":
            flush()
            tag = _args(rest)[:1]
            if tag and tag[0] not in ("", "\\(bu", "*"):
                para.append(_inline(tag[0]))
        elif name in _BREAKS:
            flush()
        # everything else (.TH, .nf, .fi, .in, .ad, .ft, .if, .ie, .el, .ne, .ds, .nr, .TE, ...) is layout
    flush()
    return "\n\n".join(p for p in out if p)


def manpage_texts(root: Path = MAN_ROOT, sections: tuple[str, ...] = SECTIONS,
                  min_chars: int = 200) -> list[tuple[str, str]]:
    """(``name.section``, text) of every English page in those sections under ``root``, sorted;
    redirects (``.so``) and pages under ``min_chars`` are left out. [] when none is installed."""
    pages = []
    for section in sections:
        folder = Path(root) / f"man{section}"
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = groff_to_text(raw.decode("utf-8", errors="replace"))
            if len(text) >= min_chars:
                pages.append((path.name.removesuffix(".gz"), text))
    return pages
