import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import math
import random
import socket

import numpy as np
import pytest

import metrics as M

from prebias import metrics_engine as E
from prebias import refscorer


def one(text, names=None):
    """{name: float} for a single text."""
    return {k: float(v[0]) for k, v in E.text_metrics([text], names).items()}


def nan(x):
    return isinstance(x, float) and math.isnan(x)


# ----------------------------------------------------------------------------- registry

def test_registry_and_resolve():
    names = M.text_metric_names()
    assert names == list(M.TEXT_METRICS)
    assert names[:4] == ["n_chars", "n_words", "n_sentences", "mean_sentence_len"]
    for n in ["ttr", "mtld", "flesch_reading_ease", "fk_grade", "sentiment", "dialogue_share",
              "rep3", "gender_male", "gender_female", "gender_ratio"]:
        assert n in names
        assert isinstance(M.TEXT_METRICS[n], M.Metric) and M.TEXT_METRICS[n].description
    assert M.resolve_metrics(None) == names
    assert M.resolve_metrics("all") == names
    assert M.resolve_metrics("") == names
    assert M.resolve_metrics("ttr, n_words,ttr") == ["n_words", "ttr"]  # registry order, deduplicated
    assert M.resolve_metrics(["rep3", "n_chars"]) == ["n_chars", "rep3"]
    with pytest.raises(ValueError) as e:
        M.resolve_metrics("ttr,bogus")
    msg = str(e.value)
    assert "bogus" in msg and "valid:" in msg and "n_words" in msg and "\n" not in msg
    v = M.metric_versions()
    readability = ("flesch_reading_ease", "fk_grade")  # 2: syllables from the CMU Pronouncing Dictionary
    assert {n: v[n] for n in names if not n.startswith("gender_")} == \
        {n: 2 if n in readability else 1 for n in names if not n.startswith("gender_")}
    assert len({v[n] for n in names if n.startswith("gender_")}) == 1 and v["gender_male"].startswith("1+words:")
    try:  # the gender metrics' version carries the word lists: caches keyed on it recompute
        M.set_gender_words(["cat"], ["dog"])
        v2 = M.metric_versions()
        assert v2["gender_ratio"] != v["gender_ratio"] and v2["ttr"] == v["ttr"]
    finally:
        M.set_gender_words()
    assert M.metric_versions() == v
    assert M.metric_versions("ttr") == {"ttr": 1}
    assert isinstance(M.METRICS_VERSION, str)


def test_text_metrics_shapes_and_subset():
    texts = ["The cat sat.", "", "Hi"]
    r = E.text_metrics(texts)
    assert list(r) == M.text_metric_names()
    for v in r.values():
        assert v.dtype == np.float64 and v.shape == (3,)
    r = E.text_metrics(texts, ["gender_ratio", "n_words"])
    assert list(r) == ["n_words", "gender_ratio"]
    assert E.text_metrics([], None)["n_words"].shape == (0,)
    # each metric alone equals the same metric computed with all the others
    full = E.text_metrics(["He said \"go home now\" and left. She was sad!"])
    for n in M.text_metric_names():
        np.testing.assert_array_equal(E.text_metrics(["He said \"go home now\" and left. She was sad!"], [n])[n],
                                      full[n])


# ----------------------------------------------------------------------------- hand-checked values

def test_basic_example():
    r = one("The cat sat. The cat ran!")
    assert r["n_chars"] == 25
    assert r["n_words"] == 6
    assert r["n_sentences"] == 2
    assert r["mean_sentence_len"] == 3.0
    assert r["ttr"] == pytest.approx(4 / 6)
    # trigrams: the-cat-sat, cat-sat-the, sat-the-cat, the-cat-ran: none repeats
    assert r["rep3"] == 0.0
    # MTLD forward: ttr 1,1,1,3/4,3/5<=.72 -> 1 factor, then "ran" (ttr 1, adds 0) -> 6/1;
    # backward: ran cat the sat cat(4/5) the(4/6) -> 1 factor, nothing left -> 6
    assert r["mtld"] == pytest.approx(6.0)
    # 6 one-syllable words, 2 sentences
    assert r["flesch_reading_ease"] == pytest.approx(206.835 - 1.015 * 3 - 84.6 * 1)
    assert r["fk_grade"] == pytest.approx(0.39 * 3 + 11.8 * 1 - 15.59)
    assert r["dialogue_share"] == 0.0
    assert r["gender_male"] == 0 and r["gender_female"] == 0 and nan(r["gender_ratio"])


