"""
The one yardstick: every text metric, the reference n-gram scorer and the
hypothesis/reference overlap scores live here and nowhere else.

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

Use text_metrics(texts, names) for batches; it shares the tokenisation between
metrics and is the only supported entry point (the per-metric docstrings below
are the definitions).  Bump METRICS_VERSION and the metric's version when any
definition changes.
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
from typing import Iterable

import numpy as np

METRICS_VERSION = "1.0"

# -----------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Metric:
    name: str
    version: int
    description: str
    kind: str = "ratio"          # "count" | "ratio" | "score"
    empty: str = "nan"           # value for a text with no words


_M = [
    Metric("n_chars", 1, "number of Unicode code points, len(text)", "count", "0"),
    Metric("n_words", 1, "number of words (WORD_RE matches on the lowercased text)", "count", "0"),
    Metric("n_sentences", 1, "number of [.!?]-run-delimited pieces that contain a word", "count", "0"),
    Metric("mean_sentence_len", 1, "n_words / n_sentences (words per sentence)"),
    Metric("ttr", 1, "type-token ratio: distinct lowercase words / n_words"),
    Metric("mtld", 1, "MTLD (McCarthy & Jarvis), TTR threshold 0.72, mean of forward and "
                      "backward passes; a pass with 0 factors scores n_words"),
    Metric("flesch_reading_ease", 1, "206.835 - 1.015*words/sentences - 84.6*syllables/words "
                                     "(syllables: vowel groups with silent-e rule)", "score"),
    Metric("fk_grade", 1, "Flesch-Kincaid grade: 0.39*words/sentences + 11.8*syllables/words - 15.59",
           "score"),
    Metric("sentiment", 1, "VADER compound score in [-1, 1] of the whole text (vaderSentiment 3.3.2, "
                           "exact re-implementation)", "score", "0"),
    Metric("dialogue_share", 1, "share of words inside double quotes (\" “ ” toggle; an unclosed quote "
                                "runs to the end of the text)"),
    Metric("rep3", 1, "share of word 3-grams that repeat an earlier 3-gram of the same text "
                      "(NaN below 3 words)"),
    Metric("gender_male", 1, "number of words in the male word list", "count", "0"),
    Metric("gender_female", 1, "number of words in the female word list", "count", "0"),
    Metric("gender_ratio", 1, "gender_male / (gender_male + gender_female); NaN when both are 0"),
]
TEXT_METRICS: dict[str, Metric] = {m.name: m for m in _M}


def text_metric_names() -> list[str]:
    """All text metric names in registry (stable) order."""
    return list(TEXT_METRICS)


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
_NORM = str.maketrans({"\u2019": "'", "\u201c": '"', "\u201d": '"'})


def _normalise(text: str):
    """(lowercased text with curly quotes/apostrophes made straight, is_ascii)."""
    low = text.lower()
    if low.isascii():
        return low, True
    return low.translate(_NORM), False


def words_of(text: str) -> list[str]:
    """The word tokens of text as every metric sees them (lowercased, ’ -> ')."""
    low, _ = _normalise(text)
    return WORD_RE.findall(low)


def _tokens(low: str, ascii_: bool):
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


def _n_sentences(low: str, ascii_: bool) -> int:
    return len((_SENT_A if ascii_ else _SENT_U).findall(low))


# -----------------------------------------------------------------------------
# syllables: own heuristic, cached per word

_VOWELS = "aeiouyàáâãäåæèéêëìíîïòóôõöøùúûüýÿœ"
_VOWEL_GROUP = re.compile(f"[{_VOWELS}]+")


def count_syllables(word: str) -> int:
    """Heuristic syllable count of one lowercase word.

    Count maximal groups of vowels (a e i o u y and their accented forms).
    Silent-e rule: if the word ends in 'e' whose previous letter is not a
    vowel, and that e is not part of a consonant+'le' ending (table, little),
    the final e is not a syllable -- unless it is the only vowel group (he, the).
    Every word has at least one syllable (so digits, CJK, 'hmm' count 1).
    Examples: cat 1, make 1, little 2, table 2, whale 1, tree 1, agree 2, happy 2.
    """
    n = len(_VOWEL_GROUP.findall(word))
    if (n > 1 and len(word) >= 2 and word[-1] == "e" and word[-2] not in _VOWELS
            and not (word[-2] == "l" and len(word) >= 3 and word[-3] not in _VOWELS)):
        n -= 1
    return n if n > 0 else 1


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
    _MALE, _FEMALE = m, f
    _WORD_INFO.clear()
    global _TAB
    _TAB = None  # the batched engine's word tables hold gender flags


def load_gender_words(path) -> None:
    """Set the lists from a JSON file {"male": [...], "female": [...]} (a missing key
    keeps that default).  Also applied at import when $METRICS_GENDER_WORDS names a file."""
    try:
        d = json.loads(Path(path).read_text())
        male, female = d.get("male"), d.get("female")
    except Exception as e:  # noqa: BLE001 - one-line message
        raise ValueError(f"{path}: cannot read gender word lists ({e})") from None
    set_gender_words(male, female)


def gender_words() -> tuple[list[str], list[str]]:
    """The lists in use, sorted (record them with results if you override them)."""
    return sorted(_MALE), sorted(_FEMALE)


# per-word cache: syllables + (male << 24) + (female << 48); summing the packed
# values over a text gives the three totals in one C-level pass.
_SHIFT_M, _SHIFT_F, _MASK = 24, 48, (1 << 24) - 1


class _WordInfo(dict):
    def __missing__(self, w):
        v = count_syllables(w) + ((w in _MALE) << _SHIFT_M) + ((w in _FEMALE) << _SHIFT_F)
        if len(self) > 2_000_000:
            self.clear()
        self[w] = v
        return v


_WORD_INFO = _WordInfo()
set_gender_words()
if os.environ.get(GENDER_WORDS_ENV):
    load_gender_words(os.environ[GENDER_WORDS_ENV])


# -----------------------------------------------------------------------------
# MTLD

MTLD_THRESHOLD = 0.72


def _mtld_factors(words) -> float:
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
    f = _mtld_factors(words)
    b = _mtld_factors(reversed(words))
    return 0.5 * ((n / f if f > 0 else n) + (n / b if b > 0 else n))


# -----------------------------------------------------------------------------
# VADER: exact, faster re-implementation of SentimentIntensityAnalyzer().
# polarity_scores(text)["compound"], using the package's own lexicon, emoji
# table and constants.  It tokenises once, looks words up through caches and
# only runs the context rules around lexicon hits (the library rebuilds the
# lowercase token list several times per lexicon hit).

_V = None  # lazily initialised state


def _vader_state():
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


def vader_compound(text: str) -> float:
    """VADER compound score of text, equal to the library's
    SentimentIntensityAnalyzer().polarity_scores(text)['compound'] (tested)."""
    V = _V or _vader_state()
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
        valence = _vader_valence(lows, caps, i, n, cap_diff, V)
        if valence != 0:
            sparse.append([i, valence])
    if not sparse:
        return 0.0
    bi = lows.index("but") if "but" in lows else -1
    return _vader_compound_of([v for _, v in sparse], [p for p, _ in sparse], bi, text)


def _vader_compound_of(vals: list, pos: list, bi: int, text: str) -> float:
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
# batch text metrics



# -----------------------------------------------------------------------------
# batched engine behind text_metrics
#
# Every text is split at whitespace once (all texts of a chunk joined by a
# sentinel token, one str.split).  Each distinct whitespace token ("raw token",
# e.g. 'Lily\\'s,' or '"Hello!"') is interned once per process into an integer
# id, and everything the metrics need from it is derived once and stored in
# tables indexed by that id:
#   - its word-level items: the WORD_RE words of its normalised lowercase form,
#     and the double quotes and [.!?] end marks between them, as word ids
#     (0 = quote, 1 = end mark, >= 2 = word).  Words, quotes and end marks never
#     span whitespace, and str.lower() does not look across whitespace, so the
#     concatenated items of a text's raw tokens are exactly the items of the
#     whole text (checked against the per-text reference in the tests);
#   - its VADER properties (lowercased stripped form, lexicon valence, whether
#     it can modify a neighbour, ALL CAPS, "but").
# The metrics are then numpy operations over the concatenated id arrays of the
# whole chunk; the only per-token Python work left is one dict lookup.  Values
# are bit-for-bit those of tests/metrics_reference.text_metrics_ref (same float operations in the same
# order; VADER sums and rounding stay in Python).

_ITEM_A = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[\".!?]", re.ASCII)
_ITEM_U = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[\".!?]")
_SEP = "\x00"            # sentinel token between the texts of a chunk
_CHUNK_CHARS = 1 << 20   # texts are processed in chunks of about this many chars
_MTLD_WIN = 64           # MTLD: positions examined per pass per round
_MTLD_LONG = 4096        # MTLD: passes longer than this run the plain loop
_TABLE_LIMIT = 1_000_000  # raw tokens kept between calls
_MASK21 = (1 << 21) - 1


class _Grow:
    """A numpy array that grows at the end (amortised doubling)."""

    def __init__(self, dtype):
        self.a = np.zeros(1024, dtype)
        self.n = 0

    def extend(self, vals):
        m = len(vals)
        if self.n + m > self.a.size:
            b = np.zeros(max(2 * self.a.size, self.n + m), self.a.dtype)
            b[:self.n] = self.a[:self.n]
            self.a = b
        self.a[self.n:self.n + m] = vals
        self.n += m


class _RawIds(dict):
    """raw token -> id; a new token only gets the next id here, its properties are
    filled in lazily (_Tables.fill_words / fill_vader) for whichever metrics run."""

    def __init__(self):
        super().__init__()
        self.toks: list[str] = []

    def __missing__(self, tok):
        i = len(self.toks)
        self[tok] = i
        self.toks.append(tok)
        return i


class _Tables:
    def __init__(self):
        self.raw = _RawIds()
        # word-level items of each raw token: flat item ids, offset, count
        self.n_words_filled = 0
        self.items = _Grow(np.int64)
        self.ioff = _Grow(np.int64)
        self.ilen = _Grow(np.int64)
        # word id -> [syllables, male, female]; ids 0/1 are the quote/end items
        self.wid = {'"': 0, ".": 1, "!": 1, "?": 1}
        self.winfo = _Grow(np.int64)
        self.winfo.extend([0, 0, 0, 0, 0, 0])
        self.wpack = _Grow(np.int64)    # the same packed: syl | male << 21 | female << 42
        self.wpack.extend([0, 0])
        # VADER properties of each raw token
        self.n_vader_filled = 0
        self.vlow: list[str] = []
        self.vval = _Grow(np.float64)   # lexicon valence of a non-booster lexicon word, else 0
        self.vhit = _Grow(np.bool_)     # lexicon word that is not a booster
        self.vflag = _Grow(np.uint8)    # role bits 1|2|4|8, 16: ALL CAPS, 32: "but"
        self.vmemo: dict = {}           # context of a hit -> valence (see _vader_batch)

    def fill_words(self):
        toks = self.raw.toks
        k = self.n_words_filled
        if k == len(toks):
            return
        wid, winfo, wpack = self.wid, [], []
        flat, offs, lens = [], [], []
        base = self.items.n
        for tok in toks[k:]:
            low = tok.lower()
            if low.isascii():
                its = _ITEM_A.findall(low)
            else:
                its = _ITEM_U.findall(low.translate(_NORM))
            offs.append(base + len(flat))
            lens.append(len(its))
            for w in its:
                j = wid.get(w)
                if j is None:
                    j = wid[w] = len(wid) - 2  # '!' and '?' share the end id
                    winfo += [count_syllables(w), w in _MALE, w in _FEMALE]
                    wpack.append(winfo[-3] | (winfo[-2] << 21) | (winfo[-1] << 42))
                flat.append(j)
        self.items.extend(flat)
        self.ioff.extend(offs)
        self.ilen.extend(lens)
        self.winfo.extend(winfo)
        self.wpack.extend(wpack)
        self.n_words_filled = len(toks)

    def fill_vader(self):
        toks = self.raw.toks
        k = self.n_vader_filled
        if k == len(toks):
            return
        V = _V or _vader_state()
        strip, lower, lex, booster, role = V["strip"], V["lower"], V["lex"], V["booster"], V["role"]
        lows, vals, hits, flags = [], [], [], []
        for tok in toks[k:]:
            lw = lower[tok]
            hit = lw in lex and lw not in booster
            lows.append(lw)
            hits.append(hit)
            vals.append(lex[lw] if hit else 0.0)
            flags.append(role[lw] | (16 if strip[tok].isupper() else 0) | (32 if lw == "but" else 0))
        self.vlow += lows
        self.vval.extend(vals)
        self.vhit.extend(hits)
        self.vflag.extend(flags)
        self.n_vader_filled = len(toks)


_TAB: _Tables | None = None


def _tables() -> _Tables:
    global _TAB
    if _TAB is None or len(_TAB.raw) > _TABLE_LIMIT:
        _TAB = _Tables()
    return _TAB


_EMOJI_CP = None


def _has_emoji(text: str) -> bool:
    """Whether VADER would rewrite emoji in text (then its tokens differ from text.split())."""
    global _EMOJI_CP
    V = _V or _vader_state()
    if not V["emoji_ascii"] and text.isascii():
        return False
    if _EMOJI_CP is None:
        _EMOJI_CP = np.array(sorted(ord(c) for c in V["emoji_chars"]), np.uint32)
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    if not V["emoji_ascii"]:
        cp = cp[cp > 127]
    j = np.searchsorted(_EMOJI_CP, cp)
    return bool((_EMOJI_CP[np.minimum(j, _EMOJI_CP.size - 1)] == cp).any())


def _cumdiff(mask: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Number of True in mask[bounds[i]:bounds[i+1]] for every i (int64)."""
    c = np.zeros(mask.size + 1, np.int64)
    np.cumsum(mask, out=c[1:])
    return c[bounds[1:]] - c[bounds[:-1]]


def _vader_valence(lows, caps, i, n, cap_diff, V):
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


def _vader_batch(texts, rids, t0, tab) -> list[float]:
    """VADER compound of every text from the chunk's raw token ids (texts whose
    emoji VADER would rewrite are redone by the caller)."""
    V = _V or _vader_state()
    tab.fill_vader()
    T = len(texts)
    out = [0.0] * T
    hp = np.flatnonzero(tab.vhit.a[rids])
    if hp.size == 0:
        return out
    fl = tab.vflag.a[rids]
    fh = fl[hp]
    # a hit needs the context rules when it or a token up to 3 before it can
    # change its valence (the previous text's tokens may flag a hit needlessly;
    # the rules then see the real context and give the plain value)
    slow = (fh & 24) != 0
    for d, bit in ((1, 1), (2, 2), (3, 4)):
        slow |= (fl[np.maximum(hp - d, 0)] & bit).astype(bool) & (hp >= d)
    vals = tab.vval.a[rids[hp]]
    sp = np.flatnonzero(slow)
    if sp.size:
        # the rules read at most 3 tokens before and 2 after the hit, their caps
        # and whether the text mixes caps: memoise the valence on exactly that
        g = hp[sp]
        tt = np.searchsorted(t0, g, "right") - 1
        s_, e_ = t0[tt], t0[tt + 1]
        caps = (fl & 16) != 0
        ccaps = np.zeros(caps.size + 1, np.int64)
        np.cumsum(caps, out=ccaps[1:])
        n_tok, n_up = e_ - s_, ccaps[e_] - ccaps[s_]
        cdiff = ((n_tok - n_up > 0) & (n_tok - n_up < n_tok)).tolist()
        P = g[:, None] + np.arange(-3, 3)
        inside = (P >= s_[:, None]) & (P < e_[:, None])
        ctx = np.where(inside, rids[np.clip(P, 0, max(rids.size - 1, 0))] + 1, 0)
        if rids.size and int(rids.max()) < (1 << 21) - 2:
            k1 = (ctx[:, 0] << 42) | (ctx[:, 1] << 21) | ctx[:, 2]
            k2 = (ctx[:, 3] << 42) | (ctx[:, 4] << 21) | ctx[:, 5]
            keys = list(zip(k1.tolist(), k2.tolist(), cdiff))
        else:
            keys = [(*row, cd) for row, cd in zip(ctx.tolist(), cdiff)]
        memo = tab.vmemo
        if len(memo) > 1_000_000:
            memo.clear()
        new = list(map(memo.get, keys))
        miss = [k for k, x in enumerate(new) if x is None]
        if miss:
            vlow = tab.vlow
            t0l, gl = t0.tolist(), g.tolist()
            for k in miss:
                gk, t = gl[k], int(tt[k])
                a, b = max(t0l[t], gk - 3), min(t0l[t + 1], gk + 3)
                v = _vader_valence([vlow[r] for r in rids[a:b].tolist()], caps[a:b].tolist(),
                                   gk - a, b - a, cdiff[k], V)
                new[k] = memo[keys[k]] = v
        vals[sp] = new
    nz = vals != 0
    hp, vals = hp[nz], vals[nz]
    if hp.size == 0:
        return out
    k = np.searchsorted(hp, t0).tolist()
    bp = np.flatnonzero(fl & 32)   # "but" tokens: first one of each text
    if bp.size:
        fb = np.searchsorted(bp, t0[:-1])
        cand = bp[np.minimum(fb, bp.size - 1)]
        first_but = np.where((fb < bp.size) & (cand < t0[1:]), cand, -1).tolist()
    else:
        first_but = [-1] * T
    hv, hpl = vals.tolist(), hp.tolist()
    for t in range(T):
        a, b = k[t], k[t + 1]
        if a == b:
            continue
        out[t] = _vader_compound_of(hv[a:b], hpl[a:b], first_but[t], texts[t])
    return out


_TMAX = np.zeros(0, np.int64)


def _tmax(cmax: int) -> np.ndarray:
    """tmax[c] = the largest t with t / c <= MTLD_THRESHOLD (as floats), c >= 1."""
    global _TMAX
    if _TMAX.size <= cmax:
        c = np.arange(max(cmax + 1, 2 * _TMAX.size, 1024), dtype=np.int64)
        cf = np.maximum(c, 1).astype(np.float64)
        t = np.floor(c * MTLD_THRESHOLD).astype(np.int64)
        t = np.where((t + 1) / cf <= MTLD_THRESHOLD, t + 1, t)
        t = np.where(t / cf > MTLD_THRESHOLD, t - 1, t)
        assert ((t / cf <= MTLD_THRESHOLD) & ((t + 1) / cf > MTLD_THRESHOLD))[1:].all()
        _TMAX = t
    return _TMAX


def _mtld_passes(prv: np.ndarray, ps: np.ndarray, pe: np.ndarray) -> np.ndarray:
    """MTLD factor count of every pass [ps[k], pe[k]) over positions whose earlier
    occurrence of the same word inside the pass is prv[p] (< ps[k] when none).
    Runs all passes together, a window of _MTLD_WIN positions per pass and round:
    a segment starting at s closes at the first p with types(s..p) <= tmax[p-s+1]
    (checking every position equals checking repeats only: a new word never
    lowers the TTR)."""
    W = _MTLD_WIN
    out = np.zeros(ps.size, np.float64)
    tmax = _tmax(int((pe - ps).max(initial=0)) + W + 1)
    ar = np.arange(W, dtype=np.int64)
    idx = np.arange(ps.size)
    s, c, e = ps.copy(), ps.copy(), pe.copy()
    tb = np.zeros(ps.size, np.int64)
    fac = np.zeros(ps.size, np.int64)
    last = prv.size - 1
    one_minus = 1.0 - MTLD_THRESHOLD
    while idx.size:
        P = c[:, None] + ar
        valid = P < e[:, None]
        new = prv[np.minimum(P, last)] < s[:, None]
        types = np.cumsum(new, axis=1)
        types += tb[:, None]
        close = types <= tmax[P - (s - 1)[:, None]]
        close &= valid
        anyc = close.any(axis=1)
        first = close.argmax(axis=1)
        # closed segments: the next one starts after the closing position
        ns = c + first + 1
        fac += anyc
        done_exact = anyc & (ns >= e)
        # open segments that reach the end: leftover (1 - TTR) / (1 - 0.72)
        at_end = ~anyc & (c + W >= e)
        if at_end.any():
            r = np.flatnonzero(at_end)
            t_last = types[r, e[r] - c[r] - 1].astype(np.float64)
            cnt = (e[r] - s[r]).astype(np.float64)
            out[idx[r]] = fac[r] + (1.0 - t_last / cnt) / one_minus
        if done_exact.any():
            r = np.flatnonzero(done_exact)
            out[idx[r]] = fac[r].astype(np.float64)
        go = ~(done_exact | at_end)
        cont = ~anyc
        tb = np.where(cont, types[:, W - 1], 0)
        s = np.where(anyc, ns, s)
        c = np.where(anyc, ns, c + W)
        if not go.all():
            idx, s, c, e, tb, fac = idx[go], s[go], c[go], e[go], tb[go], fac[go]
    return out


_NEED_SENT = frozenset({"n_sentences", "mean_sentence_len", "flesch_reading_ease", "fk_grade"})
_NEED_INFO = frozenset({"flesch_reading_ease", "fk_grade", "gender_male", "gender_female", "gender_ratio"})


def _chunk_metrics(texts: list[str], want: set, tab: _Tables) -> dict[str, np.ndarray]:
    T = len(texts)
    res: dict[str, np.ndarray] = {}
    raw = tab.raw
    get = raw.__getitem__
    # --- raw tokens of all texts, t0[t]:t0[t+1] for text t
    sep_id = get(_SEP)
    joined = " \x00 ".join(texts)
    if joined.count(_SEP) == T - 1:
        toks = joined.split()
        rids = np.fromiter(map(get, toks), np.int64, len(toks))
        cut = np.flatnonzero(rids == sep_id)
        keep = np.ones(rids.size, bool)
        keep[cut] = False
        rids = rids[keep]
        t0 = np.empty(T + 1, np.int64)
        t0[0] = 0
        t0[1:T] = cut - np.arange(T - 1)
        t0[T] = rids.size
    else:  # some text contains the sentinel character: split text by text
        parts = [t.split() for t in texts]
        t0 = np.zeros(T + 1, np.int64)
        np.cumsum(list(map(len, parts)), out=t0[1:])
        rids = np.fromiter(map(get, chain.from_iterable(parts)), np.int64, int(t0[-1]))
    if "sentiment" in want:
        sent = _vader_batch(texts, rids, t0, tab)
        for t, text in enumerate(texts):
            if _has_emoji(text):
                sent[t] = vader_compound(text)
        res["sentiment"] = np.asarray(sent, np.float64)
    if not (want - {"n_chars", "sentiment"}):
        return res
    # --- word-level items (0 quote, 1 end mark, >= 2 word) of every text
    tab.fill_words()
    il = tab.ilen.a[rids]
    cs = np.zeros(il.size + 1, np.int64)
    np.cumsum(il, out=cs[1:])
    total = int(cs[-1])
    src = np.repeat(tab.ioff.a[rids] - cs[:-1], il)
    src += np.arange(total, dtype=np.int64)
    items = tab.items.a[src]
    b0 = cs[t0]                      # item bounds per text
    isw = items >= 2
    n = _cumdiff(isw, b0)
    nf = n.astype(np.float64)
    has = n > 0
    NAN = np.nan

    def ratio(num, den, ok):
        r = np.full(T, NAN)
        np.divide(num, den, out=r, where=ok)
        return r

    if "n_words" in want:
        res["n_words"] = nf
    if "dialogue_share" in want:
        # a word is quoted when an odd number of quotes precede it in its text
        cq = np.zeros(items.size + 1, np.int64)
        np.cumsum(items == 0, out=cq[1:])
        par = cq[1:] - np.repeat(cq[b0[:-1]], np.diff(b0))
        quoted = isw & (par & 1).astype(bool)
        res["dialogue_share"] = ratio(_cumdiff(quoted, b0).astype(np.float64), nf, has)
    if want & _NEED_SENT:
        nq = items != 0
        it2 = items[nq]
        b2 = _cumdiff(nq, b0)
        bb = np.zeros(T + 1, np.int64)
        np.cumsum(b2, out=bb[1:])
        start = np.empty(it2.size, bool)
        if it2.size:
            start[0] = True
            np.equal(it2[:-1], 1, out=start[1:])
            start[bb[:-1][b2 > 0]] = True
            start &= it2 >= 2
        ns = _cumdiff(start, bb)
        nsf = ns.astype(np.float64)
        if "n_sentences" in want:
            res["n_sentences"] = nsf
        if "mean_sentence_len" in want:
            res["mean_sentence_len"] = ratio(nf, nsf, ns > 0)
    need_uniq = bool(want & {"ttr", "mtld", "rep3"})
    if not (need_uniq or want & _NEED_INFO):
        return res
    W = items[isw]
    N = W.size
    wo = np.zeros(T + 1, np.int64)
    np.cumsum(n, out=wo[1:])
    if want & _NEED_INFO:
        # per-text totals of syllables, male and female words, packed in 21-bit
        # fields (a text's totals stay below twice its number of characters)
        nz = np.flatnonzero(n)
        tot = np.zeros((T, 3), np.int64)
        if nz.size:
            if max(map(len, texts)) < (1 << 20):
                r = np.add.reduceat(tab.wpack.a[W], wo[nz])
                tot[nz, 0], tot[nz, 1], tot[nz, 2] = r & _MASK21, (r >> 21) & _MASK21, r >> 42
            else:
                tot[nz] = np.add.reduceat(tab.winfo.a[:tab.winfo.n].reshape(-1, 3)[W], wo[nz], axis=0)
        tot = tot.astype(np.float64)
        syl, male, female = tot[:, 0], tot[:, 1], tot[:, 2]
        if want & {"flesch_reading_ease", "fk_grade"}:
            ok = has & (ns > 0)
            wps = ratio(nf, nsf, ok)
            spw = ratio(syl, nf, ok)
            fre = 206.835 - 1.015 * wps - 84.6 * spw
            fk = 0.39 * wps + 11.8 * spw - 15.59
            fre[~ok] = NAN
            fk[~ok] = NAN
            if "flesch_reading_ease" in want:
                res["flesch_reading_ease"] = fre
            if "fk_grade" in want:
                res["fk_grade"] = fk
        if "gender_male" in want:
            res["gender_male"] = male
        if "gender_female" in want:
            res["gender_female"] = female
        if "gender_ratio" in want:
            mf = male + female
            res["gender_ratio"] = ratio(male, mf, mf > 0)
    if not need_uniq:
        return res
    # --- previous/next occurrence of each word inside its text
    tid = np.repeat(np.arange(T), n)
    ws, we = wo[:-1][tid], wo[1:][tid]           # bounds of each word's text
    if N and len(tab.wid) <= 4 * N + 4096:
        present = np.zeros(len(tab.wid), bool)
        present[W] = True
        lut = np.cumsum(present) - 1
        L = lut[W]
        n_loc = int(lut[-1]) + 1
    else:
        _, L = np.unique(W, return_inverse=True)
        L = L.reshape(-1)
        n_loc = int(L.max(initial=-1)) + 1
    o = np.argsort(L.astype(np.uint16) if n_loc <= 65536 else L, kind="stable")
    Ls = L[o]
    same = Ls[1:] == Ls[:-1]
    a_, b_ = o[:-1][same], o[1:][same]
    prev = np.full(N, -1, np.int64)
    prev[b_] = a_
    nxt = np.full(N, N, np.int64)
    nxt[a_] = b_
    seen = prev >= ws           # word occurred earlier in its text
    if "ttr" in want:
        res["ttr"] = ratio((n - _cumdiff(seen, wo)).astype(np.float64), nf, has)
    if "mtld" in want:
        # pass k < T: text k forwards; pass T + k: text k backwards, stored
        # reversed at N + (reversed position)
        se1 = ws + we - 1
        prv2 = np.empty(2 * N, np.int64)
        prv2[:N] = prev
        prv2[N + se1 - np.arange(N)] = np.where(nxt < we, N + se1 - nxt, -1)
        ps = np.concatenate([wo[:-1], N + wo[:-1]])
        pe = np.concatenate([wo[1:], N + wo[1:]])
        ln = pe - ps
        fac = np.zeros(2 * T, np.float64)
        short = np.flatnonzero((ln > 0) & (ln <= _MTLD_LONG))
        if short.size:
            fac[short] = _mtld_passes(prv2, ps[short], pe[short])
        for k in np.flatnonzero(ln > _MTLD_LONG).tolist():
            t = k % T
            seq = W[wo[t]:wo[t + 1]].tolist()
            fac[k] = _mtld_factors(seq if k < T else reversed(seq))
        f, bk = fac[:T], fac[T:]
        a1 = ratio(nf, f, f > 0)
        a1[~(f > 0)] = nf[~(f > 0)]
        a2 = ratio(nf, bk, bk > 0)
        a2[~(bk > 0)] = nf[~(bk > 0)]
        m = 0.5 * (a1 + a2)
        m[~has] = NAN
        res["mtld"] = m
    if "rep3" in want:
        # a trigram can equal an earlier one only if all its words occur earlier,
        # and a later one only if all occur later: every other trigram is unique
        nrep = np.zeros(T, np.int64)
        ok3 = n > 2
        if N >= 3:
            later = nxt < we
            in3 = np.zeros(N, bool)
            in3[:N - 2] = (np.arange(N - 2) <= we[:N - 2] - 3)
            cand = in3.copy()
            cand[:N - 2] &= ((seen[:N - 2] & seen[1:N - 1] & seen[2:])
                             | (later[:N - 2] & later[1:N - 1] & later[2:]))
            ncand = _cumdiff(cand, wo)
            cp = np.flatnonzero(cand)
            if cp.size:
                bits = max(1, (n_loc - 1).bit_length())
                if 3 * bits <= 63:
                    key = (L[cp] << (2 * bits)) | (L[cp + 1] << bits) | L[cp + 2]
                    keys = key.tolist()
                else:
                    keys = list(zip(L[cp].tolist(), L[cp + 1].tolist(), L[cp + 2].tolist()))
                kb = np.zeros(T + 1, np.int64)
                np.cumsum(ncand, out=kb[1:])
                kbl = kb.tolist()
                dist = [len(set(keys[kbl[t]:kbl[t + 1]])) if kbl[t + 1] > kbl[t] else 0 for t in range(T)]
                nrep = ncand - np.asarray(dist, np.int64)
        # 1 - distinct / (n - 2), distinct = (n - 2) - repeats
        d3 = ratio((n - 2 - nrep).astype(np.float64), (n - 2).astype(np.float64), ok3)
        res["rep3"] = np.where(ok3, 1.0 - d3, NAN)
    return res


def text_metrics(texts: list[str], names: list[str] | str | None = None) -> dict[str, np.ndarray]:
    """Score every text; returns {name: float64 array of len(texts)} for the
    resolved names (default all), computing only what those names need.
    (Batched engine; equal bit for bit to tests/metrics_reference.py, the definitions
    applied one text at a time.)"""
    names = resolve_metrics(names)
    want = set(names)
    texts = list(texts)
    T = len(texts)
    out = {k: np.empty(T, np.float64) for k in names}
    if "n_chars" in want:
        out["n_chars"][:] = np.fromiter(map(len, texts), np.float64, T)
    rest = want - {"n_chars"}
    if not rest or T == 0:
        return out
    tab = _tables()
    i = 0
    while i < T:
        j, size = i, 0
        while j < T and (size < _CHUNK_CHARS or j == i):
            size += len(texts[j])
            j += 1
        r = _chunk_metrics(texts[i:j], rest, tab)
        for k in rest:
            out[k][i:j] = r[k]
        i = j
    return out


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
