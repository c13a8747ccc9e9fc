"""Generation metrics: BLEU / chrF / ROUGE-L against plain re-computations on known strings, METEOR
(WordNet from disk, or absent), and
batched left-padded greedy generation against one prompt at a time without padding."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.evaluation import meteor as meteor_mod
from grads_ray.evaluation.generation import greedy_continuations, split_prompt, text_scores

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

PREDS = ["the cat sat on the mat", "the quick brown fox jumps over the lazy dog", "hello world"]
REFS = ["the cat is on the mat", "the quick brown fox jumped over the lazy dog", "hello there world"]


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def plain_corpus_bleu(preds, refs, max_n=4):
    """Papineni et al.: clipped n-gram precisions summed over the corpus, geometric mean, brevity
    penalty (whitespace words: these strings have no punctuation for 13a to split)."""
    match, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for p, r in zip(preds, refs, strict=True):
        pw, rw = p.split(), r.split()
        hyp_len, ref_len = hyp_len + len(pw), ref_len + len(rw)
        for n in range(1, max_n + 1):
            hp, rp = _ngrams(pw, n), _ngrams(rw, n)
            match[n - 1] += sum(min(c, rp[g]) for g, c in hp.items())
            total[n - 1] += max(len(pw) - n + 1, 0)
    log_p = sum(math.log(m / t) for m, t in zip(match, total, strict=True)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)


def plain_chrf(preds, refs, order=6, beta=2.0):
    """Popović's chrF: character n-grams (whitespace removed) for n = 1..6, statistics summed over the
    corpus, precision and recall averaged over n, then F-beta."""
    precs, recs = [], []
    for n in range(1, order + 1):
        m = hp_tot = rp_tot = 0
        for p, r in zip(preds, refs, strict=True):
            ps, rs = p.replace(" ", ""), r.replace(" ", "")
            hp = Counter(ps[i:i + n] for i in range(len(ps) - n + 1))
            rp = Counter(rs[i:i + n] for i in range(len(rs) - n + 1))
            m += sum(min(c, rp[g]) for g, c in hp.items())
            hp_tot, rp_tot = hp_tot + sum(hp.values()), rp_tot + sum(rp.values())
        precs.append(m / hp_tot if hp_tot else 0.0)
        recs.append(m / rp_tot if rp_tot else 0.0)
    p, r = sum(precs) / order, sum(recs) / order
    return 100 * (1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0


def plain_rouge_l(pred, ref):
    """ROUGE-L F1 from the longest common subsequence of lower-cased alphanumeric tokens."""
    a, b = re.findall(r"[a-z0-9]+", pred.lower()), re.findall(r"[a-z0-9]+", ref.lower())
    lcs = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a)):
        for j in range(len(b)):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a[i] == b[j] else max(lcs[i][j + 1], lcs[i + 1][j])
    n = lcs[-1][-1]
    if n == 0:
        return 0.0
    p, r = n / len(a), n / len(b)
    return 2 * p * r / (p + r)


def test_text_scores_equal_plain_recomputations():
    got = text_scores(PREDS, REFS)
    assert got["bleu"] == pytest.approx(plain_corpus_bleu(PREDS, REFS), abs=1e-6)
    assert got["chrf"] == pytest.approx(plain_chrf(PREDS, REFS), abs=1e-6)
    assert got["rougeL"] == pytest.approx(100 * sum(map(plain_rouge_l, PREDS, REFS)) / 3, abs=1e-9)
    same = text_scores(REFS, REFS)
    assert same["bleu"] == pytest.approx(100) and same["chrf"] == pytest.approx(100) and same["rougeL"] == 100
    assert text_scores([], []) == {}
    with pytest.raises(ValueError):
        text_scores(["a"], [])


def test_split_prompt():
    ids, labels = [5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, 9]
    assert split_prompt(ids, labels) == ([5, 6], [7, 9])
    assert split_prompt([1, 2], [IGNORE_INDEX, IGNORE_INDEX]) == ([1, 2], [])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_greedy_equals_one_at_a_time(kind, tmp_path):
    """Left padding and the attention mask change nothing: each prompt's batched continuation equals
    an argmax loop over that prompt alone (float64, no cache, no padding)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import save_tiny_model

    save_tiny_model(kind, tmp_path / kind, vocab=97)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 11, 1, 7, 6)]
    eos = 2
    got, n_tok = greedy_continuations(model, prompts, max_new_tokens=9, batch_size=3, eos_id=eos, pad_id=0)
    total = 0
    for p, out in zip(prompts, got, strict=True):
        seq = list(p)
        ref = []
        for _ in range(9):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == eos:
                break
            ref.append(nxt)
            seq.append(nxt)
        assert out == ref
        total += len(ref)
    assert n_tok == total


