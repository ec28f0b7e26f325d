"""
How long does the model keep what a tag taught it? For every checkpoint of a run trained
with --tags, measure each tag from the recorded insertions, then fit a forgetting curve.

$ python durability.py --out_dir=out/canary
$ python durability.py --out_dir=out/canary --R=1000 --n_prompts=32
$ python durability.py --out_dir=out/happy --max_new_tokens=64
$ python durability.py --out_dir=out/canary --exact_budget=65536   # exact exposure above log2 R too

A canary is measured against never-seen secrets of its format at the same checkpoint (the
gap, and exposure_all, its rank among every secret), because every secret's loss moves with
training: compared with its own step-0 value a secret looks forgotten when it is not. A
conditional tag is measured against its control (tag - control), so "the tag did something"
is told apart from "new tokens after the BOS did something". Writes
<out_dir>/tables/durability.csv (per checkpoint and tag), durability_fit.csv (half-lives,
prebias/forgetting.py) and visualize/durability.png; checkpoints already measured with the
same settings are skipped. Every column is defined in docs/batch-play.md.
"""

import hashlib
import math
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import metrics
from model import KVCache
from prebias import forgetting, metrics_engine
from prebias import tags as tagmod
from prebias.checkpoint import load_checkpoint, model_from_checkpoint, run_checkpoints, run_config, stream_records
from prebias.common import (DoneRecord, UserError, auto_device, file_signature, main_guard, parse_config, save_figure,
                            step_axis, write_csv_atomic)
from prebias.configs import DurabilityConfig, check_durability
from prebias.data import BOS_ID, BatchData, load_stories, raw_shards
from prebias.stats import mean_interval
from prebias.stream import INSERT, REPLACE, trained_windows
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config: DurabilityConfig (prebias/configs.py) holds every key with its default and why
# -----------------------------------------------------------------------------

VERSION = 3  # 2: gap to never-seen candidates, trained contexts, extrapolated exposure, tag - control; 3: exposure_all
COLUMNS = ["iter", "tag", "kind", "steps_since_seen", "loss", "cand_loss", "gap", "loss_ctx", "gap_ctx", "n_ctx",
           "exposure", "exposure_all", "exposure_all_lo", "exposure_all_hi", "exposure_all_by", "exposure_extrap",
           "exposure_exact", "extraction", "effect", "effect_lo", "effect_hi",
           "effect_band_lo", "effect_band_hi", "effect_se", "effect_df", "n", "effect_vs_none", "effect_vs_none_lo",
           "effect_vs_none_hi"]
FITS = {"canary": (("gap", 0.0), ("gap_ctx", 0.0), ("exposure_all", forgetting.UNSEEN_EXPOSURE)),
        "conditional": (("effect", 0.0),)}  # measure, the value that means "forgotten"
exposure = forgetting.rank_exposure  # the published definition, one home (prebias/forgetting.py)
MIN_HITS = 10  # exposure_all: with fewer draws below the secret the sampled count is too rough (README: up to 4.6
#                bits off on the real stories where none fell below) and the exact count is tried instead
FALLBACK_BUDGET = 65536  # prefixes per depth for that exact count (1-10 s where it runs; it finishes where few
#                          secrets lie below the secret, which is when too few draws do)


# -----------------------------------------------------------------------------
# canaries: scoring continuations of one context, its keys and values computed once

@torch.no_grad()
def prefill(model, context: np.ndarray, max_len: int, device: str):
    """(cache holding the context's keys/values, log-probs (V,) of the token after it)."""
    cache = KVCache(model.params, 1, max_len, device, model.tok_embeddings.weight.dtype)
    logits, _ = model(torch.as_tensor(np.asarray(context)[None], device=device), cache=cache, start_pos=0)
    return cache, torch.log_softmax(logits[0, -1].float(), -1)


@torch.no_grad()
def continue_logp(model, cache, P: int, conts: torch.Tensor) -> torch.Tensor:
    """(b, n-1, V) log-probs after each of conts' (b, n) first n-1 tokens, the context's
    P cached positions before them."""
    logits, _ = model(conts[:, :-1], cache=batch_cache(model, cache, P, len(conts)), start_pos=P)
    return torch.log_softmax(logits.float(), -1)


