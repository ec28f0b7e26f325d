"""
The fast batched engine behind the text metrics: text_metrics(texts, names) computes the
metrics that metrics.py defines, for millions of windows (batch metrics at pretokenize
time) or a few generations (eval), with the same values bit for bit as the per-text
definitions (metrics.text_metrics_plain; tested). Read metrics.py for what each metric
means; read this file for how it is made fast.

$ python -c "from prebias.metrics_engine import text_metrics; print(text_metrics(['Tom ran. He was happy!'], 'n_words,sentiment'))"
"""

from __future__ import annotations

import re
from itertools import chain
from types import SimpleNamespace

import numpy as np

import metrics as _defs
from metrics import (MTLD_THRESHOLD, NORM, count_syllables, mtld_factors, resolve_metrics, vader_compound_of,
                     vader_state, vader_valence)
from prebias.common import Registry

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
# are bit-for-bit those of metrics.text_metrics_plain (same float operations in the same
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
        male, female = _defs.gender_sets()
        flat, offs, lens = [], [], []
        base = self.items.n
        for tok in toks[k:]:
            low = tok.lower()
            if low.isascii():
                its = _ITEM_A.findall(low)
            else:
                its = _ITEM_U.findall(low.translate(NORM))
            offs.append(base + len(flat))
            lens.append(len(its))
            for w in its:
                j = wid.get(w)
                if j is None:
                    j = wid[w] = len(wid) - 2  # '!' and '?' share the end id
                    winfo += [count_syllables(w), w in male, w in female]
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
        V = vader_state()
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
    # the word tables hold gender flags: new lists, new tables (lists compared by value; the
    # identity of this tuple, new at every call, rebuilt the tables at every call)
    gender = _defs.gender_sets()
    if _TAB is None or len(_TAB.raw) > _TABLE_LIMIT or _TAB.gender != gender:
        _TAB = _Tables()
        _TAB.gender = gender
    return _TAB


_EMOJI_CP = None


def _has_emoji(text: str) -> bool:
    """Whether VADER would rewrite emoji in text (then its tokens differ from text.split())."""
    global _EMOJI_CP
    V = vader_state()
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


