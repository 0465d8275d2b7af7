"""Generation metrics against independent references (sacrebleu; a plain-Python LCS), and the
DSL generator's splits and grammar checker."""

import random

import pytest
import sacrebleu

import scaletrain


def random_corpus(rng, n):
    words = ["flowroll", "|", "keep", "qty", ">=", "5", "sort", "price", "desc", "take", "3", "a.csv"]
    refs, cands = [], []
    for _ in range(n):
        ref = [rng.choice(words) for _ in range(rng.randint(4, 14))]
        cand = [w if rng.random() < 0.7 else rng.choice(words) for w in ref]
        if rng.random() < 0.3:
            cand = cand[: rng.randint(1, len(cand))]
        refs.append(" ".join(ref))
        cands.append(" ".join(cand))
    return cands, refs


@pytest.mark.parametrize("seed", range(5))
def test_bleu_matches_sacrebleu(seed):
    cands, refs = random_corpus(random.Random(seed), 60)
    expected = sacrebleu.corpus_bleu(cands, [refs], tokenize="none", smooth_method="none", force=True).score / 100
    assert scaletrain.corpus_bleu4(cands, refs) == pytest.approx(expected, abs=1e-9)


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l_reference(cand, ref):
    c, r = cand.split(), ref.split()
    if not c and not r:
        return 1.0
    k = lcs(c, r)
    if k == 0:
        return 0.0
    p, q = k / len(c), k / len(r)
    return 2 * p * q / (p + q)


@pytest.mark.parametrize("seed", range(3))
def test_rouge_l_matches_plain_python(seed):
    cands, refs = random_corpus(random.Random(100 + seed), 80)
    for c, r in zip(cands, refs):
        assert scaletrain.rouge_l(c, r) == pytest.approx(rouge_l_reference(c, r), abs=1e-12)
    mean = sum(rouge_l_reference(c, r) for c, r in zip(cands, refs)) / len(cands)
    assert scaletrain.mean_rouge_l(cands, refs) == pytest.approx(mean, abs=1e-12)


def test_dsl_split_is_disjoint_and_valid():
    train, val = scaletrain.dsl_split(21, ["flowroll", "dimmatch"], 3000, 200)
    assert len(train) == 3000 and len(val) == 200
    assert not {r for r, _ in train} & {r for r, _ in val}
    assert not {p for _, p in train} & {p for _, p in val}
    for _, program in train + val:
        assert scaletrain.check_program(program) == ""
    assert scaletrain.dsl_split(21, ["flowroll", "dimmatch"], 3000, 200) == (train, val)
    with pytest.raises(scaletrain.ConfigError, match="expected flowroll or dimmatch"):
        scaletrain.dsl_split(1, ["sql"], 10, 10)


def test_check_program_reasons():
    assert scaletrain.check_program("dimmatch b t c -> b c t") == ""
    assert scaletrain.check_program("dimmatch b t c -> b c") == "dimmatch: axes vanish on the right without 'reduce'"
