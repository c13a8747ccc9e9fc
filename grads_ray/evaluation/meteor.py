"""METEOR (Banerjee & Lavie 2005), the GrADS paper's second text metric, through NLTK's
``meteor_score`` with WordNet 3.0 read from disk. Nothing is downloaded: where no WordNet is found,
METEOR is reported as absent (with the reason), never as zero.

Where WordNet is looked for (``eval.wordnet``): ``auto`` tries Debian's ``wordnet-base`` folder
(/usr/share/wordnet, the dictionary files of Princeton WordNet 3.0), then ``corpora/wordnet`` on
NLTK's data path; a folder name uses that folder; ``none`` turns METEOR off. Debian's folder lacks the
``lexnames`` file NLTK's reader opens (WordNet's fixed table of its 45 lexicographer files,
lexnames(5WN)); the reader is then given that table from here.

Scores: the mean over examples of NLTK's sentence METEOR (default α 0.9, β 3, γ 0.5; exact, stem and
WordNet-synonym matches) on lower-cased word and punctuation tokens, on a 0-100 scale.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

DEBIAN_WORDNET = Path("/usr/share/wordnet")
# lexnames(5WN): WordNet 3.0's lexicographer files, numbered from 0 in this order.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
NEEDED = ("index.noun", "index.verb", "index.adj", "index.adv", "data.noun", "data.verb", "data.adj", "data.adv")
TOKEN = re.compile(r"\w+|[^\w\s]")


def nltk_data_dirs() -> list[Path]:
    """NLTK's default data folders, as ``nltk.data.path`` lists them (``NLTK_DATA``, then the home
    folder, the interpreter's prefix and the system's places), without importing nltk: the driver
    asks this for every evaluation's fingerprint, and importing nltk costs ~2 s and ~190 MB there."""
    env = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    prefix = Path(sys.prefix)
    return [*env, Path.home() / "nltk_data", prefix / "nltk_data", prefix / "share" / "nltk_data",
            prefix / "lib" / "nltk_data", Path("/usr/share/nltk_data"), Path("/usr/local/share/nltk_data"),
            Path("/usr/lib/nltk_data"), Path("/usr/local/lib/nltk_data")]


def find_wordnet(setting: str = "auto") -> tuple[Path | None, str]:
    """-> (a folder with WordNet's dictionary files, "") or (None, why none is used)."""
    if setting == "none":
        return None, "eval.wordnet=none"
    if setting != "auto":
        folder = Path(setting)
        missing = [f for f in NEEDED if not (folder / f).is_file()]
        return (folder, "") if not missing else (None, f"eval.wordnet={setting}: no {missing[0]} there")
    if importlib.util.find_spec("nltk") is None:
        return None, "nltk is not installed"
    for folder in [DEBIAN_WORDNET, *(d / "corpora" / "wordnet" for d in nltk_data_dirs())]:
        if all((folder / f).is_file() for f in NEEDED):
            return folder, ""
    return None, ("no WordNet found (Debian: apt-get install wordnet-base, which puts WordNet 3.0 in "
                  f"{DEBIAN_WORDNET}; or set eval.wordnet to a folder of its dictionary files)")


@functools.lru_cache(maxsize=4)
def wordnet_reader(folder: str) -> Any:
    """NLTK's WordNet reader over ``folder`` (loaded once per process: a few seconds). NLTK reads only
    from folders on its data path, so ``folder`` is added to it; a missing ``lexnames`` is served from
    :data:`LEXNAMES` (no file is written), and no map to NLTK's own WordNet copy (for multilingual data,
    unused here) is built."""
    import io
    import warnings

    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = str(Path(folder).resolve())
    has_lexnames = (Path(root) / "lexnames").is_file()

    class Reader(WordNetCorpusReader):
        def open(self, file):  # noqa: A003 - NLTK's name
            if file == "lexnames" and not has_lexnames:
                return io.StringIO("".join(f"{i:02d}\t{name}\t{i}\n" for i, name in enumerate(LEXNAMES)))
            return super().open(file)

        def map_wn(self, version="wordnet"):  # a mapping for multilingual data: it would load NLTK's own copy
            return None

    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():  # "the multilingual functions are not available": not used here
        warnings.simplefilter("ignore")
        return Reader(root, None)


def tokens(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return TOKEN.findall(text.lower())


def meteor(predictions: list[str], references: list[str], wordnet: str = "auto") -> tuple[float | None, str]:
    """Mean sentence METEOR × 100 of predictions against one reference each. -> (score, "") or
    (None, why it is absent)."""
    folder, why = find_wordnet(wordnet)
    if folder is None:
        return None, why
    from nltk.translate.meteor_score import meteor_score

    try:
        wn = wordnet_reader(str(folder))
    except Exception as exc:  # a broken or partial WordNet: absent, with the reason
        return None, f"WordNet at {folder} could not be read: {type(exc).__name__}: {exc}"
    if not predictions:
        return None, "no predictions"
    total = sum(meteor_score([tokens(r)], tokens(p), wordnet=wn) for p, r in zip(predictions, references, strict=True))
    return 100.0 * total / len(predictions), ""
