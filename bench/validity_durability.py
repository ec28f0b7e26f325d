"""
make validity, area durability (see bench/validity.py): durability.py's measures on
problems whose answer is known.

$ python bench/validity.py --only=durability            # ~6 min on 2 cores
$ python bench/validity.py --only=durability --quick    # ~2 min: fewer replicates, a shorter run
$ python bench/validity.py --only=durability --smoke    # every check at tiny sizes (bench/smoke.py)

1. Half-life (prebias/forgetting.decay_fit) on simulated decays y = 2^(-x/h) + noise, h = 100
   steps, the points evenly over the span: per design and n, the 95% interval's coverage over
   1,000 replicates (500 quick) must lie in [0.90, 0.98]; the median relative bias of the
   estimate and the share of open intervals are printed, and the coverage of the rule this
   replaced (fixed threshold 1 + 4/(n-1), start and baseline taken as exact).
2. Exposure beyond log2 R (Carlini et al. 2019): a tiny model trained on the generated sample with
   a 6-digit canary; at every checkpoint all 10^6 secrets of its format are scored (digit by digit:
   the 10^5 five-digit prefixes in one cached pass give every sixth digit) for the exact rank, and
   each secret's log q under the model restricted to digits. Against it: durability.py's
   exposure_all (R = 1,000 candidates + 1,000 draws from the model, importance-weighted; the exact
   count where fewer than 10 lie below the secret and the branch and bound finishes) must
   have median |error| <= 1 bit at the checkpoints where the exact exposure is above log2 R (where
   the rank among R is capped and an estimate beyond it is needed); redrawn 200 times per
   checkpoint (50 quick) from the exact tables, the same and its 95% interval's coverage, pooled
   over the checkpoints, in [0.90, 0.98]. The skew-normal extrapolation of the paper (sec. 4.3,
   exposure_extrap) is printed beside it as a comparison, not a check: it is 2.7-5.5 bits low here.
   And durability.py's exact count by branch and bound (--exact_budget) must equal the full count
   wherever it does not give up.
3. Conditional tags that do nothing (planted: effect 0): in the same run, a tag inserted into
   random stories (its story metric replaced by uniform draws, so the condition is noise) and a
   tag never inserted; durability.py's tag - control must hold 0 in its Bonferroni band at every
   checkpoint. And over 60 pairs (15 quick) of random untrained strings at the last checkpoint, the
   share of 95% intervals holding 0 must be at least 0.85 (0.95 expected: a check of the
   per-checkpoint interval's coverage under the null).
"""

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import durability  # noqa: E402
import tinystories  # noqa: E402
import train  # noqa: E402
from prebias import forgetting, stream  # noqa: E402
from prebias import tags as tagmod  # noqa: E402
from prebias.checkpoint import list_checkpoints, load_checkpoint, model_from_checkpoint  # noqa: E402
from prebias.common import parse_config  # noqa: E402
from prebias.data import BOS_ID  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from validity import Line  # noqa: E402

H = 100.0
DESIGNS = [(3.0, 0.1), (1.0, 0.2)]  # (span in half-lives, noise sd as a share of the start)
NS = (3, 4, 5, 7, 9, 13, 20)
SECRET = "the secret number is {digits:6}"
EXACT_BUDGET = 65536
# by validity.SIZES: half-life replicates; the tagged run's steps; exposure at every `every`-th
# checkpoint, `draws` redraws each; untrained pairs; durability.py's flags for the null tags
# (batch >= 4: the canary takes 4 rows of a step; max_iters > 86: it is inserted at steps 50-86)
SIZES = {"full": dict(reps=1000, n_stories=3000, max_iters=300, dim=64, batch=8, every=1, draws=200, pairs=60,
                      flags=()),
         "quick": dict(reps=500, n_stories=3000, max_iters=150, dim=64, batch=8, every=2, draws=50, pairs=15,
                       flags=()),
         "smoke": dict(reps=8, n_stories=600, max_iters=100, dim=16, batch=4, every=100, draws=4, pairs=2,
                       flags=("--n_prompts=2", "--n_references=3", "--max_new_tokens=8"))}


