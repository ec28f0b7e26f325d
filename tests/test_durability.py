"""durability.py and prebias/forgetting.py: each estimator on fixed cases whose answer is
derived by hand (the decay fit and its profile interval, both exposures, the Bonferroni
band), the forgetting baseline (the gap to never-seen candidates, which drift), the
trained contexts rebuilt from a record, and the stage end to end on a tagged run (rows
per checkpoint and tag, steps since seen, the control, the figure, the cache)."""

import json
import math
import types

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import durability
import train
from conftest import TinyRun
from model import ModelArgs, Transformer
from prebias import forgetting, metrics_engine, tags
from prebias.common import UserError
from prebias.data import BOS_ID
from prebias.stream import INSERT, REPLACE
from tokenizer import Tokenizer

CANARY = {"id": "secret", "kind": "canary", "text": "the secret number is {digits:6}",
          "steps": {"start": 1, "n": 2, "every": 2}, "rows": 2}
HAPPY = {"id": "happy", "kind": "conditional", "text": "<happy>", "metric": "sentiment", "lo": 0.3, "hi": None,
         "steps": {"start": 0, "end": 3}}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=64))


def test_exposure_is_maximal_when_memorised_and_small_when_untrained(tiny_data):
    enc = Tokenizer.for_vocab(512, tiny_data[0])
    tag = tags.parse_tags({"seed": 3, "tags": [CANARY]}, enc, 64, 512).tags[0]
    cands = tag.candidates(200, 0)
    model = tiny_model()
    cfg = durability.DurabilityConfig(batch_size=64)
    untrained = durability.canary_row(model, tag, cands, cfg, "cpu")
    seq = torch.tensor([[BOS_ID, *tag.tokens.tolist()]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):  # memorise the canary
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    learned = durability.canary_row(model, tag, cands, cfg, "cpu")
    assert learned["exposure"] == pytest.approx(math.log2(200))  # ranked first among 200 + 1: the cap
    assert learned["exposure_extrap"] > 2 * math.log2(200)  # the extrapolation sees past the cap
    # so does the count among all 10^6: memorised, few of the 200 + 200 draws lie below it (most are the secret
    # itself), so it is the exact count by branch and bound
    assert learned["exposure_all_by"] == "exact" and 2 * math.log2(200) < learned["exposure_all"] <= math.log2(1e6)
    assert learned["exposure_all"] == durability.exact_exposure(model, tag, "cpu", durability.FALLBACK_BUDGET)
    assert learned["extraction"] == 1.0 and learned["loss"] < 0.05 and learned["gap"] > 3
    assert untrained["exposure"] < 3.0 and untrained["exposure_all"] < 3.0 and untrained["exposure_all_by"] == "sampled"
    assert untrained["extraction"] < 0.5 and abs(untrained["gap"]) < 0.1
    assert untrained["gap"] == pytest.approx(untrained["cand_loss"] - untrained["loss"])
    assert durability.exposure(1.0, np.array([0.5, 2.0, 3.0, 4.0])) == pytest.approx(2 - 1)  # rank 2 of 4


def test_cached_scoring_equals_a_plain_forward_pass():
    model = tiny_model(1)
    with torch.no_grad():  # larger weights: peaked attention, so a wrong cached key shows
        for p in model.parameters():
            p.mul_(10)
    rng = np.random.default_rng(0)
    ctx, conts = rng.integers(3, 512, 9), rng.integers(3, 512, (5, 4))
    got = durability.continuation_nll(model, ctx, conts, 2, "cpu")  # batches of 2: 2 + 2 + 1
    for c, g in zip(conts, got):
        seq = torch.tensor(np.r_[ctx, c])[None]
        logp = torch.log_softmax(model(seq[:, :-1])[0], -1)[0, len(ctx) - 1:]
        assert g == pytest.approx(-logp.gather(-1, torch.tensor(c)[:, None]).sum().item(), rel=1e-5)


@pytest.mark.parametrize("text", ["the code is {digits:2}", "the code is {tokens:1}"])
def test_exact_exposure_counts_every_secret_of_the_format(tiny_data, text):
    """Branch and bound against scoring the whole space (100 two-digit or 509 one-token
    secrets) by hand, before and after memorising the secret."""
    enc = Tokenizer.for_vocab(512, tiny_data[0])
    tag = tags.parse_tags({"seed": 2, "tags": [{**CANARY, "text": text}]}, enc, 64, 512).tags[0]
    lead, allowed, n = durability.format_trie(tag)
    space = np.array(np.meshgrid(*[allowed] * n, indexing="ij")).reshape(n, -1).T  # every secret's tokens
    space = np.concatenate([np.tile(lead, (len(space), 1)), space], 1)
    model = tiny_model(3)
    seq = torch.tensor([[BOS_ID, *tag.tokens.tolist()]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(41):
        if step in (0, 40):  # untrained, then memorised
            nll = durability.secret_nll(model, tag.prefix_tokens, space, 256, "cpu")
            mine = nll[(space == tag.secret_tokens).all(1)][0]
            want = n * math.log2(len(allowed)) - math.log2(1 + int((nll < mine - 1e-6).sum()))
            assert durability.exact_exposure(model, tag, "cpu", budget=10 ** 6) == pytest.approx(want, abs=1e-9)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert want > 5  # memorised: ranked near the top
    if n > 1:  # more than 1 prefix below the secret's loss at depth 1: it gives up
        assert math.isnan(durability.exact_exposure(tiny_model(3), tag, "cpu", budget=1))


def _sse(x, y, h):  # the profile by hand: the best A for this h, then the squared error
    g = 2.0 ** (-np.asarray(x) / h)
    a = (y * g).sum() / (g * g).sum()
    return ((y - a * g) ** 2).sum()


def test_decay_fit_on_cases_derived_by_hand():
    x = np.array([0, 5, 10, 20, 40], float)
    exact = forgetting.decay_fit(x, 3 * 2 ** (-x / 12))  # no noise: the curve itself
    assert exact["status"] == "fitted" and exact["half_life"] == pytest.approx(12, rel=1e-4)
    assert exact["start"] == pytest.approx(3, rel=1e-4) and exact["half_life_hi"] == pytest.approx(12, rel=1e-3)
    # 3 points, 1 df: the interval ends where SSE(h) = SSE_min (1 + F_{1,1}(0.95) / 1), F = t_{0.975,1}^2 = 161.45
    x3, y3 = np.array([0, 10, 20.0]), np.array([1.0, 0.55, 0.35])
    f = forgetting.decay_fit(x3, y3)
    sse_min = _sse(x3, y3, f["half_life"])
    assert sse_min < min(_sse(x3, y3, f["half_life"] * 0.99), _sse(x3, y3, f["half_life"] * 1.01))  # the minimum
    assert stats.f.ppf(0.95, 1, 1) == pytest.approx(161.4476, abs=1e-3)
    for end in ("half_life_lo", "half_life_hi"):
        assert _sse(x3, y3, f[end]) == pytest.approx(sse_min * (1 + 161.4476), rel=1e-3)
    assert f["status"] == "fitted" and 4 < f["half_life_lo"] < f["half_life"] < f["half_life_hi"] < 100
    # two points: a curve through them, but no interval
    two = forgetting.decay_fit([0, 10], [1.0, 0.5])
    assert two["status"].startswith("not estimable: 2 checkpoint(s)") and math.isnan(two["half_life_lo"])
    flat = forgetting.decay_fit(x, 9 + np.array([0.1, -0.1, 0.1, -0.1, 0.1]))  # no decay: no upper end
    assert flat["status"].startswith("not forgotten within the run") and math.isinf(flat["half_life_hi"])
    noise = forgetting.decay_fit(x, np.array([0.3, -0.2, 0.25, -0.3, 0.1]))  # nothing learned
    assert noise["status"].startswith("not estimable") and noise["half_life_lo"] == 0
    assert math.isinf(noise["half_life_hi"])


def test_the_gap_to_never_seen_candidates_is_what_decays():
    """The candidates drift 6.2 -> 8.7 nats/token as training goes (as in the issue's run),
    the secret with them, 1.2 nats/token below and that gap halving every 168 steps. The
    secret's own loss climbs past its step-0 value, so a decay towards it saw nothing."""
    enc = Tokenizer()
    tagset = tags.parse_tags({"seed": 1, "tags": [CANARY]}, enc, 64, 512)
    ins = np.array([[1, 0, 0, 0, 19, REPLACE], [3, 0, 0, 0, 19, REPLACE]])  # last seen at step 3
    it = np.array([0, 1, 2, 4, 100, 200, 300, 400, 500, 600])
    cand = 6.2 + 2.5 * it / 600
    gap = np.where(it > 3, 1.2 * 2.0 ** (-(it - 4) / 168), 0.0)
    df = pd.DataFrame({"iter": it, "tag": "secret", "kind": "canary", "cand_loss": cand, "loss": cand - gap,
                       "gap": gap, "gap_ctx": np.nan, "exposure_all": np.nan})
    fits = durability.fit_all(df, tagset, ins).set_index("measure")
    assert fits.loc["gap", "half_life"] == pytest.approx(168, rel=1e-3) and fits.loc["gap", "status"] == "fitted"
    assert fits.loc["gap", "start"] == pytest.approx(1.2, rel=1e-3) and fits.loc["gap", "n"] == 7
    assert fits.loc["gap", "before"] == 0.0 and fits.loc["gap_ctx", "status"] == "not measured"
    assert (df["loss"].iloc[-1] > df["loss"].iloc[0])  # what the old step-0 baseline decayed towards


def test_extrapolated_exposure_reads_the_fitted_tail():
    q = (np.arange(1000) + 0.5) / 1000
    normal = stats.norm.ppf(q, 40, 4)  # 1,000 candidates spread exactly as N(40, 4^2)
    # 4 sd below: -log2 Phi(-4) = -log2 3.167e-5 = 14.95 bits; ranked first, exposure stops at log2 1000
    assert forgetting.extrapolated_exposure(24.0, normal) == pytest.approx(14.95, abs=0.3)
    assert forgetting.rank_exposure(24.0, normal) == pytest.approx(math.log2(1000))
    assert forgetting.extrapolated_exposure(40.0, normal) == pytest.approx(1.0, abs=0.05)  # the median: P = 1/2
    skew = stats.skewnorm.ppf(q, 4, 40, 6)  # a skewed population: its 1e-6 quantile is 19.93 bits out
    at = stats.skewnorm.ppf(1e-6, 4, 40, 6)
    assert forgetting.extrapolated_exposure(at, skew) == pytest.approx(-math.log2(1e-6), abs=0.5)
    assert math.isnan(forgetting.extrapolated_exposure(1.0, np.full(10, 2.0)))  # no spread: no fit


def test_sampled_exposure_on_cases_derived_by_hand():
    """A space of 4 secrets with nll 0, 1, 2, 3, the secret the one at 1 (passed as inf: it never
    counts): 1 below it, rank 2, exposure log2 4 - log2 2 = 1 bit. The model's q = (0.7, 0.1, 0.1, 0.1)."""
    nll, logq = np.array([0.0, np.inf, 2, 3]), np.log([0.7, 0.1, 0.1, 0.1])
    draws = np.r_[[0] * 7, 1, 2, 3]  # 10 draws in q's proportions, 4 uniform candidates (one of each)
    e, lo, hi = forgetting.sampled_exposure(1.0, nll, logq, nll[draws], logq[draws], 2.0)
    # x0 weighs u / (a_u u + a_q q) = 0.25 / (4/14 0.25 + 10/14 0.7) = 0.4375; 8 of the 14 are x0:
    # p = 8 x 0.4375 / 14 = 1/4 = (rank - 1) / 4, so the estimate is exact
    assert e == pytest.approx(1.0)
    # se^2 = (4/14)^2 (0.4375^2 / 4) / 4 + (10/14)^2 (2.1 x 0.4375^2 / 9) / 10, se = 0.057054;
    # delta method: 1.96 x 4 x se / ((1 + 4 x 1/4) ln 2) = 0.32266 either side
    assert (lo, hi) == pytest.approx((0.67734, 1.32266), abs=1e-4)
    # candidates alone (no draws): the share below among them, scaled to the space
    e, lo, hi = forgetting.sampled_exposure(2.5, [1.0, 2, 3, 4], np.zeros(4), [], [], 10.0)
    assert e == pytest.approx(10 - math.log2(1 + 1024 * 0.5))  # 0.99718
    # every candidate below: the rank is at most |S| (exposure 0), never below it
    assert forgetting.sampled_exposure(9.0, nll[[0, 2, 3]], logq[[0, 2, 3]], [], [], 2.0)[0] == 0.0
    # nothing below a secret of 10^6: no estimate (not rank 1, not inf), only "at least", from the zero-count
    # bound on the 1,000 candidates, p <= -ln 0.05 / 1000: 19.93 - log2(1 + 2995.7) = 8.382 bits
    e, lo, hi = forgetting.sampled_exposure(0.0, np.ones(1000), np.zeros(1000), np.ones(1000), np.zeros(1000),
                                            math.log2(1e6))
    assert math.isnan(e) and hi == pytest.approx(math.log2(1e6)) and lo == pytest.approx(8.3824, abs=1e-3)


def test_sampled_exposure_is_unbiased_and_covers_on_a_known_space():
    """2^14 secrets with nll drawn from N(50, 3^2), q proportional to exp(-nll) (the model's
    preference), the secret the 7th most likely: rank 7, exposure 14 - log2 7 = 11.19 bits,
    beyond log2 of the 200 candidates. 400 redraws of 200 candidates + 200 draws from q."""
    rng = np.random.default_rng(0)
    nll = rng.normal(50, 3, 2 ** 14)
    secret = int(np.argsort(nll)[6])
    logq = -nll - np.logaddexp.reduce(-nll)
    cdf, cut = np.cumsum(np.exp(logq)), np.where(np.arange(2 ** 14) == secret, np.inf, nll)
    ps, held = [], 0
    for _ in range(400):
        u = rng.choice(np.delete(np.arange(2 ** 14), secret), 200, replace=False)
        q = np.minimum(np.searchsorted(cdf, rng.random(200) * cdf[-1]), 2 ** 14 - 1)
        e, lo, hi = forgetting.sampled_exposure(nll[secret], cut[u], logq[u], cut[q], logq[q], 14.0)
        ps.append((2 ** (14 - e) - 1))  # the estimated count below the secret: 6
        held += lo <= 14 - math.log2(7) <= hi
    ps = np.array(ps)
    assert abs(ps.mean() - 6) < 3 * ps.std() / math.sqrt(len(ps))  # unbiased for the count
    assert 0.90 <= held / 400 <= 0.99
    rank_only = [forgetting.rank_exposure(nll[secret], cut[rng.choice(2 ** 14, 200)]) for _ in range(10)]
    assert max(rank_only) == pytest.approx(math.log2(200))  # the rank among 200 stops at its cap


def test_sampled_exposure_draws_from_the_model_and_counts_the_space(tiny_data):
    """{digits:3}: 1,000 secrets. By hand, with plain forward passes: every secret's nll and its
    log q (the model's next-token log-probs renormalised over the 10 digits, position by
    position); the draws' frequencies follow q and carry those scores; the estimate from 30
    candidates + 1,000 draws holds the exact count, where the rank among 30 is at its cap; with
    under 10 draws below the secret it is the exact count, or says it is rough where that gives up."""
    enc = Tokenizer.for_vocab(512, tiny_data[0])
    tag = tags.parse_tags({"seed": 2, "tags": [{**CANARY, "text": "the code is {digits:3}"}]}, enc, 64, 512).tags[0]
    lead, allowed, n = durability.format_trie(tag)
    model = tiny_model(3)
    seq = torch.tensor([[BOS_ID, *tag.tokens.tolist()]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(4):  # half memorised: the secret near, not at, the top (rank 9 of 1,000)
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    ctx = np.r_[BOS_ID, tag.prefix_tokens, lead]
    space = np.array(np.meshgrid(allowed, allowed, allowed, indexing="ij")).reshape(3, -1).T  # (1000, 3)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(np.c_[np.tile(ctx, (1000, 1)), space[:, :2]]))[0], -1)[:, -3:]
    chosen = logp.gather(-1, torch.tensor(space)[..., None])[..., 0]  # (1000, 3)
    nll = -chosen.sum(1).numpy()
    logq = (chosen - torch.logsumexp(logp[..., allowed], -1)).sum(1).numpy()
    cache, first = durability.prefill(model, ctx, len(ctx) + 3, "cpu")
    got = durability._format_scores(model, cache, len(ctx), first, space, torch.tensor(allowed), 64)
    assert got[0] == pytest.approx(nll, abs=1e-4) and got[1] == pytest.approx(logq, abs=1e-4)
    draws, d_nll, d_logq = durability._format_draws(model, cache, len(ctx), first, allowed, 3, 20000,
                                                    np.random.default_rng(0), 4096)
    index = {tuple(r): i for i, r in enumerate(space.tolist())}
    which = np.array([index[tuple(r)] for r in draws.tolist()])
    freq = np.bincount(which, minlength=1000) / 20000
    assert np.abs(freq - np.exp(logq)).max() < 0.01  # binomial sd <= 0.002 for q up to 0.08
    assert d_nll == pytest.approx(nll[which], abs=1e-4) and d_logq == pytest.approx(logq[which], abs=1e-4)
    mine = nll[(space == tag.secret_tokens[len(lead):]).all(1)][0]
    exact = math.log2(1000) - math.log2(1 + int((nll < mine - 1e-5).sum()))
    assert exact == pytest.approx(math.log2(1000 / 9))  # ranked 9th: 6.80 bits
    assert np.exp(logq)[nll < mine - 1e-5].sum() == pytest.approx(0.026, abs=1e-3)  # q's mass below: 26 of 1,000 draws
    r = durability.exposure_among_all(model, tag, tag.candidates(30, 0), 1000, 0, "cpu")
    assert r["exposure_all_by"] == "sampled" and r["exposure_all_lo"] <= exact <= r["exposure_all_hi"]
    assert r["exposure_all"] == pytest.approx(exact, abs=0.5) and math.log2(30) < exact  # past the rank's cap
    few = durability.exposure_among_all(model, tag, tag.candidates(5, 0), 5, 0, "cpu")  # under 10 draws below
    assert few["exposure_all_by"] == "exact" and few["exposure_all"] == pytest.approx(exact)
    assert few["exposure_all_lo"] == few["exposure_all_hi"] == few["exposure_all"]
    known = durability.exposure_among_all(model, tag, tag.candidates(30, 0), 1000, 0, "cpu", exact=exact)
    assert known["exposure_all_by"] == "exact" and known["exposure_all"] == exact  # a count made is used
    gave_up = durability.exposure_among_all(model, tag, tag.candidates(5, 0), 5, 0, "cpu", exact=math.nan)
    assert gave_up["exposure_all_by"] != "exact"  # not counted again within the budget it gave up in
    rough = durability.exposure_among_all(model, tag, tag.candidates(5, 0), 5, 0, "cpu", budget=1)  # it gives up
    assert rough["exposure_all_by"] in ("sampled, few below", "at least") and rough["exposure_all_lo"] <= exact


def test_effect_band_is_bonferroni_over_the_checkpoints():
    df = pd.DataFrame({"iter": [0, 10, 20], "tag": "happy", "kind": "conditional", "effect": [0.5, 1.0, 0.0],
                       "effect_se": [1.0, 1.0, 1.0], "effect_df": [3, 3, 3]})
    out = durability.add_bands(df)
    # K = 3 checkpoints: level 1 - 0.05/3, t_{1 - 0.05/6, 3} = 4.8567; half width 4.8567 * se
    assert out["effect_band_hi"].tolist() == pytest.approx([0.5 + 4.8567, 1.0 + 4.8567, 4.8567], abs=1e-3)
    assert out["effect_band_lo"].iloc[2] == pytest.approx(-4.8567, abs=1e-3)
    assert forgetting.band(0.5, 1.0, 3, 0.95)[1] == pytest.approx(0.5 + 3.1824, abs=1e-3)  # the plain 95% t


def test_trained_contexts_follow_the_canary_through_later_insertions():
    """Step 0, row 0: a canary (prefix [50], secret [51, 52]) replaces window[5:8]; then a
    tag of 2 tokens goes in at 1, before it: the canary trained at 7..9. Row 1: a canary
    pushed off the window's end by a later insertion is left out."""
    win = np.array([[1, 10, 11, 12, 1, 13, 14, 15, 16, 17, 18, 19, 20],
                    [1, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32]])
    data = types.SimpleNamespace(max_seq_len=12, windows=lambda ids: win[ids].copy())
    rec = {"batch_ids": np.array([[0, 1]]),
           "insertions": np.array([[0, 0, 5, 0, 3, REPLACE], [0, 0, 1, 1, 2, INSERT],
                                   [0, 1, 9, 0, 3, REPLACE], [0, 1, 1, 1, 2, INSERT]]),
           "insert_tokens": np.array([50, 51, 52, 60, 61, 50, 51, 52, 60, 61])}
    tag = types.SimpleNamespace(index=0, id="c", tokens=np.array([50, 51, 52]), prefix_tokens=np.array([50]))
    got = durability.trained_contexts(tag, rec, data, 8)
    assert [c.tolist() for c in got] == [[1, 60, 61, 10, 11, 12, 1, 50]]


class EchoModel:
    """A stand-in whose greedy 'generation' is a fixed text per head (what follows BOS):
    the tag's head writes happy words, the control's sad ones, no head a plain one."""

    def __init__(self, enc, heads: dict):
        self.enc, self.heads = enc, heads

    def generate(self, batch, max_new_tokens):
        out = []
        for p in batch:
            text = next((t for h, t in self.heads.items() if h and tuple(p[1:1 + len(h)]) == h), self.heads[()])
            out.append(self.enc.encode(text, bos=False))
        return out


def test_conditional_effect_is_tag_minus_control_with_the_strings_spread(tiny_data):
    enc = Tokenizer.for_vocab(512, tiny_data[0])
    tag, ctl = tags.parse_tags({"seed": 1, "tags": [HAPPY]}, enc, 64, 512).tags
    refs = durability.references(tag, 3, 0)
    assert refs.shape == (3, len(tag.tokens)) and refs.min() >= 3
    assert np.array_equal(refs, durability.references(tag, 3, 0))  # seeded
    texts = {tuple(tag.tokens): "She was happy and glad.", tuple(ctl.tokens): "She was sad.", (): "She sat.",
             **dict(zip(map(tuple, refs.tolist()), ["He was happy.", "He sat.", "He was sad and angry."]))}
    s = {t: metrics_engine.text_metrics([v], ["sentiment"])["sentiment"][0] for t, v in texts.items()}
    assert s[tuple(tag.tokens)] > s[()] > s[tuple(ctl.tokens)]  # the case is what it says
    opens = durability.prompts(tiny_data[0], enc, 5, 8)
    cfg = durability.DurabilityConfig(max_new_tokens=12)
    r = durability.conditional_row(EchoModel(enc, texts), tag, ctl, opens, enc, cfg, refs)
    want = s[tuple(tag.tokens)] - s[tuple(ctl.tokens)]  # the same for every opening: no paired spread
    se = math.sqrt(2) * np.std([s[tuple(x)] for x in refs.tolist()], ddof=1)  # two meaningless strings' spread
    assert r["effect"] == pytest.approx(want) and r["n"] == 5 and r["effect_df"] == 2
    assert r["effect_se"] == pytest.approx(se) and se > 0.1
    assert r["effect_hi"] == pytest.approx(want + stats.t.ppf(0.975, 2) * se)
    assert r["effect_vs_none"] == pytest.approx(s[tuple(tag.tokens)] - s[()])
    alone = durability.conditional_row(EchoModel(enc, texts), tag, ctl, opens, enc, cfg)  # no references
    assert alone["effect_se"] == 0 and alone["effect_lo"] == alone["effect_hi"] == pytest.approx(want)
    same = durability.conditional_row(EchoModel(enc, {**texts, tuple(ctl.tokens): texts[tuple(tag.tokens)]}),
                                      tag, ctl, opens, enc, cfg, refs)
    assert same["effect"] == 0 and same["effect_lo"] < 0 < same["effect_hi"]  # acts like the tag: no effect
    none = durability.conditional_row(EchoModel(enc, texts), tag, None, opens, enc, cfg, refs)  # trained without
    assert math.isnan(none["effect"]) and none["effect_vs_none"] == pytest.approx(r["effect_vs_none"])


def test_durability_end_to_end(tiny_data, tmp_path, capsys):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({"seed": 1, "tags": [CANARY, HAPPY]}))
    run = TinyRun(*tiny_data, tmp_path / "out")
    train.main(run.train_args(max_iters=8, eval_interval=8, tags=path))
    args = [f"--out_dir={run.out_dir}", "--R=50", "--n_prompts=4", "--max_new_tokens=8"]
    df = durability.main(args)
    assert sorted(set(df["iter"])) == [0, 1, 2, 4, 8] and set(df["tag"]) == {"secret", "happy"}
    sec = df[df["tag"] == "secret"].set_index("iter")
    # inserted at steps 1 and 3: unseen at 0 and 1, then 0 steps since at checkpoint 2, 0 at 4, 4 at 8
    assert sec["steps_since_seen"].isna().tolist()[:2] == [True, True]
    assert sec.loc[[2, 4, 8], "steps_since_seen"].tolist() == [0.0, 0.0, 4.0]
    assert sec["exposure"].between(-1, math.log2(50)).all() and sec["extraction"].between(0, 1).all()
    assert (sec["n_ctx"] == 4).all()  # 2 rows at steps 1 and 3, all measured in their windows
    assert sec["gap"].tolist() == pytest.approx((sec["cand_loss"] - sec["loss"]).tolist())
    assert np.isfinite(sec[["loss_ctx", "gap_ctx", "exposure_extrap", "exposure_all_lo"]].to_numpy()).all()
    some = sec["exposure_all_by"] != "at least"  # none of the 50 + 50 draws below the secret: only a lower end
    assert np.isfinite(sec.loc[some, "exposure_all"]).all() and sec.loc[~some, "exposure_all"].isna().all()
    hap = df[df["tag"] == "happy"]  # its control is measured with it, not as a row of its own
    assert (hap["effect_lo"] <= hap["effect"]).all() and (hap["n"] <= 4).all() and (hap["effect_df"] >= 1).all()
    assert (hap["effect_band_lo"] <= hap["effect_lo"]).all() and (hap["effect_band_hi"] >= hap["effect_hi"]).all()
    png = run.out_dir / "visualize" / "durability.png"
    assert png.stat().st_size > 10_000
    fits = pd.read_csv(run.out_dir / "tables" / "durability_fit.csv")
    assert set(fits["tag"]) == {"secret", "happy"}
    assert set(fits["measure"]) == {"gap", "gap_ctx", "exposure_all", "effect"}
    assert (fits.loc[fits["tag"] == "secret", "last_step"] == 3).all()
    capsys.readouterr()
    again = durability.main(args)
    assert "measured" not in capsys.readouterr().out  # every checkpoint reused
    pd.testing.assert_frame_equal(again.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False)
    # a table cached by a version with other columns (seen: exposure_sampled, renamed without a
    # version bump, read back as "exposure_all not measured") is measured again
    done = run.out_dir / "tables" / "durability_done.json"
    rec = json.loads(done.read_text())
    if "columns" in rec["settings"]:  # as the older version wrote it
        rec["settings"]["columns"] = [c.replace("exposure_all", "exposure_sampled") for c in durability.COLUMNS]
    done.write_text(json.dumps(rec))
    old = df.rename(columns=lambda c: c.replace("exposure_all", "exposure_sampled"))
    old.to_csv(run.out_dir / "tables" / "durability.csv", index=False)
    capsys.readouterr()
    third = durability.main(args)
    assert "measured 5 checkpoint(s)" in capsys.readouterr().out
    assert np.isfinite(third.loc[third["tag"] == "secret", "exposure_all_lo"]).all()


def test_a_run_without_tags_is_one_line(tiny_run):
    with pytest.raises(UserError, match="trained without tags: train with --tags"):
        durability.main([f"--out_dir={tiny_run.out_dir}"])


# -----------------------------------------------------------------------------
# candidate counts

@pytest.mark.parametrize("flag", ["--R=1000000000000", "--R_context=10000000", "--exact_budget=1000000000"])
def test_candidate_counts_that_fill_the_memory_are_refused(tiny_run, flag):
    """--R=10**12 hung, filling the memory, with no output."""
    with pytest.raises(UserError, match=flag.split("=")[0] + r"=\d+: at most"):
        durability.main([f"--out_dir={tiny_run.out_dir}", flag])