def test_rep3_and_ttr():
    # trigrams the-cat-sat, cat-sat-the, sat-the-cat, the-cat-sat(repeat) -> 1/4
    assert one("the cat sat the cat sat")["rep3"] == pytest.approx(0.25)
    # 6 trigrams of "a a a a a a a a": all but the first repeat -> 5/6
    assert one("a a a a a a a a")["rep3"] == pytest.approx(5 / 6)
    assert one("Dog dog DOG")["ttr"] == pytest.approx(1 / 3)  # lowercased
    assert nan(one("two words")["rep3"])


def test_mtld_hand():
    # "a a": ttr 1, then 1/2 <= .72 -> 1 factor, nothing left: 2/1 both ways
    assert one("a a")["mtld"] == pytest.approx(2.0)
    # "a b c": never reaches .72, leftover ttr 1 adds 0 factors -> defined as n_words
    assert one("a b c")["mtld"] == pytest.approx(3.0)
    # "a b a c": fwd a,b,a(2/3=.667) -> factor; c -> +0 => 4/1 ; bwd c,a,b,a(3/4=.75) -> 0 factors,
    # leftover (1-.75)/.28 => 4/(.25/.28)
    assert one("a b a c")["mtld"] == pytest.approx(0.5 * (4.0 + 4 / (0.25 / 0.28)))
    assert M.mtld([]) != M.mtld([])  # NaN


def test_dialogue_share():
    assert one('He said "go home now" and left.')["dialogue_share"] == pytest.approx(3 / 7)
    # curly quotes and a curly apostrophe inside the quote
    r = one("She said \u201cI can\u2019t go\u201d and cried.")
    assert r["n_words"] == 7 and r["dialogue_share"] == pytest.approx(3 / 7)
    # an unclosed quote runs to the end of the text
    assert one('Tom said "run now')["dialogue_share"] == pytest.approx(0.5)
    assert one('"Yes," said Mom. "Come here."')["dialogue_share"] == pytest.approx(3 / 5)


def test_gender():
    r = one("His mom and her dad met the King and Mrs. Smith.")
    assert r["gender_male"] == 3 and r["gender_female"] == 3 and r["gender_ratio"] == 0.5
    r = one("He and his brother played.")
    assert r["gender_male"] == 3 and r["gender_female"] == 0 and r["gender_ratio"] == 1.0


def test_gender_words_configurable(tmp_path, monkeypatch):
    try:
        M.set_gender_words(["cat"], ["dog"])
        r = one("The cat and the dog and the other dog. He ran.")
        assert (r["gender_male"], r["gender_female"]) == (1, 2)
        assert r["gender_ratio"] == pytest.approx(1 / 3)
        p = tmp_path / "g.json"
        p.write_text(json.dumps({"male": ["ram"], "female": ["ewe", "hen"]}))
        M.load_gender_words(p)
        assert M.gender_words() == (["ram"], ["ewe", "hen"])
        r = one("A ram, a ewe and a hen.")
        assert (r["gender_male"], r["gender_female"]) == (1, 2)
        with pytest.raises(ValueError):
            M.set_gender_words(["x"], ["x"])
        with pytest.raises(ValueError):
            M.load_gender_words(tmp_path / "missing.json")
    finally:
        M.set_gender_words()
    assert one("he she")["gender_ratio"] == 0.5


def test_syllables_and_flesch():
    cases = {"cat": 1, "make": 1, "little": 2, "table": 2, "whale": 1, "tree": 1, "agree": 2,
             "happy": 2, "the": 1, "he": 1, "ate": 1, "banana": 3, "hmm": 1, "42": 1, "caf\u00e9": 2}
    for w, n in cases.items():
        assert M.count_syllables(w) == n, w
    # the(1) little(2) whale(1) ate(1) a(1) big(1) cake(1): 8 syllables, 7 words, 1 sentence
    r = one("The little whale ate a big cake.")
    assert r["n_words"] == 7 and r["n_sentences"] == 1
    assert r["flesch_reading_ease"] == pytest.approx(206.835 - 1.015 * 7 - 84.6 * 8 / 7)
    assert r["fk_grade"] == pytest.approx(0.39 * 7 + 11.8 * 8 / 7 - 15.59)


