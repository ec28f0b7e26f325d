"""
The fast batched engine behind the text metrics: text_metrics(texts, names) computes the
metrics that metrics.py defines, for millions of windows (batch metrics at pretokenize
time) or a few generations (eval), with the same values bit for bit as the per-text
definitions (tests/metrics_reference.py checks it). Read metrics.py for what each metric
means; read this file for how it is made fast.

$ python -c "from prebias.metrics_engine import text_metrics; print(text_metrics(['Tom ran. He was happy!'], 'n_words,sentiment'))"
"""

from __future__ import annotations

import re
from itertools import chain

import numpy as np

import metrics as _defs  # module globals that change (gender lists, VADER state) are read through it
from metrics import (_NORM, MTLD_THRESHOLD, _mtld_factors, _vader_compound_of, _vader_state, _vader_valence,
                     count_syllables, resolve_metrics)

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
                    winfo += [count_syllables(w), w in _defs._MALE, w in _defs._FEMALE]
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
        V = _defs._V or _vader_state()
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
    gender = (_defs._MALE, _defs._FEMALE)
    if _TAB is None or len(_TAB.raw) > _TABLE_LIMIT or _TAB.gender != gender:
        _TAB = _Tables()
        _TAB.gender = gender
    return _TAB


_EMOJI_CP = None


def _has_emoji(text: str) -> bool:
    """Whether VADER would rewrite emoji in text (then its tokens differ from text.split())."""
    global _EMOJI_CP
    V = _defs._V or _vader_state()
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
    V = _defs._V or _vader_state()
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
                sent[t] = _defs.vader_compound(text)
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
