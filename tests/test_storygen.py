import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import re

import pytest

from prebias import storygen
from prebias.storygen import StoryStyle, generate_stories, generate_story_records, story_features

N = 2000
_SENT = re.compile(r"[.!?]+[\"\u201d]?(?=\s|$)")
_WORD = re.compile(r"[a-z]+")
_QUOTE = re.compile(r"[\"\u201c\u201d]")
_HE = {"he", "him", "his", "himself"}
_SHE = {"she", "her", "herself"}


@pytest.fixture(scope="module")
def stories():
    return generate_stories(N, seed=1337)


def test_deterministic_and_seeded():
    a = generate_stories(50, seed=7)
    b = generate_stories(50, seed=7)
    assert a == b
    assert generate_stories(50, seed=8) != a
    # prefix-stable: the first k stories do not depend on n
    assert generate_stories(10, seed=7) == a[:10]
    assert generate_stories(50) == generate_stories(50, seed=1337)


def test_independent_of_global_random():
    # output must not depend on the global random module state
    import random
    random.seed(0)
    x = generate_stories(3, seed=123)
    random.seed(999)
    assert generate_stories(3, seed=123) == x


def test_n_respected():
    assert generate_stories(0) == []
    for n in (1, 2, 17):
        assert len(generate_stories(n, seed=3)) == n
    with pytest.raises(ValueError):
        generate_stories(-1)


def test_basic_form(stories):
    assert len(stories) == N
    for s in stories:
        assert isinstance(s, str) and s.strip() == s and s
        assert s[-1] in ".!?\"\u201d", s[-40:]
        assert "{" not in s and "}" not in s
        assert "  " not in s
        assert s[0].isupper() or s[0] in "\"\u201c"


def test_no_duplicates(stories):
    assert len(set(stories)) == N


def test_sentence_count_spread(stories):
    counts = [len(_SENT.findall(s)) for s in stories]
    assert min(counts) <= 3
    assert max(counts) >= 20
    # a real spread, not a few outliers
    assert sum(c <= 6 for c in counts) >= 0.05 * N
    assert sum(c >= 20 for c in counts) >= 0.15 * N


def test_dialogue_mix(stories):
    with_q = sum(bool(_QUOTE.search(s)) for s in stories)
    assert with_q >= 0.2 * N
    assert N - with_q >= 0.2 * N
    shares = [story_features(s)["dialogue_share"] for s in stories]
    assert sum(x >= 0.4 for x in shares) >= 0.03 * N  # some mostly-dialogue stories


def test_gender_mix(stories):
    he_heavy = she_heavy = 0
    for s in stories:
        words = _WORD.findall(s.lower())
        he = sum(w in _HE for w in words)
        she = sum(w in _SHE for w in words)
        he_heavy += he >= 3 and she == 0
        she_heavy += she >= 3 and he == 0
    assert he_heavy >= 0.1 * N
    assert she_heavy >= 0.1 * N
    assert any(re.search(r"\bIt\b", s) and " its " in s for s in stories)  # "it" animals


def test_vocabulary_and_length(stories):
    vocab = set()
    lengths = []
    for s in stories:
        words = _WORD.findall(s.lower())
        vocab.update(words)
        lengths.append(len(words))
    assert len(vocab) >= 1500
    mean = sum(lengths) / len(lengths)
    assert 100 <= mean <= 250
    ttr = [story_features(s)["type_token_ratio"] for s in stories]
    assert max(ttr) - min(ttr) > 0.3


def test_openings_paragraphs_unicode(stories):
    once = sum(s.startswith("Once upon a time") for s in stories) / N
    assert 0.45 <= once <= 0.75
    assert sum("\n\n" in s for s in stories) >= 0.2 * N
    nonascii = sum(any(ord(c) > 127 for c in s) for s in stories)
    assert 0 < nonascii <= 0.15 * N


def test_sentiments_and_refrains():
    recs = generate_story_records(1000, seed=5)
    assert {r["sentiment"] for r in recs} == {"happy", "sad", "scary", "angry"}
    assert {r["cast"] for r in recs} == {"girl", "boy", "mixed", "animal"}
    assert any(r["refrain"] for r in recs)
    assert all(r["story"] for r in recs)


def test_style_is_configurable():
    girls = StoryStyle(cast_weights=(("girl", 1.0),), dialogue_weights=(("none", 1.0),))
    out = generate_stories(100, seed=1, style=girls)
    feats = [story_features(s) for s in out]
    assert sum(f["n_she"] > f["n_he"] for f in feats) >= 90
    assert all('"' not in s and "\u201c" not in s for s in out)
    assert out != generate_stories(100, seed=1)


def test_module_uses_no_global_random():
    src = pathlib.Path(storygen.__file__).read_text()
    assert "random.random(" not in src and "random.choice(" not in src
    assert "hash(" not in src