def test_syllables_come_from_the_cmu_dictionary():
    """The vowel-group rule over-counts a silent -ed (named, lived, asked, looked: common in
    TinyStories); the CMU Pronouncing Dictionary gives 1, and the rule stays for words it lacks."""
    for w in ("named", "lived", "asked", "looked", "jumped", "smiled"):
        assert M.count_syllables(w) == 1 and M.rule_syllables(w) == 2, w
    assert M.count_syllables("fire") == 2 and M.count_syllables("everything") == 3
    assert "zorblax" not in M.cmu_syllables() and M.count_syllables("zorblax") == M.rule_syllables("zorblax") == 2
    # Lily(2) looked(1) at(1) the(1) named(1) boat(1): 7 syllables, 6 words
    r = one("Lily looked at the named boat.")
    assert r["fk_grade"] == pytest.approx(0.39 * 6 + 11.8 * 7 / 6 - 15.59)


def test_sentences():
    assert one("the dog ran and the cat sat")["n_sentences"] == 1  # no end mark
    assert one("Wait... what?! Yes")["n_sentences"] == 3
    assert one("Hi. . . there")["n_sentences"] == 2
    assert one("Hello!!!")["mean_sentence_len"] == 1.0
    r = one("...")
    assert r["n_words"] == 0 and r["n_sentences"] == 0 and nan(r["mean_sentence_len"])
    r = one("Lily's dog didn't run.")
    assert r["n_words"] == 4 and r["n_sentences"] == 1


def test_empty_text():
    r = one("")
    for k in ["n_chars", "n_words", "n_sentences", "gender_male", "gender_female"]:
        assert r[k] == 0, k
    for k in ["mean_sentence_len", "ttr", "mtld", "flesch_reading_ease", "fk_grade",
              "dialogue_share", "rep3", "gender_ratio"]:
        assert nan(r[k]), k
    assert r["sentiment"] == 0.0
    r = one("   \n ")
    assert r["n_chars"] == 5 and r["n_words"] == 0 and nan(r["ttr"])


def test_one_word():
    r = one("Hello")
    assert r["n_words"] == 1 and r["n_sentences"] == 1 and r["mean_sentence_len"] == 1
    assert r["ttr"] == 1 and r["mtld"] == 1 and nan(r["rep3"]) and r["dialogue_share"] == 0
    # hello: e, o -> 2 syllables
    assert r["flesch_reading_ease"] == pytest.approx(206.835 - 1.015 - 84.6 * 2)


def test_non_ascii():
    # words: café, naïve, 日本語です (a CJK run is one word); 😀 is no word
    r = one("Caf\u00e9 \U0001F600 na\u00efve. \u65e5\u672c\u8a9e\u3067\u3059")
    assert r["n_chars"] == 19
    assert r["n_words"] == 3 and r["n_sentences"] == 2 and r["ttr"] == 1
    # café 2, naïve 1 (aï one group, silent e), CJK word 1
    assert r["flesch_reading_ease"] == pytest.approx(206.835 - 1.015 * 1.5 - 84.6 * 4 / 3)
    assert M.words_of("\u00c9COLE \u00e9cole") == ["\u00e9cole", "\u00e9cole"]
    r = one("\u00bfQu\u00e9? \u00a1S\u00ed!")
    assert r["n_words"] == 2 and r["n_sentences"] == 2
    r = one("\U0001F600\U0001F600")
    assert r["n_words"] == 0 and r["sentiment"] != 0  # VADER reads emoji


def test_long_input():
    text = "The cat sat on the mat. " * 20000  # 120k words
    r = one(text)
    assert r["n_words"] == 120000 and r["n_sentences"] == 20000
    assert r["mean_sentence_len"] == 6.0 and r["ttr"] == pytest.approx(5 / 120000)
    assert 0.99 < r["rep3"] < 1.0
    assert 1.0 < r["mtld"] < 10.0
    assert np.isfinite(r["flesch_reading_ease"]) and -1 <= r["sentiment"] <= 1
    # a long run without letters or end marks must not be quadratic
    r = one(" ," * 200000 + "end")
    assert r["n_sentences"] == 1 and r["n_words"] == 1