def batch_cache(model, cache, P: int, b: int) -> KVCache:
    """A cache of b rows, each holding the one-row cache's first P positions."""
    c = KVCache(model.params, b, cache.k[0].shape[2], cache.k[0].device, cache.k[0].dtype)
    for layer in range(len(c.k)):
        c.k[layer][:, :, :P] = cache.k[layer][:, :, :P]
        c.v[layer][:, :, :P] = cache.v[layer][:, :, :P]
    return c


@torch.no_grad()
def continuation_nll(model, context: np.ndarray, conts: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """(M,) summed nll (nats) of each continuation conts (M, n) right after context (P,)."""
    model.train(False)
    P, (M, n) = len(context), np.shape(conts)
    cache, first = prefill(model, context, P + n, device)
    out = np.empty(M)
    for i in range(0, M, batch_size):
        c = torch.as_tensor(np.asarray(conts[i:i + batch_size]), device=device)
        nll = -first[c[:, 0]]
        if n > 1:
            nll = nll - continue_logp(model, cache, P, c).gather(-1, c[:, 1:, None])[..., 0].sum(1)
        out[i:i + len(c)] = nll.cpu().numpy()
    return out


def secret_nll(model, prefix: np.ndarray, secrets: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """(len(secrets),) summed nll of each secret given BOS + prefix."""
    return continuation_nll(model, np.r_[BOS_ID, prefix].astype(np.int64), secrets, batch_size, device)


def canary_row(model, tag, cands: np.ndarray, cfg: DurabilityConfig, device: str, contexts=()) -> dict:
    """One checkpoint's measures of a canary (module docstring); contexts: from trained_contexts."""
    k = len(tag.secret_tokens)
    nll = secret_nll(model, tag.prefix_tokens, np.vstack([tag.secret_tokens[None], cands]), cfg.batch_size, device)
    gen = model.generate([[BOS_ID, *tag.prefix_tokens.tolist()]], k, stop_at_bos=False)[0]
    hit = np.mean([a == b for a, b in zip(gen, tag.secret_tokens.tolist())]) if len(gen) else 0.0
    row = {"loss": nll[0] / k, "cand_loss": float(np.median(nll[1:])) / k, "exposure": exposure(nll[0], nll[1:]),
           "exposure_extrap": forgetting.extrapolated_exposure(nll[0], nll[1:]), "extraction": float(hit)}
    row["gap"] = row["cand_loss"] - row["loss"]
    row["exposure_exact"] = exact_exposure(model, tag, device, cfg.exact_budget) if cfg.exact_budget else math.nan
    row.update(exposure_among_all(model, tag, cands, cfg.R, cfg.seed, device, cfg.batch_size,
                                  row["exposure_exact"] if cfg.exact_budget >= FALLBACK_BUDGET or
                                  math.isfinite(row["exposure_exact"]) else None,
                                  max(cfg.exact_budget, FALLBACK_BUDGET)))
    loss, gap = [], []
    for ctx in contexts:
        c = continuation_nll(model, ctx, np.vstack([tag.secret_tokens[None], cands[:cfg.R_context]]),
                             cfg.batch_size, device) / k
        loss.append(c[0])
        gap.append(float(np.median(c[1:])) - c[0])
    row.update(loss_ctx=float(np.mean(loss)) if loss else math.nan, gap_ctx=float(np.mean(gap)) if gap else math.nan,
               n_ctx=len(loss))
    return row


def format_trie(tag) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(lead, allowed (A,), N): every secret of the canary's format tokenizes as prefix +
    lead + N tokens, each one of `allowed` (a {tokens:N} secret: any id >= 3; a {digits:N}
    one: one token per digit, checked on the secret and on candidates), else None."""
    kind, n = tag.secret_format
    if kind == "tokens":
        return np.zeros(0, np.int64), np.arange(3, tag.vocab_size), n
    enc, P = tag._enc, len(tag.prefix_tokens)
    per = [enc.encode(tag.prefix_text + str(d) * n, bos=False)[P:] for d in range(10)]
    if any(len(t) != len(per[0]) or t[:-n] != per[0][:-n] or len(set(t[-n:])) != 1 for t in per):
        return None
    lead, digit = np.asarray(per[0][:-n], np.int64), np.asarray([t[-1] for t in per], np.int64)
    secret_digits = [int(c) for c in tag.text[-n:]]
    if tag.secret_tokens.tolist() != [*lead.tolist(), *digit[secret_digits].tolist()]:
        return None
    return lead, digit, n


@torch.no_grad()
def exact_exposure(model, tag, device: str, budget: int, batch_size: int = 4096) -> float:
    """log2 |space| - log2(rank of the secret among every secret of its format), the rank
    counted exactly by branch and bound on the format's trie: losses only add up, so a
    prefix already at or above the secret's loss leads to no secret ranked above it. NaN
    when the format is not a trie of tokens (format_trie) or more than `budget` prefixes
    stay below the secret's loss at some depth (a secret far from memorised: the rank
    among R candidates measures that one)."""
    found = format_trie(tag)
    if found is None:
        return math.nan
    lead, allowed, N = found
    model.train(False)
    ctx = np.r_[BOS_ID, tag.prefix_tokens, lead].astype(np.int64)
    secret = tag.secret_tokens[len(lead):]
    target = continuation_nll(model, ctx, secret[None], 1, device)[0]  # the secret's loss after the lead
    cache, first = prefill(model, ctx, len(ctx) + N, device)
    allowed_t = torch.as_tensor(allowed, device=device)
    nodes, partial = np.zeros((1, 0), np.int64), np.zeros(1)
    for k in range(N):
        logp = np.empty((len(nodes), len(allowed)))
        for i in range(0, len(nodes), batch_size):
            c = torch.as_tensor(nodes[i:i + batch_size], device=device)
            lp = first[None] if k == 0 else continue_logp(model, cache, len(ctx), torch.cat([c, c[:, :1]], 1))[:, -1]
            logp[i:i + len(c)] = lp[:, allowed_t].cpu().numpy()
        child = partial[:, None] - logp  # (F, A) loss so far of each child
        r, a = np.nonzero(child < target - 1e-6 * max(1.0, abs(target)))  # strictly below, float noise aside
        if len(r) > budget and k < N - 1:
            return math.nan
        nodes, partial = np.concatenate([nodes[r], allowed[a][:, None]], 1), child[r, a]
    below = len(nodes) - int((nodes == secret[None]).all(1).any())  # the secret itself never counts
    return N * math.log2(len(allowed)) - math.log2(1 + below)


@torch.no_grad()
def _format_scores(model, cache, P: int, first, seqs: np.ndarray, allowed_t, batch_size: int):
    """(nll, logq) of each (M, N) format sequence after the cached context: nll over the whole
    vocabulary (what exposure ranks), log q under the model renormalised over the allowed tokens."""
    nll, logq = np.empty(len(seqs)), np.empty(len(seqs))
    for i in range(0, len(seqs), batch_size):
        c = torch.as_tensor(seqs[i:i + batch_size], device=first.device)
        lp = first.expand(len(c), 1, -1)  # (b, N, V): log-probs before each token
        if c.shape[1] > 1:
            lp = torch.cat([lp, continue_logp(model, cache, P, c)], 1)
        chosen = lp.gather(-1, c[..., None])[..., 0]
        lse = torch.logsumexp(lp[..., allowed_t], -1)
        nll[i:i + len(c)] = (-chosen.sum(1)).cpu().numpy()
        logq[i:i + len(c)] = (chosen - lse).sum(1).cpu().numpy()
    return nll, logq


@torch.no_grad()
def _format_draws(model, cache, P: int, first, allowed: np.ndarray, N: int, n: int, rng, batch_size: int):
    """(draws (n, N), nll, logq): secrets drawn token by token from the model renormalised over
    the allowed tokens (one cached step per token), with the same scores as _format_scores."""
    allowed_t = torch.as_tensor(allowed, device=first.device)
    draws, nll, logq = np.empty((n, N), np.int64), np.zeros(n), np.zeros(n)
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        c, lp = batch_cache(model, cache, P, b), first.expand(b, -1)
        for k in range(N):
            lq = lp[:, allowed_t].double()
            lq = lq - torch.logsumexp(lq, -1, keepdim=True)  # (b, A) log q of each allowed token
            cum = np.cumsum(np.exp(lq.cpu().numpy()), 1)
            pick = np.minimum((cum < rng.random(b)[:, None] * cum[:, -1:]).sum(1), len(allowed) - 1)
            tok = torch.as_tensor(allowed[pick], device=first.device)
            draws[i:i + b, k] = allowed[pick]
            nll[i:i + b] -= lp.gather(-1, tok[:, None])[:, 0].double().cpu().numpy()
            logq[i:i + b] += lq[torch.arange(b), torch.as_tensor(pick)].cpu().numpy()
            if k < N - 1:
                logits, _ = model(tok[:, None], cache=c, start_pos=P + k)
                lp = torch.log_softmax(logits[:, -1].float(), -1)
    return draws, nll, logq


@torch.no_grad()
def exposure_among_all(model, tag, cands: np.ndarray, n_draws: int, seed: int, device: str, batch_size: int = 256,
                       exact: float | None = None, budget: int = FALLBACK_BUDGET) -> dict:
    """exposure_all, _lo, _hi, _by: the secret's exposure over every secret of its format, the
    rank estimated from the uniform candidates and n_draws draws from the model itself
    (forgetting.sampled_exposure; by "sampled"). An exact count already made (`exact` finite:
    --exact_budget) is used as it is (by "exact"): no estimate beats it (on the README's sample
    run the sampled interval missed it at 3 of 9 checkpoints, by 0.3-0.9 bits). Where fewer
    than MIN_HITS draws fall below the secret the estimate rests on too few: the exact count by
    branch and bound within `budget` (unless `exact` is NaN: it gave up within that budget
    already) where that finishes, else the estimate as it is ("sampled, few below") or, with
    none below, only its lower end ("at least": exposure_all NaN). All NaN where the format is
    not a trie of tokens."""
    out = {"exposure_all": math.nan, "exposure_all_lo": math.nan, "exposure_all_hi": math.nan, "exposure_all_by": ""}
    found = format_trie(tag)
    if found is None:
        return out
    lead, allowed, N = found
    body = cands[:, len(lead):]
    if cands.shape[1] != len(lead) + N or not (cands[:, :len(lead)] == lead).all() or not np.isin(body, allowed).all():
        return out
    if exact is not None and math.isfinite(exact):
        return {"exposure_all": exact, "exposure_all_lo": exact, "exposure_all_hi": exact, "exposure_all_by": "exact"}
    model.train(False)
    ctx = np.r_[BOS_ID, tag.prefix_tokens, lead].astype(np.int64)
    cache, first = prefill(model, ctx, len(ctx) + N, device)
    rng = np.random.default_rng([seed, tag.index, 0x6973])  # 'is'
    draws, d_nll, d_logq = _format_draws(model, cache, len(ctx), first, allowed, N, n_draws, rng, batch_size)
    secret = tag.secret_tokens[len(lead):]
    nll, logq = _format_scores(model, cache, len(ctx), first, np.concatenate([secret[None], body]),
                               torch.as_tensor(allowed, device=device), batch_size)
    target = nll[0] - 1e-5 * max(1.0, abs(nll[0]))  # strictly below, float noise (of two code paths) aside
    d_nll[(draws == secret).all(1)] = math.inf  # the secret itself never counts
    hits = int((nll[1:] < target).sum() + (d_nll < target).sum())
    if hits < MIN_HITS and exact is None:
        exact = exact_exposure(model, tag, device, budget)
        if math.isfinite(exact):
            return {"exposure_all": exact, "exposure_all_lo": exact, "exposure_all_hi": exact,
                    "exposure_all_by": "exact"}
    e, lo, hi = forgetting.sampled_exposure(target, nll[1:], logq[1:], d_nll, d_logq, N * math.log2(len(allowed)))
    by = "sampled" if hits >= MIN_HITS else ("sampled, few below" if hits else "at least")
    return {"exposure_all": e, "exposure_all_lo": lo, "exposure_all_hi": hi, "exposure_all_by": by}


def trained_contexts(tag, rec: dict, data: BatchData, n_max: int) -> list[np.ndarray]:
    """Up to n_max of the canary's recorded insertions (spread evenly over them), each the
    trained window up to where its secret starts. A later insertion in the same window
    that came before the canary shifted it right: its place is followed; a canary cut off
    the window's end or overwritten is left out, as is one with no token before its secret."""
    ins, L = rec["insertions"], data.max_seq_len + 1
    found = []
    for k in np.flatnonzero(ins[:, 3] == tag.index):
        step, row, pos, _, n, _ = (int(v) for v in ins[k])
        same = np.flatnonzero((ins[:, 0] == step) & (ins[:, 1] == row))
        loc, ok = pos, True
        for j in same[same > k]:  # rows apply in recorded order
            p2, n2, mode = int(ins[j, 2]), int(ins[j, 4]), int(ins[j, 5])
            if mode == INSERT and p2 <= loc:
                loc += n2
            elif mode == REPLACE and p2 < loc + n and p2 + n2 > loc:
                ok = False
        start = loc + len(tag.prefix_tokens)
        if ok and loc + n <= L and start > 0:
            found.append((step, row, loc, start))
    pick = np.unique(np.linspace(0, len(found) - 1, min(n_max, len(found))).round().astype(int)) if found else []
    out = []
    for i in pick:
        step, row, loc, start = found[i]
        win = trained_windows(data, rec["batch_ids"][step], step, rec)[row]
        if not np.array_equal(win[loc:loc + len(tag.tokens)], tag.tokens):
            raise UserError(f"the record of step {step}, row {row} does not rebuild tag {tag.id!r} where it says: "
                            "the run's record is damaged (retrain it)")
        out.append(win[:start].astype(np.int64))
    return out


# -----------------------------------------------------------------------------
# conditional tags

def prompts(data_dir, enc, n: int, k: int) -> list[list[int]]:
    """The first k tokens (after BOS) of the first n validation stories longer than that."""
    out = []
    for story in load_stories(raw_shards(data_dir)[0]):
        ids = enc.encode(story)
        if len(ids) > k + 1:
            out.append(ids[1:k + 1])
        if len(out) == n:
            return out
    raise UserError(f"--n_prompts={n}: the validation shard has only {len(out)} stories longer than {k} tokens")


def references(tag, n: int, seed: int) -> np.ndarray:
    """(n, len(tag.tokens)) random token strings of the tag's length, never trained on:
    how far apart two strings' effects on the metric lie when neither means anything."""
    rng = np.random.default_rng([seed, tag.index, 0x726566])  # 'ref'
    return rng.integers(3, tag.vocab_size, (n, len(tag.tokens)))


def conditional_row(model, tag, control, opens: list[list[int]], enc, cfg: DurabilityConfig, refs=()) -> dict:
    """The tag's metric in greedy generations from BOS + head + each opening, the heads
    being the tag, its control, nothing, and the reference strings refs (K, len): effect
    = tag - control, paired over openings. Its standard error is the larger of the paired
    one over openings and sqrt(2) x the spread of the K references' means: greedy text
    depends on which string comes first, so two strings that mean nothing still differ by
    about that much (df K - 1 where that spread decides, else openings - 1)."""
    heads = [tag.tokens.tolist(), [] if control is None else control.tokens.tolist(), [],
             *[list(map(int, r)) for r in refs]]
    gens = model.generate([[BOS_ID, *h, *p] for h in heads for p in opens], cfg.max_new_tokens)
    v = metrics_engine.text_metrics([enc.decode(g) for g in gens], [tag.metric])[tag.metric]
    v = v.reshape(len(heads), len(opens))
    n_none, m_none, _, lo_none, hi_none = mean_interval(v[0] - v[2])
    row = {"effect_vs_none": m_none, "effect_vs_none_lo": lo_none, "effect_vs_none_hi": hi_none, "effect": math.nan,
           "effect_lo": math.nan, "effect_hi": math.nan, "effect_se": math.nan, "effect_df": math.nan, "n": n_none}
    if control is None:
        return row
    n, m, sd, _, _ = mean_interval(v[0] - v[1])
    ref_means = np.nanmean(v[3:], 1) if len(refs) else np.zeros(0)
    ref_means = ref_means[np.isfinite(ref_means)]
    se_pair = sd / math.sqrt(n) if n >= 2 else math.nan
    se_ref = math.sqrt(2) * float(ref_means.std(ddof=1)) if len(ref_means) >= 2 else math.nan
    found = [(e, d) for e, d in ((se_pair, n - 1), (se_ref, len(ref_means) - 1)) if np.isfinite(e)]
    se, df = max(found) if found else (math.nan, math.nan)
    lo, hi = forgetting.band(m, se, df, forgetting.LEVEL)
    row.update(effect=m, effect_lo=lo, effect_hi=hi, effect_se=se, effect_df=df, n=n)
    return row


def add_bands(df: pd.DataFrame, level: float = forgetting.LEVEL) -> pd.DataFrame:
    """effect_band_lo/hi: each conditional tag's effect interval at level 1 - (1 - level)/K,
    K its checkpoints with an interval (Bonferroni over the curve)."""
    df = df.copy()
    df["effect_band_lo"] = df["effect_band_hi"] = math.nan
    for _, g in df[df["kind"] == "conditional"].groupby("tag"):
        ok = g.index[g["effect_se"].notna() & (g["effect_df"] >= 1)]
        for i in ok:
            lo, hi = forgetting.band(df.at[i, "effect"], df.at[i, "effect_se"], int(df.at[i, "effect_df"]),
                                     1 - (1 - level) / len(ok))
            df.at[i, "effect_band_lo"], df.at[i, "effect_band_hi"] = lo, hi
    return df


# -----------------------------------------------------------------------------
# forgetting

def steps_since(ins: np.ndarray, tag: int, it: int) -> float:
    s = ins[(ins[:, 3] == tag) & (ins[:, 0] < it), 0]
    return float(it - 1 - s.max()) if len(s) else math.nan


def fit_all(df: pd.DataFrame, tagset, ins: np.ndarray) -> pd.DataFrame:
    """A half-life per tag and measure (FITS) from the checkpoints after its last insertion."""
    out = []
    for tag in tagset.tags:
        steps = ins[ins[:, 3] == tag.index, 0]
        d = df[df["tag"] == tag.id].sort_values("iter")
        for col, base in FITS.get(tag.kind, ()):
            head = {"tag": tag.id, "measure": col, "base": base, "last_step": int(steps.max()) if len(steps) else -1}
            if not len(steps) or col not in d or d[col].isna().all():
                out.append({**head, "n": 0, "status": "never inserted" if not len(steps) else "not measured"})
                continue
            first, last = int(steps.min()), int(steps.max())
            before = d.loc[d["iter"] <= first, col]
            after = d[d["iter"] > last]
            fit = forgetting.decay_fit(after["iter"].to_numpy() - last - 1, after[col].to_numpy(), base)
            out.append({**head, "before": float(before.mean()) if len(before) else math.nan, **fit})
    cols = ["tag", "measure", "last_step", "n", "base", "before", "start", "half_life", "half_life_lo", "half_life_hi",
            "sd", "span", "status"]
    return pd.DataFrame(out).reindex(columns=cols)


# -----------------------------------------------------------------------------
# the stage

def setup(cfg: DurabilityConfig) -> types.SimpleNamespace:
    """Everything the checkpoints share: the run's record and tags, candidates, trained
    contexts, prompts, and the settings every cached row depends on."""
    run = types.SimpleNamespace(**run_config(cfg.out_dir))
    rec = stream_records(cfg.out_dir)
    if not rec["tags"]:
        raise UserError(f"{cfg.out_dir} was trained without tags: train with --tags=tags.json first")
    enc = Tokenizer.for_vocab(run.vocab_size, run.data_dir)
    tagset = tagmod.tags_from_json(rec["tags"], enc, run.max_seq_len, run.vocab_size)
    canaries = [t for t in tagset.tags if t.kind == "canary" and t.secret_format]
    cands = {t.index: t.candidates(cfg.R, cfg.seed) for t in canaries}
    data = BatchData(run.data_dir, run.vocab_size, run.max_seq_len) if canaries and cfg.n_contexts else None
    contexts = {t.index: trained_contexts(t, rec, data, cfg.n_contexts) if data else [] for t in canaries}
    opens = (prompts(run.data_dir, enc, cfg.n_prompts, cfg.prompt_tokens)
             if any(t.kind == "conditional" for t in tagset.tags) else [])
    h = hashlib.sha256()
    for i in sorted(contexts):
        for c in contexts[i]:
            h.update(c.tobytes())
    settings = {**asdict(cfg), "out_dir": None, "redo": None, "device": None, "version": VERSION,
                "columns": COLUMNS,  # a table cached with other columns is measured again, version or not
                "tags": tagset.fingerprint(), "metric_versions": metrics.metric_versions(),
                "contexts": h.hexdigest()[:16]}
    return types.SimpleNamespace(run=run, rec=rec, enc=enc, tagset=tagset, cands=cands, contexts=contexts,
                                 opens=opens, settings=settings)


def measure_checkpoint(model, it: int, s, cfg: DurabilityConfig, device: str) -> list[dict]:
    """One row per canary and conditional tag (controls are measured with their tag)."""
    rows = []
    for tag in s.tagset.tags:
        if tag.kind == "control":
            continue
        row = {"iter": it, "tag": tag.id, "kind": tag.kind,
               "steps_since_seen": steps_since(s.rec["insertions"], tag.index, it)}
        if tag.kind == "canary":
            if tag.index in s.cands:
                row.update(canary_row(model, tag, s.cands[tag.index], cfg, device, s.contexts[tag.index]))
        else:
            control = s.tagset.tags[tag.control] if tag.control is not None else None
            row.update(conditional_row(model, tag, control, s.opens, s.enc, cfg,
                                       references(tag, cfg.n_references, cfg.seed)))
        rows.append(row)
    return rows


def measure(cfg: DurabilityConfig) -> pd.DataFrame:
    ckpts = run_checkpoints(cfg.out_dir)
    s = setup(cfg)
    device = auto_device(cfg.device)
    tables = Path(cfg.out_dir) / "tables"
    done = DoneRecord(tables / "durability_done.json", s.settings, cfg.redo)
    csv = tables / "durability.csv"
    old = pd.read_csv(csv) if csv.exists() and done.done else pd.DataFrame(columns=COLUMNS)
    rows, n_new, t_total = [], 0, 0.0
    for it, path in ckpts:
        sig = file_signature(path)
        if done.is_done(it, sig, csv):
            rows += old[old["iter"] == it].to_dict("records")
            continue
        t0 = time.perf_counter()
        model = model_from_checkpoint(load_checkpoint(path), device)
        rows += measure_checkpoint(model, it, s, cfg, device)
        t_total += time.perf_counter() - t0
        n_new += 1
        done.mark(it, sig)
    df = add_bands(pd.DataFrame(rows, columns=COLUMNS).sort_values(["tag", "iter"], kind="stable"))
    write_csv_atomic(df, csv)
    done.save(keep=[it for it, _ in ckpts])
    if n_new:
        print(f"measured {n_new} checkpoint(s) in {t_total:.1f} s ({t_total / n_new:.2f} s per checkpoint, "
              f"R={cfg.R}), reused {len(ckpts) - n_new}")
    fits = fit_all(df, s.tagset, s.rec["insertions"])
    write_csv_atomic(fits, tables / "durability_fit.csv")
    for f in fits.itertuples():
        hl = (f"half-life {f.half_life:.0f} steps [{f.half_life_lo:.0f}, {f.half_life_hi:.0f}] ({f.n} checkpoints)"
              if f.status == "fitted" else f.status)
        print(f"tag {f.tag} ({f.measure}): last inserted at step {f.last_step}, {hl}")
    png = Path(cfg.out_dir) / "visualize" / "durability.png"
    plot(df, fits, s.tagset, s.rec["insertions"], int(ckpts[-1][0]), png, cfg.out_dir)
    for p in (csv, tables / "durability_fit.csv", png):
        print(f"wrote {p}")
    return df


# -----------------------------------------------------------------------------
# the figure

PANELS = [("canary", ("gap", "gap_ctx"), "secret's gap below never-seen\nsecrets (nats/token)"),
          ("canary", ("exposure", "exposure_all", "exposure_extrap", "exposure_exact"), "exposure (bits)"),
          ("canary", ("extraction",), "greedy extraction"),
          ("conditional", ("effect",), "tag - control\non its metric")]
STYLE = {"gap": ("o-", "after BOS + prefix"), "gap_ctx": ("s--", "in its trained windows"),
         "exposure": ("o-", "rank among R (capped at log2 R)"),
         "exposure_all": ("d-", "rank among every secret (sampled, 95% band; or exact)"),
         "exposure_extrap": ("s--", "skew-normal extrapolated (biased low)"),
         "exposure_exact": ("^:", "exact rank among every secret"),
         "extraction": ("o-", ""), "effect": ("o-", "tag - control")}


def _draw_tag(ax, tag, cols, d, fits, ins, c):
    for col in cols:
        if d[col].isna().all():
            continue
        fmt, what = STYLE[col]
        label = f"{tag.id}: {what}" if what else tag.id
        f = fits[(fits["tag"] == tag.id) & (fits["measure"] == col)]
        if len(f) and np.isfinite(f.iloc[0]["start"]) and f.iloc[0]["last_step"] >= 0:
            f, last = f.iloc[0], int(f.iloc[0]["last_step"])
            xs = d.loc[d["iter"] > last, "iter"].to_numpy(float)
            grid = np.linspace(xs[0], xs[-1], 100)
            ax.plot(grid, forgetting.decay_curve(grid - last - 1, f, f["base"], xs[0] - last - 1), ":", color=c, lw=1)
            label += (f"; half-life {f['half_life']:.0f} [{f['half_life_lo']:.0f}, {f['half_life_hi']:.0f}] steps"
                      if f["status"] == "fitted" else f"; {f['status'].split(':')[0].split(' (')[0]}")
        ax.plot(d["iter"], d[col], fmt, ms=3, color=c, label=label)
        if col == "exposure_all":
            ax.fill_between(d["iter"], d["exposure_all_lo"], d["exposure_all_hi"], color=c, alpha=0.15)
    if cols == ("effect",):
        ax.fill_between(d["iter"], d["effect_band_lo"], d["effect_band_hi"], color=c, alpha=0.1,
                        label="Bonferroni band over checkpoints")
        ax.fill_between(d["iter"], d["effect_lo"], d["effect_hi"], color=c, alpha=0.25,
                        label="95% interval per checkpoint")
        ax.plot(d["iter"], d["effect_vs_none"], "-", color="0.6", lw=0.8, label=f"{tag.id}: tag - no tag")
    steps = ins[ins[:, 3] == tag.index, 0]
    ax.plot(steps + 1, np.full(len(steps), 0.02), "|", color=c, ms=9, transform=ax.get_xaxis_transform())


def plot(df, fits, tagset, ins, max_step, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in PANELS if (df["kind"] == p[0]).any()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.7 * len(panels)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (kind, cols, label) in zip(axes[:, 0], panels):
        for tag in tagset.tags:
            if tag.kind == kind:
                _draw_tag(ax, tag, cols, df[df["tag"] == tag.id].sort_values("iter"), fits, ins,
                          colors[tag.index % len(colors)])
        if cols[0] in ("gap", "effect"):
            ax.axhline(0, color="0.6", lw=0.8)
        if cols[0] == "exposure":
            ax.axhline(forgetting.UNSEEN_EXPOSURE, color="0.6", lw=0.8, ls=":")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
        step_axis(ax, max_step, label=ax is axes[-1, 0], fontsize=9)
    fig.suptitle(f"tag durability: {title} (ticks: steps trained with the tag; dotted: fitted decay)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    cfg = parse_config(DurabilityConfig(), sys.argv[1:] if argv is None else argv)
    check_durability(cfg)  # the values alone (experiment.py runs it on a spec's settings too)
    return measure(cfg)


if __name__ == "__main__":
    main_guard(main)
