"""
The reference scorer: the one model-based yardstick for the text going in (batch
metrics) and coming out (eval). By default a token n-gram language model with
interpolated Witten-Bell smoothing, fitted on the holdout (training stories that runs
reading the reference never train on: data/tok{V}/holdout.json; the validation shard
where the data has none) and saved as data/tok{V}/ref_ngram3.npz; or any trained model (model.bin or a ckpt_*.pt)
given as --ref_model. Both give nll_many(seqs): each sequence's mean next-token loss
in nats.

$ python -c "from prebias.refscorer import NGramScorer; import numpy as np; s = NGramScorer(3, 10).fit([np.arange(10)]); print(s.nll(np.arange(10)))"
"""

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from prebias.llama2c import load_v0
from prebias.checkpoint import load_checkpoint, model_from_checkpoint
from prebias.common import UserError, atomic_path, write_json_atomic
from prebias.data import BOS_ID, holdout_stories, holdout_tokens, sha256_file, tok_dir

NGRAM_ORDER = 3


# -----------------------------------------------------------------------------
# reference scorer: interpolated Witten-Bell n-gram LM over token ids

SCORER_FORMAT_VERSION = 1
DENSE_MAX = 1 << 24  # entries (64 MB of int32) of a level's direct-lookup table
PROB_MAX = 1 << 23   # entries (64 MB of float64) of a level's table of probabilities


def _searchsorted(tab: np.ndarray, q: np.ndarray) -> np.ndarray:
    """np.searchsorted(tab, q); large query sets into a table too big for the CPU
    cache are sorted first, which turns random memory access into a sweep (~5x faster
    for 1M queries into 5M keys). A cache-sized table is faster without the sort."""
    if q.size < 50_000 or tab.size < (1 << 20):
        return np.searchsorted(tab, q)
    o = np.argsort(q)
    j = np.empty(q.size, np.int64)
    j[o] = np.searchsorted(tab, q[o])
    return j