# ----------------------------------------------------------------------------- VADER

def _vader_cases():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import bench_metrics
    texts = bench_metrics.make_texts(60, seed=7)
    texts += ["VADER is smart, handsome, and funny!", "I am NOT happy :(", "It was kind of good.",
              "The food is not very good, but the service was GREAT!!!", "no, no love lost",
              "At least it's not bad", "I never so happy", "that was the bomb", "Yeah right, great.",
              "He is the least happy boy", "Without doubt, a good day?? Really???", "",
              "I \u2764\ufe0f this \U0001F600", "sort of sad", "She was not the least bit sorry."]
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    words = list(SentimentIntensityAnalyzer().lexicon)[:400] + [
        "no", "not", "never", "so", "this", "but", "least", "at", "very", "kind", "of", "the", "bomb",
        "without", "doubt", "or", "nor", "isn't", "VERY", "HAPPY", "just", "enough", "!", "??", ":)",
        "Good!", "(sad)", "\U0001F600"]
    rng = random.Random(0)
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(400)]
    return texts


def test_vader_equals_library():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    sia = SentimentIntensityAnalyzer()
    texts = _vader_cases()
    ours = E.text_metrics(texts, ["sentiment"])["sentiment"]
    lib = np.array([sia.polarity_scores(t)["compound"] for t in texts])
    np.testing.assert_allclose(ours, lib, atol=1e-6, rtol=0)
    assert (ours != 0).sum() > 200  # the sample exercises real scores


# ----------------------------------------------------------------------------- overlap

def test_bleu_rouge_prefix():
    assert M.bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    assert M.bleu("dog runs fast", "a cat sleeps") == 0.0
    # all n-gram precisions 1, brevity penalty exp(1 - 5/4)
    assert M.bleu("a b c d", "a b c d e") == pytest.approx(100 * math.exp(-0.25), abs=1e-4)
    assert M.rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert M.rouge_l("dog runs", "a cat sleeps") == 0.0
    # LCS 4, precision 1, recall 4/5
    assert M.rouge_l("a b c d", "a b c d e") == pytest.approx(2 * 0.8 / 1.8)
    assert M.prefix_match([1, 2, 3, 4], [1, 2, 5]) == 2
    assert M.prefix_match(np.array([1, 2, 3]), [1, 2, 3]) == 3
    assert M.prefix_match([], [1]) == 0 and M.prefix_match([2], [1]) == 0
    r = M.overlap_metrics(["a b c d", "x"], ["a b c d e", "y"], [[1, 2], [3]], [[1, 2, 3], [4]])
    assert set(r) == {"bleu", "rouge_l", "prefix_match"}
    assert r["prefix_match"].tolist() == [2.0, 0.0] and r["bleu"].dtype == np.float64
    assert set(M.overlap_metrics(["a"], ["a"])) == {"bleu", "rouge_l"}
    with pytest.raises(ValueError):
        M.overlap_metrics(["a"], [])