def _vader_batch(texts, rids, t0, tab) -> list[float]:
    """VADER compound of every text from the chunk's raw token ids (texts whose
    emoji VADER would rewrite are redone by the caller)."""
    V = vader_state()
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
                v = vader_valence([vlow[r] for r in rids[a:b].tolist()], caps[a:b].tolist(),
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
        out[t] = vader_compound_of(hv[a:b], hpl[a:b], first_but[t], texts[t])
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


# -----------------------------------------------------------------------------
# a chunk's shared work, in stages; each fast path names the stages it reads
#
#   tokens       rids (raw token ids of all texts, laid end to end), t0 (text t is
#                rids[t0[t]:t0[t+1]])
#   items        the word-level items of every text (0 quote, 1 end mark, >= 2 word),
#                their bounds b0, which are words (isw), words per text n / nf, has
#   sentences    sentences per text ns / nsf
#   words        the word ids W of all texts (N in all), text t is W[wo[t]:wo[t+1]]
#   totals       syllables, male and female words per text
#   occurrences  each word's previous / next occurrence inside its text, and its
#                local id L among the chunk's distinct words (n_loc)

STAGES = Registry("metric engine stage")  # name -> fn(chunk) -> namespace


class Chunk:
    """The texts of one chunk and their stages, each computed once when first asked for."""

    def __init__(self, texts: list[str], tab: _Tables):
        self.texts, self.T, self.tab, self._done = texts, len(texts), tab, {}

    def stage(self, name: str):
        if name not in self._done:
            self._done[name] = STAGES[name](self)
        return self._done[name]

    def view(self, needs: tuple) -> "_View":
        return _View(self, needs)


class _View:
    """What a fast path sees of a chunk: texts, T, tab and the stages it declared (reading
    another is an error, so every declaration is checked by the tests that run it)."""

    def __init__(self, chunk: Chunk, needs: tuple):
        self._chunk, self._needs = chunk, needs
        self.texts, self.T, self.tab = chunk.texts, chunk.T, chunk.tab

    def __getattr__(self, name):
        if name not in STAGES:
            raise AttributeError(name)
        if name not in self._needs:
            raise RuntimeError(f"a fast path read stage {name!r} it does not declare (needs={self._needs})")
        return self._chunk.stage(name)


def _ratio(num, den, ok) -> np.ndarray:
    r = np.full(len(ok), np.nan)
    np.divide(num, den, out=r, where=ok)
    return r


@STAGES.register("tokens")
def _tokens_stage(c: Chunk):
    """Every text split at whitespace once (all texts joined by a sentinel token, one
    str.split), each raw token interned to an id."""
    T, texts, get = c.T, c.texts, c.tab.raw.__getitem__
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
    return SimpleNamespace(rids=rids, t0=t0)


@STAGES.register("items")
def _items_stage(c: Chunk):
    tok, tab = c.stage("tokens"), c.tab
    tab.fill_words()
    il = tab.ilen.a[tok.rids]
    cs = np.zeros(il.size + 1, np.int64)
    np.cumsum(il, out=cs[1:])
    src = np.repeat(tab.ioff.a[tok.rids] - cs[:-1], il)
    src += np.arange(int(cs[-1]), dtype=np.int64)
    items = tab.items.a[src]
    b0 = cs[tok.t0]  # item bounds per text
    isw = items >= 2
    n = _cumdiff(isw, b0)
    return SimpleNamespace(items=items, b0=b0, isw=isw, n=n, nf=n.astype(np.float64), has=n > 0)


@STAGES.register("sentences")
def _sentences_stage(c: Chunk):
    it = c.stage("items")
    nq = it.items != 0
    it2 = it.items[nq]
    b2 = _cumdiff(nq, it.b0)
    bb = np.zeros(c.T + 1, np.int64)
    np.cumsum(b2, out=bb[1:])
    start = np.empty(it2.size, bool)
    if it2.size:
        start[0] = True
        np.equal(it2[:-1], 1, out=start[1:])
        start[bb[:-1][b2 > 0]] = True
        start &= it2 >= 2
    ns = _cumdiff(start, bb)
    return SimpleNamespace(ns=ns, nsf=ns.astype(np.float64))


@STAGES.register("words")
def _words_stage(c: Chunk):
    it = c.stage("items")
    W = it.items[it.isw]
    wo = np.zeros(c.T + 1, np.int64)
    np.cumsum(it.n, out=wo[1:])
    return SimpleNamespace(W=W, N=W.size, wo=wo)


@STAGES.register("totals")
def _totals_stage(c: Chunk):
    """Per-text totals of syllables, male and female words, packed in 21-bit fields (a
    text's totals stay below twice its number of characters)."""
    it, w, tab = c.stage("items"), c.stage("words"), c.tab
    nz = np.flatnonzero(it.n)
    tot = np.zeros((c.T, 3), np.int64)
    if nz.size:
        if max(map(len, c.texts)) < (1 << 20):
            r = np.add.reduceat(tab.wpack.a[w.W], w.wo[nz])
            tot[nz, 0], tot[nz, 1], tot[nz, 2] = r & _MASK21, (r >> 21) & _MASK21, r >> 42
        else:
            tot[nz] = np.add.reduceat(tab.winfo.a[:tab.winfo.n].reshape(-1, 3)[w.W], w.wo[nz], axis=0)
    tot = tot.astype(np.float64)
    return SimpleNamespace(syl=tot[:, 0], male=tot[:, 1], female=tot[:, 2])


@STAGES.register("occurrences")
def _occurrences_stage(c: Chunk):
    it, w, tab = c.stage("items"), c.stage("words"), c.tab
    W, N, wo = w.W, w.N, w.wo
    tid = np.repeat(np.arange(c.T), it.n)
    ws, we = wo[:-1][tid], wo[1:][tid]  # bounds of each word's text
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
    return SimpleNamespace(L=L, n_loc=n_loc, prev=prev, nxt=nxt, ws=ws, we=we, seen=prev >= ws)


# -----------------------------------------------------------------------------
# fast paths: one per metric, equal bit for bit to its definition in metrics.py

FAST = Registry("metric fast path")  # metric name -> fn(view) -> float64 array (T,)


def fast(name: str, needs: tuple = ()):
    """@fast("metric", needs=("items", ...)): the batched computation of one metric."""
    def deco(fn):
        fn.needs = tuple(needs)
        return FAST.register(name)(fn)
    return deco


@fast("n_chars")
def _n_chars(c):
    return np.fromiter(map(len, c.texts), np.float64, c.T)


@fast("sentiment", needs=("tokens",))
def _sentiment(c):
    sent = _vader_batch(c.texts, c.tokens.rids, c.tokens.t0, c.tab)
    for t, text in enumerate(c.texts):
        if _has_emoji(text):  # VADER rewrites emoji: then its tokens differ from text.split()
            sent[t] = _defs.vader_compound(text)
    return np.asarray(sent, np.float64)


@fast("n_words", needs=("items",))
def _n_words(c):
    return c.items.nf


@fast("dialogue_share", needs=("items",))
def _dialogue_share(c):
    """a word is quoted when an odd number of quotes precede it in its text"""
    it = c.items
    cq = np.zeros(it.items.size + 1, np.int64)
    np.cumsum(it.items == 0, out=cq[1:])
    par = cq[1:] - np.repeat(cq[it.b0[:-1]], np.diff(it.b0))
    quoted = it.isw & (par & 1).astype(bool)
    return _ratio(_cumdiff(quoted, it.b0).astype(np.float64), it.nf, it.has)


@fast("n_sentences", needs=("sentences",))
def _n_sentences(c):
    return c.sentences.nsf


@fast("mean_sentence_len", needs=("items", "sentences"))
def _mean_sentence_len(c):
    return _ratio(c.items.nf, c.sentences.nsf, c.sentences.ns > 0)


@fast("flesch_reading_ease", needs=("items", "sentences", "totals"))
def _flesch(c):
    it, se, tot = c.items, c.sentences, c.totals
    ok = it.has & (se.ns > 0)
    fre = 206.835 - 1.015 * _ratio(it.nf, se.nsf, ok) - 84.6 * _ratio(tot.syl, it.nf, ok)
    fre[~ok] = np.nan
    return fre


@fast("fk_grade", needs=("items", "sentences", "totals"))
def _fk_grade(c):
    it, se, tot = c.items, c.sentences, c.totals
    ok = it.has & (se.ns > 0)
    fk = 0.39 * _ratio(it.nf, se.nsf, ok) + 11.8 * _ratio(tot.syl, it.nf, ok) - 15.59
    fk[~ok] = np.nan
    return fk


@fast("gender_male", needs=("totals",))
def _gender_male(c):
    return c.totals.male


@fast("gender_female", needs=("totals",))
def _gender_female(c):
    return c.totals.female


@fast("gender_ratio", needs=("totals",))
def _gender_ratio(c):
    mf = c.totals.male + c.totals.female
    return _ratio(c.totals.male, mf, mf > 0)


@fast("ttr", needs=("items", "words", "occurrences"))
def _ttr(c):
    it = c.items
    return _ratio((it.n - _cumdiff(c.occurrences.seen, c.words.wo)).astype(np.float64), it.nf, it.has)


@fast("mtld", needs=("items", "words", "occurrences"))
def _mtld(c):
    """pass k < T: text k forwards; pass T + k: text k backwards, stored reversed at
    N + (reversed position)"""
    it, w, oc, T = c.items, c.words, c.occurrences, c.T
    N, wo = w.N, w.wo
    se1 = oc.ws + oc.we - 1
    prv2 = np.empty(2 * N, np.int64)
    prv2[:N] = oc.prev
    prv2[N + se1 - np.arange(N)] = np.where(oc.nxt < oc.we, N + se1 - oc.nxt, -1)
    ps = np.concatenate([wo[:-1], N + wo[:-1]])
    pe = np.concatenate([wo[1:], N + wo[1:]])
    ln = pe - ps
    fac = np.zeros(2 * T, np.float64)
    short = np.flatnonzero((ln > 0) & (ln <= _MTLD_LONG))
    if short.size:
        fac[short] = _mtld_passes(prv2, ps[short], pe[short])
    for k in np.flatnonzero(ln > _MTLD_LONG).tolist():
        t = k % T
        seq = w.W[wo[t]:wo[t + 1]].tolist()
        fac[k] = mtld_factors(seq if k < T else reversed(seq))
    nf, f, bk = it.nf, fac[:T], fac[T:]
    a1 = _ratio(nf, f, f > 0)
    a1[~(f > 0)] = nf[~(f > 0)]
    a2 = _ratio(nf, bk, bk > 0)
    a2[~(bk > 0)] = nf[~(bk > 0)]
    m = 0.5 * (a1 + a2)
    m[~it.has] = np.nan
    return m


@fast("rep3", needs=("items", "words", "occurrences"))
def _rep3(c):
    """A trigram can equal an earlier one only if all its words occur earlier, and a
    later one only if all occur later: every other trigram is unique."""
    n, N, wo, oc, T = c.items.n, c.words.N, c.words.wo, c.occurrences, c.T
    nrep = np.zeros(T, np.int64)
    ok3 = n > 2
    if N >= 3:
        seen, later = oc.seen, oc.nxt < oc.we
        cand = np.zeros(N, bool)
        cand[:N - 2] = (np.arange(N - 2) <= oc.we[:N - 2] - 3)
        cand[:N - 2] &= ((seen[:N - 2] & seen[1:N - 1] & seen[2:]) | (later[:N - 2] & later[1:N - 1] & later[2:]))
        ncand = _cumdiff(cand, wo)
        cp = np.flatnonzero(cand)
        if cp.size:
            nrep = ncand - _distinct_trigrams(oc.L, oc.n_loc, cp, ncand, T)
    # 1 - distinct / (n - 2), distinct = (n - 2) - repeats
    d3 = _ratio((n - 2 - nrep).astype(np.float64), (n - 2).astype(np.float64), ok3)
    return np.where(ok3, 1.0 - d3, np.nan)


def _distinct_trigrams(L, n_loc, cp, ncand, T) -> np.ndarray:
    """Distinct trigrams among each text's candidate positions cp."""
    bits = max(1, (n_loc - 1).bit_length())
    if 3 * bits <= 63:
        keys = ((L[cp] << (2 * bits)) | (L[cp + 1] << bits) | L[cp + 2]).tolist()
    else:
        keys = list(zip(L[cp].tolist(), L[cp + 1].tolist(), L[cp + 2].tolist()))
    kb = np.zeros(T + 1, np.int64)
    np.cumsum(ncand, out=kb[1:])
    kbl = kb.tolist()
    return np.asarray([len(set(keys[kbl[t]:kbl[t + 1]])) if kbl[t + 1] > kbl[t] else 0 for t in range(T)], np.int64)


def chunk_metrics(texts: list[str], names: list[str], tab: _Tables) -> dict[str, np.ndarray]:
    """The named metrics of one chunk: each by its fast path where it has one, else by its
    definition, text by text."""
    c = Chunk(texts, tab)
    out = {n: FAST[n](c.view(FAST[n].needs)) for n in names if n in FAST}
    plain = [n for n in names if n not in FAST]
    if plain:
        out.update(_defs.text_metrics_plain(texts, plain))
    return out


def text_metrics(texts: list[str], names: list[str] | str | None = None) -> dict[str, np.ndarray]:
    """Score every text; returns {name: float64 array of len(texts)} for the resolved
    names (default all), computing only the stages those names need. Equal bit for bit to
    metrics.text_metrics_plain, the definitions applied one text at a time."""
    names = resolve_metrics(names)
    texts = list(texts)
    T = len(texts)
    out = {k: np.empty(T, np.float64) for k in names}
    if T == 0:
        return out
    tab = _tables()
    i = 0
    while i < T:
        j, size = i, 0
        while j < T and (size < _CHUNK_CHARS or j == i):
            size += len(texts[j])
            j += 1
        for k, v in chunk_metrics(texts[i:j], names, tab).items():
            out[k][i:j] = v
        i = j
    return out