class NGramScorer:
    """Token n-gram language model with interpolated Witten-Bell smoothing down to
    a uniform distribution over vocab_size:

        P_0(w)     = 1 / V
        P_m(w | h) = (c(h w) + T(h) * P_{m-1}(w | h')) / (c(h) + T(h))   if c(h) > 0
                   = P_{m-1}(w | h')                                      otherwise

    where h is the (m-1)-token history, h' its last m-2 tokens, c(h w) the count of
    the m-gram, c(h) = sum_w c(h w) and T(h) the number of distinct w after h (for
    m = 1 the history is empty: c = number of tokens, T = number of distinct tokens).
    Each P_m sums to 1 over the vocabulary, and every token has P > 0 (finite nll).
    A position whose history inside its sequence is shorter than order-1 uses the
    longest available history (so the first token of a sequence gets P_1).
    N-grams are counted inside each fitted sequence only.

    Storage: unigram counts are dense (length V); m-grams (m >= 2) are sorted int64
    keys (base-V digits) with counts.  The history statistics c(h), T(h) of level m
    are stored aligned with the (m-1)-gram table, so scoring needs one
    np.searchsorted per level >= 2 and no Python loop over tokens.
    """

    def __init__(self, order: int = 3, vocab_size: int = 32000):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if vocab_size < 2 or order * math.log2(vocab_size) >= 62:
            raise ValueError(f"vocab_size={vocab_size} with order={order} does not fit int64 keys")
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self.fitted = False
        # level m (1-based) at index m-1: keys (None for m = 1: dense), counts,
        # and for m < order the stats of the m-gram as a history: hc = c(h), ht = T(h)
        self.keys: list = []
        self.counts: list = []
        self.hc: list = []
        self.ht: list = []
        self._dense_tabs: dict = {}  # level -> direct-lookup table (see _dense)
        self._prob_tabs: list | None = None  # level -> P_m of every (history row, token) (see _probs)

    # --- helpers
    def _check(self, seq) -> np.ndarray:
        a = np.asarray(seq)
        if a.ndim != 1:
            raise ValueError(f"token sequence must be 1-D, got shape {a.shape}")
        a = a.astype(np.int64, copy=False)
        if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{a.min()}, {a.max()}]")
        return a

    @staticmethod
    def _pos(a: np.ndarray, starts: np.ndarray) -> np.ndarray:
        return np.arange(a.size, dtype=np.int64) - np.repeat(starts, np.diff(np.append(starts, a.size)))

    def _keys(self, a: np.ndarray, starts: np.ndarray):
        """keys[m-1][i] = key of the m-gram ending at i (valid where pos[i] >= m-1);
        pos[i] = offset of i inside its sequence."""
        V = self.vocab_size
        pos = self._pos(a, starts)
        keys = [a]
        for _ in range(2, self.order + 1):
            k = np.empty_like(a)
            if a.size:
                k[0] = 0
                k[1:] = keys[-1][:-1] * V + a[1:]
            keys.append(k)
        return keys, pos

    def _concat(self, seqs):
        if isinstance(seqs, np.ndarray) and seqs.ndim == 2:  # equal-length windows: no per-row work
            n, L = seqs.shape
            a = self._check(seqs.reshape(-1))
            return a, np.full(n, L, np.int64), np.arange(n, dtype=np.int64) * L
        arrs = [np.asarray(s) for s in seqs]
        for s in arrs:
            if s.ndim != 1:
                raise ValueError(f"token sequence must be 1-D, got shape {s.shape}")
        lens = np.array([len(s) for s in arrs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if arrs else np.zeros(0, np.int64)
        a = self._check(np.concatenate(arrs)) if arrs else np.zeros(0, np.int64)  # one range check for all
        return a, lens, starts

    # --- fit
    def fit(self, sequences: Iterable[np.ndarray]) -> "NGramScorer":
        """Count n-grams of the given token sequences (e.g. the validation shard
        split at BOS, or the whole shard as one array)."""
        if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
            sequences = [sequences]
        a, lens, starts = self._concat(list(sequences))
        if a.size == 0:
            raise ValueError("NGramScorer.fit: no tokens")
        V = self.vocab_size
        keys, pos = self._keys(a, starts)
        self.keys = [None]
        self.counts = [np.bincount(a, minlength=V).astype(np.int64)]
        for m in range(2, self.order + 1):
            k = np.sort(keys[m - 1][pos >= m - 1])
            if k.size:
                first = np.concatenate([[0], np.flatnonzero(k[1:] != k[:-1]) + 1])
                self.keys.append(k[first])
                self.counts.append(np.diff(np.append(first, k.size)).astype(np.int64))
            else:
                self.keys.append(np.zeros(0, np.int64))
                self.counts.append(np.zeros(0, np.int64))
        self.hc, self.ht = [], []
        for m in range(2, self.order + 1):  # history stats of level m-1 from level m
            uk, cnt = self.keys[m - 1], self.counts[m - 1]
            n_prev = V if m == 2 else self.keys[m - 2].size
            hc = np.zeros(n_prev, np.int64)
            ht = np.zeros(n_prev, np.int64)
            if uk.size:
                hk = uk // V
                first = np.concatenate([[0], np.flatnonzero(hk[1:] != hk[:-1]) + 1])
                idx = hk[first] if m == 2 else np.searchsorted(self.keys[m - 2], hk[first])
                hc[idx] = np.add.reduceat(cnt, first)
                ht[idx] = np.diff(np.append(first, hk.size))
            self.hc.append(hc)
            self.ht.append(ht)
        self._dense_tabs, self._prob_tabs = {}, None
        self.fitted = True
        return self

    # --- score
    def _need_fit(self):
        if not self.fitted:
            raise ValueError("NGramScorer is not fitted: call fit() or load()")

    def _token_logp(self, a: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """log P(a[i] | history inside its sequence) for every i."""
        V = self.vocab_size
        probs = self._probs()
        if probs is not None:
            return np.log(self._token_p_tables(a, self._pos(a, starts), probs))
        all_dense = all(self._dense(m) is not None for m in range(2, self.order + 1))
        keys, pos = (None, self._pos(a, starts)) if all_dense else self._keys(a, starts)  # keys: for binary search
        c1 = self.counts[0]
        n1, t1 = float(c1.sum()), float(np.count_nonzero(c1))
        p = (c1[a] + t1 / V) / (n1 + t1)
        idx, hit = a, np.ones(a.size, bool)  # where each position's m-gram sits in level m
        for m in range(2, self.order + 1):
            # history of position i = the (m-1)-gram ending at i-1
            hc_arr, ht_arr = self.hc[m - 2], self.ht[m - 2]
            sel = np.flatnonzero((pos[1:] >= m - 1) & hit[:-1]) + 1
            ch = hc_arr[idx[sel - 1]]
            keep = ch > 0
            sel, ch = sel[keep], ch[keep]
            hrow = idx[sel - 1]
            th = ht_arr[hrow]
            dense = self._dense(m)
            if dense is not None:  # direct lookup by (history's row, token)
                j = dense[hrow * V + a[sel]].astype(np.int64)
                h = j >= 0
            else:
                q = keys[m - 1][sel]
                tab = self.keys[m - 1]
                j = _searchsorted(tab, q)
                j[j >= tab.size] = max(tab.size - 1, 0)
                h = tab[j] == q if tab.size else np.zeros(q.size, bool)
            chw = np.where(h, self.counts[m - 1][j], 0)
            p[sel] = (chw + th * p[sel]) / (ch + th)
            if m < self.order:
                idx = np.zeros(a.size, np.int64)
                hit = np.zeros(a.size, bool)
                idx[sel] = j
                hit[sel] = h
        return np.log(p)

    def _token_p_tables(self, a: np.ndarray, pos: np.ndarray, probs: list) -> np.ndarray:
        """P(a[i] | history) read from the tables of _probs: one gather per level, where
        _token_logp's general path computes each level's interpolation for every position.
        The same numbers (the tables hold the same formula of the same counts); tests
        check it equal to the general path bit for bit."""
        V = self.vocab_size
        p = probs[0][a]
        if a.size == 0:
            return p
        row, ok = a, np.ones(a.size, bool)  # row of the (m-1)-gram ending at i, where it exists
        for m in range(2, self.order + 1):
            hrow = np.empty(a.size, np.int64)  # history of position i: the row ending at i-1
            hrow[0] = 0
            hrow[1:] = row[:-1]
            has = np.zeros(a.size, bool)
            has[1:] = ok[:-1]
            has &= pos >= m - 1
            flat = hrow * V + a
            flat[~has] = 0
            p = np.where(has, probs[m - 1][flat], p)
            if m < self.order:
                row = self._dense(m)[flat].astype(np.int64)
                ok = has & (row >= 0)
        return p

    def _probs(self):
        """For every level m, P_m(w | h) of every history row h (level m-1) and token w,
        flat (row * V + w), when every level has a direct-lookup table (_dense) and each
        table fits PROB_MAX entries; else None. Each entry is the formula of _token_logp
        with the same operands in the same order: P_m = (c(h w) + T(h) * P_{m-1}) /
        (c(h) + T(h)), and P_{m-1} where c(h) = 0. Built on first use, never saved."""
        if self._prob_tabs is None:
            self._prob_tabs = []
            V = self.vocab_size
            n_hist = [1, V] + [self.keys[m - 2].size for m in range(3, self.order + 1)]
            if any(self._dense(m) is None for m in range(2, self.order + 1)) or max(n_hist) * V > PROB_MAX:
                return None
            c1 = self.counts[0]
            n1, t1 = float(c1.sum()), float(np.count_nonzero(c1))
            tabs = [(c1 + t1 / V) / (n1 + t1)]
            for m in range(2, self.order + 1):
                # the shorter history (h') of each row: its row in level m-2 (m = 2: one, all rows)
                suffix = np.zeros(V, np.int64) if m == 2 else \
                    (self.keys[m - 2] % V if m == 3 else np.searchsorted(self.keys[m - 3], self.keys[m - 2] % V ** (m - 2)))
                prev = tabs[-1].reshape(-1, V)[suffix]        # P_{m-1}(w | h'), (rows, V)
                j = self._dense(m).reshape(-1, V).astype(np.int64)
                chw = np.where(j >= 0, self.counts[m - 1][j], 0)
                ch, th = self.hc[m - 2][:, None], self.ht[m - 2][:, None]
                p = np.where(ch > 0, (chw + th * prev) / np.where(ch > 0, ch + th, 1), prev)
                tabs.append(p.reshape(-1))
            self._prob_tabs = tabs
        return self._prob_tabs or None

    def _dense(self, m: int):
        """For level m >= 2, a table row(history in level m-1) * V + token -> row in level m
        (-1: unseen m-gram), when it fits DENSE_MAX entries; else None (binary search).
        A random read instead of ~log2(n) of them: scoring a 60k-story sample's batches
        is ~2x faster. Built on first use, never saved (the counts alone define the model)."""
        cache = self._dense_tabs
        if m not in cache:
            V, uk = self.vocab_size, self.keys[m - 1]
            n_hist = V if m == 2 else self.keys[m - 2].size
            tab = None
            if n_hist * V <= DENSE_MAX:
                hk = uk // V
                row = hk if m == 2 else np.searchsorted(self.keys[m - 2], hk)
                tab = np.full(n_hist * V, -1, np.int32)
                tab[row * V + uk % V] = np.arange(uk.size, dtype=np.int32)
            cache[m] = tab
        return cache[m]

    def prob_dist(self, context) -> np.ndarray:
        """P(w | context) for every w of the vocabulary (for tests/inspection)."""
        self._need_fit()
        ctx = self._check(context)
        ctx = ctx[ctx.size - (self.order - 1):] if self.order > 1 and ctx.size > self.order - 1 else ctx
        if self.order == 1:
            ctx = ctx[:0]
        V = self.vocab_size
        seqs = np.concatenate([np.tile(ctx, (V, 1)), np.arange(V, dtype=np.int64)[:, None]], axis=1)
        L = seqs.shape[1]
        lp = self._token_logp(seqs.reshape(-1), np.arange(V, dtype=np.int64) * L)
        return np.exp(lp[np.arange(V) * L + L - 1])

    def token_nll(self, seq: np.ndarray) -> np.ndarray:
        """nll (nats) of seq[1:], each given its prefix; length len(seq) - 1."""
        self._need_fit()
        a = self._check(seq)
        if a.size < 2:
            return np.zeros(0, np.float64)
        return -self._token_logp(a, np.zeros(1, np.int64))[1:]

    def nll(self, seq) -> float:
        """Mean token nll of seq[1:] (NaN for fewer than 2 tokens); perplexity = exp(nll)."""
        t = self.token_nll(seq)
        return float(t.mean()) if t.size else math.nan

    def nll_many(self, seqs: list[np.ndarray]) -> np.ndarray:
        """[nll(s) for s in seqs] in one vectorised pass (NaN for sequences < 2 tokens);
        seqs may be a 2-D array (one sequence per row)."""
        self._need_fit()
        if len(seqs) == 0:
            return np.zeros(0, np.float64)
        a, lens, starts = self._concat(seqs)
        lp = self._token_logp(a, starts)
        valid = np.ones(a.size, bool)
        valid[starts[lens > 0]] = False
        seq_id = np.repeat(np.arange(len(seqs)), lens)
        tot = np.bincount(seq_id[valid], weights=-lp[valid], minlength=len(seqs))
        cnt = np.maximum(lens - 1, 0)
        out = np.full(len(seqs), np.nan)
        nz = cnt > 0
        out[nz] = tot[nz] / cnt[nz]
        return out

    def perplexity(self, seq) -> float:
        """exp(nll(seq))."""
        return float(math.exp(self.nll(seq)))

    # --- persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        d = {}
        for m in range(1, self.order + 1):
            if m >= 2:
                d[f"keys_{m}"] = self.keys[m - 1]
            d[f"counts_{m}"] = self.counts[m - 1]
            if m < self.order:
                d[f"hc_{m}"] = self.hc[m - 1]
                d[f"ht_{m}"] = self.ht[m - 1]
        return d

    def fingerprint(self) -> str:
        """sha1 over format version, order, vocab_size and all count arrays."""
        self._need_fit()
        h = hashlib.sha1(f"{SCORER_FORMAT_VERSION}/{self.order}/{self.vocab_size}".encode())
        for k, v in sorted(self._arrays().items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v, dtype=np.int64).tobytes())
        return h.hexdigest()

    def save(self, path) -> None:
        """Write an .npz (no pickles) with format version, order, vocab_size, fingerprint."""
        self._need_fit()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, format_version=np.int64(SCORER_FORMAT_VERSION), order=np.int64(self.order),
                     vocab_size=np.int64(self.vocab_size), fingerprint=np.array(self.fingerprint()),
                     **self._arrays())

    @classmethod
    def load(cls, path) -> "NGramScorer":
        """Read a file written by save(); anything else -> ValueError (one line)."""
        def bad(why):
            return ValueError(f"{path}: {why}; re-run `python tinystories.py pretokenize`")
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise bad("scorer file not found") from None
        except Exception as e:  # noqa: BLE001
            raise bad(f"not a readable scorer file ({type(e).__name__})") from None
        try:
            ver = int(d["format_version"])
        except Exception:  # noqa: BLE001
            raise bad("not a scorer file (no format_version)") from None
        if ver != SCORER_FORMAT_VERSION:
            raise bad(f"scorer format version {ver}, expected {SCORER_FORMAT_VERSION}")
        try:
            s = cls(int(d["order"]), int(d["vocab_size"]))
            s.keys = [None] + [d[f"keys_{m}"].astype(np.int64) for m in range(2, s.order + 1)]
            s.counts = [d[f"counts_{m}"].astype(np.int64) for m in range(1, s.order + 1)]
            s.hc = [d[f"hc_{m}"].astype(np.int64) for m in range(1, s.order)]
            s.ht = [d[f"ht_{m}"].astype(np.int64) for m in range(1, s.order)]
            fp = str(d["fingerprint"])
        except Exception as e:  # noqa: BLE001
            raise bad(f"incomplete scorer file ({type(e).__name__}: {e})") from None
        s.fitted = True
        if s.fingerprint() != fp:
            raise bad("scorer fingerprint mismatch (corrupt file)")
        return s


def scorer_perplexity(scorer: NGramScorer, seqs: list[np.ndarray]) -> np.ndarray:
    """exp(nll) per sequence under the reference scorer."""
    return np.exp(scorer.nll_many(seqs))


# -----------------------------------------------------------------------------
# the scorer of a data set

def scorer_path(data_dir, vocab_size) -> Path:
    return tok_dir(data_dir, vocab_size) / f"ref_ngram{NGRAM_ORDER}.npz"


class ModelScorer:
    """A trained model (model.bin or ckpt_*.pt) as the reference scorer: nll_many
    gives each sequence's mean next-token loss, like NGramScorer's."""

    def __init__(self, path, device="cpu"):
        p = Path(path)
        if not p.is_file():  # a folder would fail deep in the reader, naming no fix
            raise UserError(f"--ref_model={p} is {'a folder' if p.is_dir() else 'not a file'}: give a model file, a "
                            "ckpt_<iter>.pt of train.py or a llama2.c model.bin, trained on this data's tokenizer")
        ck = load_checkpoint(p) if p.suffix == ".pt" else None
        self.model = (model_from_checkpoint(ck) if ck else load_v0(p)).to(device)
        self.device, self.path = device, p
        # a checkpoint records its tokenizer's sha256; a llama2.c model.bin records none
        self.tokenizer_sha = str(((ck or {}).get("data") or {}).get("tokenizer_sha256", ""))

    def fingerprint(self) -> str:
        return "model:" + sha256_file(self.path)[:16]

    def check(self, vocab_size: int, max_seq_len: int, tokenizer_sha: str = ""):
        """One line unless the model reads this data whole: the same vocabulary (another's
        ids mean other text: its size, and for a checkpoint its tokenizer's sha256 against
        the data's) and a context as long as a window (it would score only the first part
        of each). A model.bin names no tokenizer: a note says so."""
        if tokenizer_sha and self.tokenizer_sha and self.tokenizer_sha != tokenizer_sha:
            raise UserError(f"--ref_model={self.path} was trained with another tokenizer (sha256 "
                            f"{self.tokenizer_sha[:12]}, the data's {tokenizer_sha[:12]}): its ids mean other text; train "
                            "the reference model on this data")
        if not self.tokenizer_sha:
            print(f"note: --ref_model={self.path} is a model.bin, which records no tokenizer: make sure it was trained "
                  "on this data's tokenizer (its ckpt_<n>.pt would be checked)")
        a = self.model.params
        if a.vocab_size != vocab_size:
            raise UserError(f"--ref_model={self.path} has vocab_size {a.vocab_size}, the data {vocab_size}: train the "
                            "reference model on this data's tokenizer")
        if a.max_seq_len < max_seq_len:
            raise UserError(f"--ref_model={self.path} has a context of {a.max_seq_len} tokens, shorter than the "
                            f"{max_seq_len}-token windows it would score: use a model trained with "
                            f"--max_seq_len={max_seq_len} or more")

    def nll_many(self, seqs, batch=32) -> np.ndarray:
        import torch
        out = np.full(len(seqs), np.nan)
        with torch.no_grad():
            for i in range(0, len(seqs), batch):
                for j, s in enumerate(seqs[i:i + batch]):  # lengths differ: one at a time per row
                    s = np.asarray(s, dtype=np.int64)[: self.model.params.max_seq_len + 1]
                    if len(s) < 2:
                        continue
                    x = torch.from_numpy(s[None, :-1]).to(self.device)
                    y = torch.from_numpy(s[None, 1:]).to(self.device)
                    out[i + j] = float(self.model(x, y)[1])
        return out


def reference_scorer(data_dir, vocab_size, ref_model: str = ""):
    """The scorer of this data: ref_model when given, else the 3-gram model of the holdout
    (or of the validation shard where the data has no holdout), fitted here on first use
    when pretokenize ran with --metrics=none."""
    if ref_model:
        return ModelScorer(ref_model)
    p = scorer_path(data_dir, vocab_size)
    can_fit = bool(holdout_stories(data_dir, vocab_size)) or (tok_dir(data_dir, vocab_size) / "data00.bin").exists()
    if not p.exists() and can_fit:
        print(f"fitting the reference scorer of {tok_dir(data_dir, vocab_size)} (pretokenize skipped it)")
        return fit_reference_scorer(data_dir, vocab_size)
    try:
        return NGramScorer.load(p)
    except ValueError as e:
        if not can_fit:
            raise UserError(str(e)) from None
        print(f"{str(e).split(';')[0]}: fitting it again")  # the same data, the same deterministic fit
        p.with_suffix(".json").unlink(missing_ok=True)
        return fit_reference_scorer(data_dir, vocab_size)


def reference_source(data_dir, vocab_size, val_key: str = "") -> tuple[list[np.ndarray], str, dict]:
    """(sequences, cache key, record) of what the 3-gram scorer is fitted on: the held-out
    stories (data/tok{V}/holdout.json: training stories no reference-reading run trains
    on, noisy where the training shards are), or the validation shard where the data has
    no holdout (pretokenize --holdout=0, or tokens made before the holdout existed). The
    key is the content's sha256, so a scorer fitted on another set is refitted."""
    held = holdout_stories(data_dir, vocab_size)
    if held.get("stories"):
        seqs = holdout_tokens(data_dir, vocab_size)
        h = hashlib.sha256(held["sha256"].encode())
        for q in seqs:
            h.update(np.ascontiguousarray(q, dtype=np.uint16).tobytes())
        return seqs, "holdout:" + h.hexdigest(), {"on": "holdout", "stories_sha256": held["sha256"],
                                                  "n_stories": len(seqs), "n_tokens": int(sum(map(len, seqs)))}
    val_bin = tok_dir(data_dir, vocab_size) / "data00.bin"
    tokens = np.fromfile(val_bin, dtype=np.uint16).astype(np.int64)
    seqs = np.split(tokens, np.flatnonzero(tokens == BOS_ID)[1:])
    return seqs, val_key or "bin:" + sha256_file(val_bin), {"on": "validation shard", "n_stories": len(seqs),
                                                             "n_tokens": len(tokens)}


def _stamp(path: Path) -> dict:
    """The scorer's stamp (what it was fitted on), {} when absent or damaged: a damaged
    stamp only means the scorer is fitted again."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def scorer_fit(data_dir, vocab_size) -> dict:
    """What the saved 3-gram scorer was fitted on (reference_source's record, with the
    fit's seconds); {} for a scorer saved before this was recorded."""
    fit = _stamp(scorer_path(data_dir, vocab_size).with_suffix(".json")).get("fit", {})
    return fit if isinstance(fit, dict) else {}


def fit_reference_scorer(data_dir, vocab_size, val_key: str = "") -> NGramScorer:
    """Fit the 3-gram scorer on reference_source, or reuse the saved one if its key is unchanged."""
    p = scorer_path(data_dir, vocab_size)
    stamp = p.with_suffix(".json")
    seqs, key, rec = reference_source(data_dir, vocab_size, val_key)
    if p.exists() and _stamp(stamp).get("key") == key:
        try:
            return NGramScorer.load(p)
        except ValueError as e:  # a damaged file of ours: the data to fit it again is here
            print(f"{str(e).split(';')[0]}: fitting it again")
    t0 = time.perf_counter()
    scorer = NGramScorer(NGRAM_ORDER, vocab_size).fit([np.asarray(q, np.int64) for q in seqs])
    scorer.save(p)
    write_json_atomic(stamp, {"key": key, "fit": {**rec, "seconds": round(time.perf_counter() - t0, 3)}})
    return scorer