# --------------------------------------------------------------------------------------------- METEOR
WORDNET, _ = meteor_mod.find_wordnet("auto")
needs_wordnet = pytest.mark.skipif(WORDNET is None, reason="no WordNet on this machine (apt-get install wordnet-base)")


def test_meteor_absent_not_zero_without_wordnet(tmp_path, monkeypatch):
    scores = text_scores(["a b c"], ["a b c"], wordnet=str(tmp_path))
    assert "meteor" not in scores and str(tmp_path) in scores["meteor_absent"]
    assert "meteor" not in text_scores(["a"], ["a"]) and "meteor_absent" not in text_scores(["a"], ["a"])  # none: off
    monkeypatch.setattr(meteor_mod, "DEBIAN_WORDNET", tmp_path / "nowhere")
    monkeypatch.setattr(meteor_mod, "nltk_data_dirs", lambda: [tmp_path])
    folder, why = meteor_mod.find_wordnet("auto")
    assert folder is None and "wordnet-base" in why
    assert text_scores(["a"], ["a"], wordnet="auto")["meteor_absent"] == why


def test_finding_wordnet_does_not_import_nltk(tmp_path):
    """The driver resolves eval.wordnet for every evaluation's fingerprint: that must not import nltk
    (~2 s, ~190 MB); its default folders are NLTK's own."""
    import os
    import subprocess
    import sys

    code = ("import sys; from grads_ray.evaluation.meteor import find_wordnet, nltk_data_dirs; find_wordnet('auto'); "
            "print('nltk' in sys.modules); import nltk.data; "
            "print(sorted(map(str, nltk_data_dirs())) == sorted({str(p) for p in nltk.data.path}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "NLTK_DATA": str(tmp_path)}).stdout.split()
    assert out == ["False", "True"]


def test_lexnames_table_matches_wordnets_own():
    """The table served for Debian's missing lexnames file, against lexnames(5WN) where installed."""
    import gzip
    import re
    from pathlib import Path

    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.is_file():
        pytest.skip("no lexnames(5WN) manual page here")
    rows = re.findall(r"^(\d\d)\t([a-z]+\.[A-Za-z]+)\s", gzip.decompress(page.read_bytes()).decode(), re.M)
    assert [name for _, name in rows] == list(meteor_mod.LEXNAMES)
    assert [int(i) for i, _ in rows] == list(range(len(meteor_mod.LEXNAMES)))


@needs_wordnet
def test_meteor_reads_wordnet_from_disk():
    wn = meteor_mod.wordnet_reader(str(WORDNET))
    assert wn.synset("dog.n.01").lexname() == "noun.animal"  # the lexnames table's order
    assert "fast" in {lemma.name() for s in wn.synsets("quick") for lemma in s.lemmas()}
    same = text_scores(["the quick brown fox jumps"], ["the quick brown fox jumps"], wordnet="auto")["meteor"]
    synonym = text_scores(["the fast brown fox leaps"], ["the quick brown fox jumps"], wordnet="auto")["meteor"]
    other = text_scores(["the slow brown fox rests"], ["the quick brown fox jumps"], wordnet="auto")["meteor"]
    assert 95 < same <= 100 and other < synonym <= same
    from nltk.translate.meteor_score import meteor_score

    # the mean of NLTK's sentence scores, on lower-cased word tokens
    preds, refs = ["A cat sat.", "hello there"], ["the cat sat on the mat", "Hello world"]
    want = 50 * sum(meteor_score([meteor_mod.tokens(r)], meteor_mod.tokens(p), wordnet=wn) for p, r in zip(preds, refs, strict=True))
    assert text_scores(preds, refs, wordnet=str(WORDNET))["meteor"] == pytest.approx(want)


def test_evaluation_fingerprint_names_the_wordnet_found(monkeypatch, tmp_path):
    """An evaluation made without WordNet is recomputed once WordNet is installed: its fingerprint
    names the folder found, not the setting ``auto``."""
    from grads_ray.config import Config
    from grads_ray.stages import evaluate

    cfg = Config()
    monkeypatch.setattr(meteor_mod, "find_wordnet", lambda s: (None, "none here"))
    before = evaluate.eval_settings(cfg)
    monkeypatch.setattr(meteor_mod, "find_wordnet", lambda s: (tmp_path, ""))
    after = evaluate.eval_settings(cfg)
    assert before["wordnet"] == "auto" and after["wordnet"] == str(tmp_path)
    cfg.eval.generate = 0  # no generation, no METEOR: the setting alone
    assert evaluate.eval_settings(cfg)["wordnet"] == "auto"
