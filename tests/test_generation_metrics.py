"""Generation metrics: BLEU / chrF / ROUGE-L against plain re-computations on known strings, and
batched left-padded greedy generation against one prompt at a time without padding."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from grads_ray.data.formats import IGNORE_INDEX
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