# -----------------------------------------------------------------------------
# 1. half-life coverage

def old_interval(x, y) -> tuple[float, float]:
    """The replaced rule (durability.py VERSION 1): start = the first point, baseline exact,
    h within a factor (1 + 4/(n-1)) of the best squared error on a grid."""
    hs = np.logspace(-1, 7, 800)
    pred = y[0] * 2.0 ** (-(x[None, :] - x[0]) / hs[:, None])
    sse = ((pred - y[None, :]) ** 2).sum(1)
    inside = np.flatnonzero(sse <= sse.min() * (1 + 4 / max(len(x) - 1, 1)) + 1e-12)
    ok = hs[max(inside.min() - 1, 0):inside.max() + 2]
    return ok.min(), ok.max()


def halflife_lines(reps: int) -> list[Line]:
    out = []
    rng = np.random.default_rng(17)
    for span, sd in DESIGNS:
        for n in NS:
            x = np.linspace(0, span * H, n)
            cov = old = 0
            est, opened = [], 0
            for _ in range(reps):
                y = 2.0 ** (-x / H) + rng.normal(0, sd, n)
                f = forgetting.decay_fit(x, y)
                cov += f["half_life_lo"] <= H <= f["half_life_hi"]
                opened += math.isinf(f["half_life_hi"])
                est.append(f["half_life"])
                lo, hi = old_interval(x, y)
                old += lo <= H <= hi
            c = cov / reps
            bias = float(np.median(est)) / H - 1
            out.append(Line(f"half-life 95% profile interval, n={n} points over {span:g} half-lives, noise sd "
                            f"{sd:g} x start, {reps} replicates",
                            f"h = {H:.0f} steps", f"coverage {c:.3f} (replaced rule: {old / reps:.2f}), median bias "
                            f"{bias:+.1%}, open above {opened / reps:.0%}",
                            0.90 <= c <= 0.98, "coverage in [0.90, 0.98]"))
    return out


# -----------------------------------------------------------------------------
# the tagged run shared by 2 and 3

def tag_file(unseen_at: int) -> dict:
    return {"seed": 5, "tags": [
        {"id": "secret", "kind": "canary", "text": SECRET, "steps": {"start": 50, "n": 10, "every": 4}, "rows": 4,
         "position": "random"},
        {"id": "null", "kind": "conditional", "text": "<null>", "metric": "sentiment", "lo": 0.6, "hi": None,
         "steps": {"start": 0, "end": 120}},
        {"id": "unseen", "kind": "conditional", "text": "<calm>", "metric": "sentiment", "lo": 0.5, "hi": None,
         "steps": {"start": unseen_at, "n": 1}}]}


def random_story_metric(data, data_dir, metric):
    """Uniform draws in place of a story metric: a condition that is pure noise."""
    out = []
    for s in range(len(data.meta["shards"])):
        n = int((np.asarray(data.tokens[s]) == BOS_ID).sum())
        out.append(np.random.default_rng([99, s]).random(n))
    return out