def test_offline_libraries(monkeypatch):
    def no_net(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", no_net)
    monkeypatch.setattr(socket.socket, "connect_ex", no_net)
    monkeypatch.setattr(socket, "create_connection", no_net)
    monkeypatch.setattr(socket, "getaddrinfo", no_net)
    import sacrebleu
    from rouge_score import rouge_scorer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    assert sacrebleu.sentence_bleu("a b c", ["a b c"]).score == pytest.approx(100)
    assert rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score("cats run", "cats run")["rougeL"].fmeasure == 1
    assert SentimentIntensityAnalyzer().polarity_scores("good")["compound"] > 0
    M._ROUGE = None
    assert M.rouge_l("a b", "a b") == 1.0 and M.bleu("a b", "a b") == pytest.approx(100)
    assert E.text_metrics(["I love it!"], ["sentiment"])["sentiment"][0] > 0


# ----------------------------------------------------------------------------- NGramScorer

def _fitted(order=3, V=50, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [np.concatenate([[1], rng.integers(2, V, rng.integers(5, 60))]).astype(np.uint16)
            for _ in range(n // 30)]
    return refscorer.NGramScorer(order, V).fit(seqs), seqs


def test_scorer_normalised():
    sc, seqs = _fitted()
    for ctx in ([], [1], [1, 7], list(seqs[0][:2]), [49, 48], [3, 3, 3, 3]):
        p = sc.prob_dist(np.array(ctx, dtype=np.int64))
        assert p.shape == (50,) and (p > 0).all()
        assert abs(p.sum() - 1.0) < 1e-6
    sc1 = refscorer.NGramScorer(1, 50).fit(seqs)
    assert abs(sc1.prob_dist([]).sum() - 1) < 1e-6
    sc4 = refscorer.NGramScorer(4, 50).fit(seqs)
    assert abs(sc4.prob_dist(seqs[1][:3]).sum() - 1) < 1e-6


def test_scorer_repeating_vs_shuffled():
    V = 100
    pattern = np.arange(2, 22)
    train = np.concatenate([[1], np.tile(pattern, 200)])
    sc = refscorer.NGramScorer(3, V).fit([train])
    test = np.concatenate([[1], np.tile(pattern, 5)])
    shuffled = test.copy()
    np.random.default_rng(0).shuffle(shuffled[1:])
    assert sc.nll(test) < 0.2
    assert sc.nll(shuffled) > sc.nll(test) + 1.0
    # unseen tokens (never in training) get a finite nll
    unseen = np.array([1, 90, 91, 92, 2, 3], dtype=np.int64)
    t = sc.token_nll(unseen)
    assert t.shape == (5,) and np.isfinite(t).all() and t[0] > sc.token_nll(test)[0]


def test_scorer_random_perplexity_near_vocab():
    rng = np.random.default_rng(1)
    V = 64
    sc = refscorer.NGramScorer(2, V).fit([rng.integers(0, V, 200_000)])
    ppl = sc.perplexity(rng.integers(0, V, 20_000))
    assert abs(ppl / V - 1) < 0.1
    sc3 = refscorer.NGramScorer(3, V).fit([rng.integers(0, V, 300_000)])
    assert 0.9 < sc3.perplexity(rng.integers(0, V, 20_000)) / V < 1.4


def test_scorer_api_consistency():
    sc, seqs = _fitted()
    nm = sc.nll_many(seqs[:20] + [np.array([1]), np.array([], dtype=np.int64)])
    assert nm.shape == (22,) and np.isnan(nm[20]) and np.isnan(nm[21])
    np.testing.assert_allclose(nm[:20], [sc.nll(s) for s in seqs[:20]], rtol=1e-12)
    assert len(sc.token_nll(seqs[0])) == len(seqs[0]) - 1
    assert sc.token_nll(np.array([5])).shape == (0,) and math.isnan(sc.nll([5]))
    np.testing.assert_allclose(refscorer.scorer_perplexity(sc, seqs[:3]), np.exp(nm[:3]))
    assert sc.nll_many([]).shape == (0,)
    with pytest.raises(ValueError):
        sc.nll(np.array([1, 50]))  # id >= vocab_size
    with pytest.raises(ValueError):
        refscorer.NGramScorer(3, 50).nll([1, 2])  # not fitted


@pytest.mark.parametrize("order", [2, 3, 4])
def test_scorer_direct_lookup_equals_binary_search(monkeypatch, order):
    """The direct-lookup tables (small vocab) give bit-identical nll to the binary search
    (large vocab), including unseen n-grams and histories; a re-fit rebuilds them."""
    rng = np.random.default_rng(order)
    train = [rng.integers(0, 40, rng.integers(2, 60)) for _ in range(300)]
    test = [rng.integers(0, 40, rng.integers(0, 80)) for _ in range(200)] + [np.arange(40)]
    sc = refscorer.NGramScorer(order, 40).fit(train)
    fast = sc.nll_many(test)
    assert sc._dense(2) is not None  # the fast path ran
    monkeypatch.setattr(refscorer, "DENSE_MAX", 0)
    slow = refscorer.NGramScorer(order, 40).fit(train)
    assert slow._dense(2) is None
    np.testing.assert_array_equal(fast, slow.nll_many(test))
    monkeypatch.undo()
    sc.fit(train[:50])  # new counts: the old lookup tables must not survive
    np.testing.assert_array_equal(sc.nll_many(test), refscorer.NGramScorer(order, 40).fit(train[:50]).nll_many(test))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_scorer_probability_tables_equal_general_path(monkeypatch, order):
    """Reading P from the per-level probability tables gives bit-identical nll to the
    general path (interpolation computed per position), unseen n-grams and histories
    included; a 2-D array of windows scores as the list of its rows; a re-fit rebuilds."""
    rng = np.random.default_rng(10 + order)
    train = [rng.integers(0, 40, rng.integers(2, 60)) for _ in range(300)]
    test = [rng.integers(0, 40, rng.integers(0, 80)) for _ in range(200)] + [np.arange(40), np.array([3])]
    sc = refscorer.NGramScorer(order, 40).fit(train)
    fast = sc.nll_many(test)
    assert sc._probs() is not None  # the table path ran
    monkeypatch.setattr(refscorer, "PROB_MAX", 0)
    general = refscorer.NGramScorer(order, 40).fit(train)
    assert general._probs() is None and (order == 1 or general._dense(2) is not None)
    assert fast.tobytes() == general.nll_many(test).tobytes()
    wins = rng.integers(0, 40, (50, 17))
    assert general.nll_many(wins).tobytes() == general.nll_many(list(wins)).tobytes()
    monkeypatch.undo()
    assert sc.nll_many(wins).tobytes() == general.nll_many(list(wins)).tobytes()
    sc.fit(train[:50])  # new counts: the old tables must not survive
    assert sc.nll_many(test).tobytes() == refscorer.NGramScorer(order, 40).fit(train[:50]).nll_many(test).tobytes()


def test_scorer_save_load(tmp_path):
    sc, seqs = _fitted()
    p = tmp_path / "scorer.npz"
    sc.save(p)
    sc2 = refscorer.NGramScorer.load(p)
    assert (sc2.order, sc2.vocab_size) == (3, 50) and sc2.fingerprint() == sc.fingerprint()
    np.testing.assert_array_equal(sc2.nll_many(seqs[:10]), sc.nll_many(seqs[:10]))
    with np.load(p) as z:
        d = {k: z[k] for k in z.files}
    # other format version
    bad = dict(d, format_version=np.int64(99))
    np.savez(tmp_path / "v99.npz", **bad)
    # tampered counts -> fingerprint mismatch
    tam = dict(d, counts_1=d["counts_1"] + 1)
    np.savez(tmp_path / "tam.npz", **tam)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name in ["v99.npz", "tam.npz", "junk.npz", "missing.npz"]:
        with pytest.raises(ValueError) as e:
            refscorer.NGramScorer.load(tmp_path / name)
        msg = str(e.value)
        assert name in msg and "python tinystories.py pretokenize" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- batched engine

def _equivalence_corpus():
    """Varied texts: story-like windows cut anywhere (mid-word, mid-quote), with
    curly quotes, caps, accents, emoji, CJK, odd apostrophes and VADER modifiers
    sprinkled in, plus the edge cases of the tests above."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import bench_metrics
    rng = random.Random(11)
    stories = bench_metrics.make_texts(40, seed=5, target_words=120)
    big = "\n".join(stories)
    texts = []
    for _ in range(120):
        a = rng.randrange(len(big) - 400)
        texts.append(big[a:a + rng.randint(1, 1400)])
    subs = [('"', "\u201c"), ('"', "\u201d"), ("'", "\u2019"), ("a", "\u00e0"), ("e", "\u00e9"),
            (" ", " \U0001F600 "), (" ", " \u2764\ufe0f "), ("the", "THE"), ("happy", "HAPPY"),
            (".", "..."), (" ", " _"), ("s ", "s' "), (" ", " 'tis "), ("!", "!!!"), ("?", "??"),
            (" ", " 42 "), (" ", "\u65e5\u672c "), ("i", "\u0130"), ("ss", "\u00df"), (" ", " :) "),
            (" not ", " n't "), (" ", " no "), (" ", " but "), (" ", "\t"), (",", " kind of "),
            ("'", "''"), (" ", " \u2019 "), (" ", "\u00a0"), (" ", "\u2003"), ("o", "\u03a3"),
            (" ", " very "), (" ", " not "), (" ", " never so "), (" ", " least "), ("d", "\u0663")]
    for t in texts[:80]:
        for _ in range(rng.randint(1, 4)):
            a, b = rng.choice(subs)
            idx = [i for i in range(len(t)) if t.startswith(a, i)]
            for i in sorted(rng.sample(idx, min(len(idx), rng.randint(1, 6))), reverse=True):
                t = t[:i] + b + t[i + len(a):]
        texts.append(t)
    texts += _vader_cases()[::4]
    texts += ["", "Hello", "Caf\u00e9 \U0001F600 na\u00efve. \u65e5\u672c\u8a9e\u3067\u3059", "\U0001F600\U0001F600",
              "\u00bfQu\u00e9? \u00a1S\u00ed!", "She said \u201cI can\u2019t go\u201d and cried.", "Wait... what?! Yes",
              "Hi. . . there", "...", "   \n ", "a a", "a b a c", "'", "''", "_", "a_b", "x'", "'x", "a''b",
              "\u0130stanbul", "\u00c9COLE \u00e9cole", "\u201c\u201d", '"', '""a"', "A.B.C", "\u039f\u0394\u039f\u03a3 \u03a3\u0391\u03a3.",
              "The cat sat on the mat. " * 300, "a\x00b c", "x \x00 y", "\x1c split\x1fhere\x85now\u2028ok",
              "His mom and her dad met the King and Mrs. Smith.", 'Tom said "run now', '"Yes," said Mom. "Come here."',
              "I am NOT happy :( but VERY glad!!", "It was kind of good. No, no love lost?? Really???"]
    return texts


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float64).tobytes()


def test_batched_engine_equals_reference(monkeypatch):
    texts = _equivalence_corpus()
    ref = M.text_metrics_plain(texts)
    # several chunks, the plain MTLD loop for long passes, small MTLD windows
    for chunk, long_, win in [(1 << 20, 4096, 64), (3000, 50, 7), (1, 4096, 1)]:
        monkeypatch.setattr(E, "_CHUNK_CHARS", chunk)
        monkeypatch.setattr(E, "_MTLD_LONG", long_)
        monkeypatch.setattr(E, "_MTLD_WIN", win)
        got = E.text_metrics(texts)
        for k in M.text_metric_names():
            assert _bits(got[k]) == _bits(ref[k]), (k, chunk, long_, win)
    monkeypatch.undo()
    got = E.text_metrics(texts)
    # each metric alone, each text alone, and a shuffled subset give the same values
    for k in M.text_metric_names():
        assert _bits(E.text_metrics(texts, [k])[k]) == _bits(got[k]), k
    for i in range(0, len(texts), 7):
        one_ = E.text_metrics([texts[i]])
        for k in M.text_metric_names():
            assert _bits(one_[k]) == _bits(got[k][i:i + 1]), (k, i)
    order = list(range(len(texts)))
    random.Random(3).shuffle(order)
    sub = E.text_metrics([texts[i] for i in order[:150]])
    for k in M.text_metric_names():
        assert _bits(sub[k]) == _bits(got[k][order[:150]]), k


def test_batched_engine_fresh_tables_and_gender_change():
    texts = _equivalence_corpus()[:60]
    a = E.text_metrics(texts)
    E._TAB = None  # cold tables give the same values
    b = E.text_metrics(texts)
    for k in a:
        assert _bits(a[k]) == _bits(b[k]), k
    warm = E._TAB
    assert E.text_metrics(texts[:5], ["n_words"]) and E._TAB is warm  # the same lists: the tables outlive a call
    try:
        M.set_gender_words(["cat", "dog"], ["bird"])
        g = E.text_metrics(texts, ["gender_male", "gender_female", "gender_ratio", "fk_grade"])
        assert E._TAB is not warm  # new lists, new tables
        r = M.text_metrics_plain(texts, ["gender_male", "gender_female", "gender_ratio", "fk_grade"])
        for k in g:
            assert _bits(g[k]) == _bits(r[k]), k
    finally:
        M.set_gender_words()
    c = E.text_metrics(texts, ["gender_male"])
    assert _bits(c["gender_male"]) == _bits(a["gender_male"])