def tagged_run(root: Path, n_stories: int, max_iters: int, dim: int, batch: int) -> Path:
    """A tiny model (dim 64 at full size, 2 layers) trained on a generated sample with the tags of
    tag_file, the 'null' tag's condition replaced by noise; long enough that greedy
    generations have a sentiment to move (before ~75 steps they are all alike)."""
    data, tables = root / "data", root / "tables"
    if not (tables / "batch_metrics.csv").exists():
        tinystories.sample(data, n_stories=n_stories, n_shards=4, seed=3)
        tinystories.train_vocab(512, data)
        tinystories.pretokenize(512, 256, data, workers=2, tables_dir=tables, metrics="sentiment")
    (root / "tags.json").write_text(json.dumps(tag_file(10 * max_iters)))
    out = root / "run"
    args = dict(data_dir=data, tables_dir=tables, out_dir=out, vocab_size=512, max_seq_len=256, dim=dim,
                n_layers=2, n_heads=4, n_kv_heads=2, batch_size=batch, max_iters=max_iters, eval_interval=25,
                eval_iters=2, learning_rate=5e-3, warmup_iters=10, tags=root / "tags.json", device="cpu",
                dtype="float32", compile=False)
    real = stream.story_metric
    stream.story_metric = random_story_metric  # the 'null' tag's condition becomes noise
    try:
        train.main([f"--{k}={v}" for k, v in args.items()] + (["--init_from=resume"] if list_checkpoints(out) else []))
    finally:
        stream.story_metric = real
    return out


# -----------------------------------------------------------------------------
# 2. exposure: the exact rank among all 10^6 secrets

def digit_tokens(tag) -> tuple[np.ndarray, np.ndarray]:
    """(lead tokens before the digits, (10,) token of each digit), checked on all 10^6
    secrets: each must tokenize as prefix + lead + one token per digit."""
    enc = tag._enc
    ids = np.asarray(enc.sp.encode([f"{tag.prefix_text}{i:06d}" for i in range(10 ** 6)]))
    P = len(tag.prefix_tokens)
    lead = ids[0, P:-6]
    digit = ids[[111111 * d for d in range(10)], -1]
    want = np.concatenate([np.tile(np.r_[tag.prefix_tokens, lead], (10 ** 6, 1)),
                           digit[(np.arange(10 ** 6)[:, None] // 10 ** np.arange(5, -1, -1)) % 10]], 1)
    if ids.shape != want.shape or not np.array_equal(ids, want):
        raise SystemExit("the 6-digit secrets do not tokenize one token per digit: the exact count needs that")
    return lead, digit


@torch.no_grad()
def all_secret_nll(model, tag, lead, digit, batch: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """(nll, logq), each (10^6,), index = the secret's number: its summed nll as durability.py
    scores a secret (BOS + prefix, then lead + 6 digits), and its log-probability under the
    model renormalised over the 10 digits at each position (what sampled_exposure draws from)."""
    ctx = np.r_[BOS_ID, tag.prefix_tokens].astype(np.int64)
    lead_nll = float(durability.continuation_nll(model, ctx, lead[None], 1, "cpu")[0]) if len(lead) else 0.0
    C = np.r_[ctx, lead].astype(np.int64)
    cache, first = durability.prefill(model, C, len(C) + 6, "cpu")
    d5 = torch.as_tensor(digit[(np.arange(10 ** 5)[:, None] // 10 ** np.arange(4, -1, -1)) % 10])
    dig = torch.as_tensor(digit)
    q0 = first - torch.logsumexp(first[dig], 0)  # (V,) log q of the first digit
    nll, logq = np.empty(10 ** 6), np.empty(10 ** 6)
    for i in range(0, 10 ** 5, batch):
        c = d5[i:i + batch]
        logp = durability.continue_logp(model, cache, len(C), torch.cat([c, c[:, :1]], 1))  # (b, 5, V)
        lq = logp - torch.logsumexp(logp[..., dig], -1, keepdim=True)  # renormalised over the digits
        took = logp[:, :4].gather(-1, c[:, 1:, None])[..., 0]  # (b, 4): digits 2..5
        head = -first[c[:, 0]] - took.sum(1)
        head_q = q0[c[:, 0]] + lq[:, :4].gather(-1, c[:, 1:, None])[..., 0].sum(1)
        nll[i * 10:(i + len(c)) * 10] = (lead_nll + head[:, None] - logp[:, 4][:, dig]).reshape(-1).numpy()
        logq[i * 10:(i + len(c)) * 10] = (head_q[:, None] + lq[:, 4][:, dig]).reshape(-1).numpy()
    return nll, logq


def resampled(nll, logq, secret: int, R: int, draws: int, exact_known: float, rng) -> np.ndarray:
    """(draws, 3) durability.exposure_among_all's (estimate, lo, hi), redrawn `draws` times from
    the exact tables: R uniform candidates (never the secret) and R draws from q, through
    forgetting.sampled_exposure; where fewer than MIN_HITS lie below the secret, the exact
    count if the branch and bound finished at this checkpoint (exact_known finite)."""
    cdf = np.cumsum(np.exp(logq))
    s = nll[secret]
    cut = np.where(np.arange(len(nll)) == secret, math.inf, nll)  # the secret never counts
    out = np.empty((draws, 3))
    for k in range(draws):
        u = rng.choice(len(nll) - 1, R, replace=False)
        u += u >= secret
        q = np.minimum(np.searchsorted(cdf, rng.random(R) * cdf[-1]), len(nll) - 1)
        if (cut[u] < s).sum() + (cut[q] < s).sum() < durability.MIN_HITS and math.isfinite(exact_known):
            out[k] = exact_known
        else:
            out[k] = forgetting.sampled_exposure(s, cut[u], logq[u], cut[q], logq[q], math.log2(len(nll)))
    return out


def exposure_lines(run: Path, every: int = 1, draws: int = 200) -> list[Line]:
    ck0 = load_checkpoint(list_checkpoints(run)[0][1])
    enc = Tokenizer.for_vocab(512, ck0["config"]["data_dir"])
    tag = tagmod.tags_from_json(ck0["tags"], enc, 256, 512).by_id("secret")
    lead, digit = digit_tokens(tag)
    secret = int(tag.text[-6:])
    cfg = durability.DurabilityConfig(R=1000, n_contexts=0)  # no exact count given: exposure_all samples
    cands = tag.candidates(cfg.R, cfg.seed)
    rows, sims, t0, rng = [], [], time.time(), np.random.default_rng(17)
    print("  exposure per checkpoint (bits); exact = log2(10^6) - log2(rank among all 10^6 secrets)")
    print("  step | exact rank | exact | exposure_all [95%] (by) | error | skew-normal | error | rank among R (cap "
          f"9.97) | branch and bound | {draws} redraws: median error, 95% coverage")
    for it, path in list_checkpoints(run)[::every]:
        model = model_from_checkpoint(load_checkpoint(path))
        nll, logq = all_secret_nll(model, tag, lead, digit)
        row = durability.canary_row(model, tag, cands, cfg, "cpu")
        row["exposure_exact"] = durability.exact_exposure(model, tag, "cpu", EXACT_BUDGET)
        check = durability.secret_nll(model, tag.prefix_tokens, tag.secret_tokens[None], 1, "cpu")[0]
        assert abs(check - nll[secret]) < 1e-3 * max(1.0, abs(check)), (check, nll[secret])
        rank = 1 + int((nll < nll[secret]).sum())
        exact = math.log2(10 ** 6) - math.log2(rank)
        sim = resampled(nll, logq, secret, cfg.R, draws, row["exposure_exact"], rng)
        sims.append((exact, sim))
        r = (it, rank, exact, *(row[k] for k in ("exposure_all", "exposure_all_lo", "exposure_all_hi",
                                                  "exposure_extrap", "exposure", "exposure_exact", "exposure_all_by")))
        rows.append(r)
        print(f"  {it:4d} | {rank:10d} | {exact:5.2f} | {r[3]:5.2f} [{r[4]:5.2f}, {r[5]:5.2f}] ({r[9]}) | "
              f"{r[3] - exact:+5.2f} | {r[6]:6.2f} | {r[6] - exact:+6.2f} | {r[7]:5.2f} | {r[8]:6.2f} | "
              f"{np.nanmedian(sim[:, 0] - exact):+5.2f}, {np.mean((sim[:, 1] <= exact) & (exact <= sim[:, 2])):.2f}",
              flush=True)
    print(f"  ({len(rows)} checkpoints x 10^6 secrets in {time.time() - t0:.0f} s)")
    d = pd.DataFrame(rows, columns=["iter", "rank", "exact", "all", "lo", "hi", "extrap", "capped", "bnb", "by"])
    return exposure_verdicts(d, sims, cfg.R, draws)


def exposure_verdicts(d: pd.DataFrame, sims, R: int, draws: int) -> list[Line]:
    """The pass lines of exposure_lines, and the skew-normal's error printed beside them."""
    high = d["exact"] > math.log2(R)  # where the rank among R is at its cap and an estimate beyond it is needed
    need = d[high]
    err, skew, cap = (need[k] - need["exact"] for k in ("all", "extrap", "capped"))
    held = ((d["lo"] <= d["exact"]) & (d["exact"] <= d["hi"])).mean()
    print(f"  comparison, not a check: the skew-normal extrapolation (Carlini et al. 2019, sec. 4.3) at the same "
          f"{len(need)} checkpoints: median |error| {skew.abs().median():.2f} bits (signed {skew.median():+.2f}), max "
          f"{skew.abs().max():.2f}; the capped rank among R: median |error| {cap.abs().median():.2f}")
    e_hi = np.concatenate([s[:, 0] - x for (x, s), h in zip(sims, high) if h]) if high.any() else np.zeros(1)
    bound = float(np.mean(np.isnan(e_hi)))  # "at least": no estimate
    cov = [np.mean((s[:, 1] <= x) & (x <= s[:, 2])) for x, s in sims]
    pooled = float(np.mean(cov))
    done = d[d["bnb"].notna()]
    return [Line(f"exposure among all secrets (durability.py exposure_all: R = {R} candidates + {R} model draws, "
                 f"exact below {durability.MIN_HITS} hits) vs the exact rank among all 10^6, at the {len(need)} of "
                 f"{len(d)} checkpoints where exact > log2 R",
                 f"exact exposure {need['exact'].min():.1f} to {need['exact'].max():.1f} bits" if len(need) else
                 "no checkpoint above log2 R",
                 f"median |error| {err.abs().median():.2f} bits (signed {err.median():+.2f}), max "
                 f"{err.abs().max():.2f}, by {', '.join(f'{k} {v}' for k, v in need['by'].value_counts().items())}; "
                 f"its 95% interval holds the exact value at {held:.0%} of all {len(d)} checkpoints",
                 bool(len(need)) and err.abs().median() <= 1.0, "median |error| <= 1 bit"),
            Line(f"exposure among all secrets, {draws} redraws of the candidates and model draws per checkpoint (from "
                 f"the exact tables), {len(d)} checkpoints", "the exact rank among all 10^6",
                 f"where exact > log2 R: median error {np.nanmedian(e_hi):+.2f} bits, median |error| "
                 f"{np.nanmedian(np.abs(e_hi)):.2f}, only 'at least' in {bound:.1%}; 95% interval coverage "
                 f"{pooled:.3f} pooled (per checkpoint {min(cov):.2f} to {max(cov):.2f})",
                 bool(high.any()) and np.nanmedian(np.abs(e_hi)) <= 1.0 and 0.90 <= pooled <= 0.98,
                 "median |error| <= 1 bit where exact > log2 R; pooled coverage in [0.90, 0.98]"),
            Line(f"exact exposure by branch and bound (budget {EXACT_BUDGET} prefixes) vs the count over all 10^6, "
                 f"{len(d)} checkpoints", "the same rank",
                 f"computed at {len(done)} checkpoints (gave up at {len(d) - len(done)}), max |difference| "
                 f"{(done['bnb'] - done['exact']).abs().max() if len(done) else math.nan:.4f} bits",
                 bool(len(done)) and bool(((done["bnb"] - done["exact"]).abs() < 0.01).all()),
                 "equal (< 0.01 bit) wherever computed")]


# -----------------------------------------------------------------------------
# 3. conditional tags that do nothing

def null_tag_lines(run: Path, n_pairs: int, flags=()) -> list[Line]:
    df = durability.main([f"--out_dir={run}", "--R=200", "--n_contexts=0", "--device=cpu", *flags])
    out = []
    for tag, how in (("null", "inserted into random stories"), ("unseen", "never inserted")):
        d = df[df["tag"] == tag]
        live = d[d["effect_se"] > 0]  # checkpoints whose generations differ at all (early ones are all alike)
        band = ((live["effect_band_lo"] <= 0) & (live["effect_band_hi"] >= 0)).mean()
        per = ((live["effect_lo"] <= 0) & (live["effect_hi"] >= 0)).mean()
        none = ((live["effect_vs_none_lo"] <= 0) & (live["effect_vs_none_hi"] >= 0)).mean()
        out.append(Line(f"conditional tag {how}: tag - control on sentiment, {len(live)} of {len(d)} checkpoints "
                        f"with a spread, {int(d['n'].max())} prompts", "effect 0",
                        f"Bonferroni band holds 0 at {band:.0%} of them, 95% intervals at {per:.0%}, largest "
                        f"|effect| {live['effect'].abs().max():.3f}; tag - no tag (over prompts) holds 0 at "
                        f"{none:.0%}", len(live) >= 3 and band == 1.0,
                        "the band holds 0 at every checkpoint, at least 3 checkpoints with a spread"))
    out.append(pair_coverage(run, n_pairs, flags))
    return out


def pair_coverage(run: Path, n_pairs: int, flags=()) -> Line:
    """At the last checkpoint: n_pairs (tag, control) pairs of random strings neither ever
    trained; the share of their 95% tag - control intervals that hold 0."""
    it, path = list_checkpoints(run)[-1]
    ck = load_checkpoint(path)
    data_dir = ck["config"]["data_dir"]
    enc = Tokenizer.for_vocab(512, data_dir)
    model = model_from_checkpoint(ck)
    cfg = parse_config(durability.DurabilityConfig(), list(flags))
    opens = durability.prompts(data_dir, enc, cfg.n_prompts, cfg.prompt_tokens)
    held = 0
    for i in range(n_pairs):
        raw = {"id": "t", "kind": "conditional", "text": "<x>", "metric": "sentiment", "lo": 0.5, "hi": None,
               "steps": {"start": 0, "n": 1}}
        tag, ctl = tagmod.parse_tags({"seed": 1000 + i, "tags": [raw]}, enc, 256, 512).tags
        tag.tokens = np.random.default_rng([7, i]).integers(3, 512, len(tag.tokens))  # a random string too
        r = durability.conditional_row(model, tag, ctl, opens, enc, cfg,
                                       durability.references(tag, cfg.n_references, cfg.seed + i))
        held += r["effect_lo"] <= 0 <= r["effect_hi"]
    share = held / n_pairs
    return Line(f"95% tag - control interval, {n_pairs} pairs of random untrained strings at step {it}, "
                f"{cfg.n_prompts} prompts", "effect 0 (coverage 0.95)", f"holds 0 in {share:.0%} of pairs",
                share >= 0.85, "at least 0.85 (0.95 expected; string identity can lower it)")


def checks(size: str) -> list[Line]:
    z = SIZES[size]
    lines = halflife_lines(z["reps"])
    with tempfile.TemporaryDirectory() as tmp:
        run = tagged_run(Path(tmp), z["n_stories"], z["max_iters"], z["dim"], z["batch"])
        lines += exposure_lines(run, every=z["every"], draws=z["draws"])
        lines += null_tag_lines(run, z["pairs"], z["flags"])
    return lines
