"""
The estimators behind durability.py, free of models and files, each checked on planted
truth in bench/validity_durability.py (`make validity`):

$ python -c "from prebias import forgetting as f; print(f.decay_fit([0, 25, 50, 75, 100], [1.0, .71, .49, .36, .25]))"

  decay_fit             y = base + A * 2^(-(x - x0) / h) + e, e iid normal with an unknown sd; x are
                        steps since the tag was last seen, x0 the first of them, base the value that
                        means "forgotten" (known: 0 for a gap between a secret and never-seen ones).
                        A and h by least squares (= maximum likelihood); h's interval by profile
                        likelihood with the F quantile that an unknown sd calls for (Bates & Watts 1988,
                        sec. 6.1; Venables & Ripley's profile intervals):
                            { h : (SSE(h) - SSE_min) / (SSE_min / (n - 2)) <= F_{1, n-2}(level) }
                        where SSE(h) is minimised over A (a closed form). The set can be open: [lo, inf)
                        ("not forgotten within the run": the data fit no decay as well as any) or
                        [0, inf) ("not estimable": they fit every half-life). n < 3 gives no interval.
  rank_exposure         log2(R) - log2(rank) of the secret among itself and R candidates (Carlini et
                        al. 2019, def. 4): at most log2(R), 9.97 bits at R = 1,000
  extrapolated_exposure -log2 P(X <= secret nll), X skew-normal fitted (maximum likelihood) to the R
                        candidates' nll (Carlini et al. 2019, sec. 4.3 "approximating exposure via
                        distribution modeling"): not capped by R; 1 / ln 2 = 1.44 bits expected for a
                        secret the model has never seen (P is then uniform)
  sampled_exposure      log2|S| - log2(estimated rank of the secret among every secret of the format S), the
                        rank by importance sampling (Kahn & Marshall 1953; Owen 2013, "Monte Carlo theory,
                        methods and examples", ch. 9): the R uniform candidates plus R draws from the model
                        itself restricted to the format, combined by the balance heuristic (Veach & Guibas
                        1995; Owen & Zhou 2000, "safe and effective importance sampling"). Unbiased for the
                        count below the secret, at most log2|S| (19.93 bits for 6 digits), with a 95%
                        interval, "at least" where no draw falls below the secret; durability.py's
                        exposure_all (against all 10^6 secrets: bench/validity_durability.py)
  band                  a t interval from (mean, se, df) at a given level; durability.py uses it at
                        0.95 per checkpoint and 1 - 0.05 / K over K checkpoints (Bonferroni: all K
                        hold together with >= 95%)
"""

import math

import numpy as np
from scipy import optimize, stats

from prebias.common import LEVEL

UNSEEN_EXPOSURE = 1 / math.log(2)  # E[-log2 U], U uniform: a never-seen secret's expected exposure


# -----------------------------------------------------------------------------
# the forgetting curve

def _sse(t: np.ndarray, z: np.ndarray, h) -> tuple[np.ndarray, np.ndarray]:
    """(SSE, A) of z ~ A 2^(-t/h) at each h (an array; 0 and inf allowed), A at its best."""
    h = np.atleast_1d(np.asarray(h, float))
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.exp2(-t[None, :] / h[:, None])  # (H, n)
    g[h == 0] = (t == 0)  # the limit h -> 0: only the first point keeps its value
    g[np.isinf(h)] = 1.0
    gg, zg = (g * g).sum(1), (g * z[None, :]).sum(1)
    a = np.where(gg > 0, zg / np.where(gg > 0, gg, 1), 0.0)
    return np.maximum((z * z).sum() - a * zg, 0.0), a


def _edge(t, z, thr, inside_h: float, outside_h: float) -> float:
    """The h between an inside and an outside grid point where SSE(h) = thr (in log h)."""
    f = (lambda u: _sse(t, z, math.exp(u))[0][0] - thr)
    return math.exp(optimize.brentq(f, math.log(inside_h), math.log(outside_h), xtol=1e-6))


def decay_fit(x, y, base: float = 0.0, level: float = LEVEL) -> dict:
    """Fit y = base + A 2^(-(x - x0)/h) (see the module docstring). Returns half_life,
    half_life_lo, half_life_hi (inf where open), start (the fitted value at x0), sd (of the
    residuals, n - 2 df), n, span and status."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    order = np.argsort(x)
    x, y = x[order], y[order]
    n = len(x)
    out = {"half_life": math.nan, "half_life_lo": math.nan, "half_life_hi": math.nan, "start": math.nan,
           "sd": math.nan, "n": n, "span": float(x[-1] - x[0]) if n else math.nan}
    if n < 3:
        return {**out, "status": f"not estimable: {n} checkpoint(s) after the last insertion (an interval needs 3)"}
    t, z = x - x[0], y - base
    dt = np.diff(t)
    hs = np.logspace(math.log10(dt[dt > 0].min() / 64), math.log10(t[-1] * 4096), 400)
    sse, _ = _sse(t, z, hs)
    ends, _ = _sse(t, z, [0.0, math.inf])
    best = int(np.argmin(sse))
    h_best, sse_min = hs[best], sse[best]
    if 0 < best < len(hs) - 1:  # refine between the grid neighbours
        r = optimize.minimize_scalar(lambda u: _sse(t, z, math.exp(u))[0][0], method="bounded",
                                     bounds=(math.log(hs[best - 1]), math.log(hs[best + 1])))
        if r.fun < sse_min:
            h_best, sse_min = math.exp(r.x), r.fun
    for h_end, s_end in zip((0.0, math.inf), ends):
        if s_end < sse_min:
            h_best, sse_min = h_end, s_end
    if 0 < h_best < math.inf:  # the grid holds the best h, so the set below is never empty
        hs = np.sort(np.append(hs, h_best))
        sse, _ = _sse(t, z, hs)
    scale = max(float((z * z).sum()), 1e-300)
    thr = sse_min * (1 + stats.f.ppf(level, 1, n - 2) / (n - 2)) + 1e-12 * scale
    inside = np.flatnonzero(sse <= thr)
    if len(inside):
        i, j = inside.min(), inside.max()  # the hull, should the set have holes
        lo = 0.0 if (i == 0 and ends[0] <= thr) else (hs[i] if i == 0 else _edge(t, z, thr, hs[i], hs[i - 1]))
        hi = math.inf if (j == len(hs) - 1 and ends[1] <= thr) else \
            (hs[j] if j == len(hs) - 1 else _edge(t, z, thr, hs[j], hs[j + 1]))
    else:  # h_best is 0 or inf and no grid point comes close
        lo = hi = h_best
    a = _sse(t, z, h_best)[1][0]
    out.update(half_life=float(h_best), half_life_lo=float(min(lo, h_best)), half_life_hi=float(max(hi, h_best)),
               start=float(base + a), sd=float(math.sqrt(sse_min / (n - 2))))
    if out["half_life_lo"] == 0 and math.isinf(out["half_life_hi"]):
        out["status"] = "not estimable: the data fit every half-life from 0 to infinity (too noisy, or nothing learned)"
    elif math.isinf(out["half_life_hi"]):
        out["status"] = f"not forgotten within the run (half-life at least {out['half_life_lo']:.0f} steps)"
    else:
        out["status"] = "fitted"
    return out


def decay_curve(x, fit: dict, base: float, x0: float) -> np.ndarray:
    """The fitted curve of decay_fit at x (NaN where there is no fit)."""
    x = np.asarray(x, float)
    h, start = fit.get("half_life", math.nan), fit.get("start", math.nan)
    if not (np.isfinite(start) and h == h):
        return np.full(len(x), math.nan)
    g = np.ones(len(x)) if math.isinf(h) else (np.exp2(-(x - x0) / h) if h > 0 else (x == x0).astype(float))
    return base + (start - base) * g


# -----------------------------------------------------------------------------
# exposure

def rank_exposure(secret_nll: float, cand_nll: np.ndarray) -> float:
    """log2(R) - log2(rank of the secret among itself and the R candidates)."""
    rank = 1 + int((np.asarray(cand_nll) < secret_nll).sum())
    return math.log2(len(cand_nll)) - math.log2(rank)


def extrapolated_exposure(secret_nll: float, cand_nll: np.ndarray) -> float:
    """-log2 of the secret's tail probability under a skew-normal fitted to the candidates."""
    c = np.asarray(cand_nll, float)
    c = c[np.isfinite(c)]
    if len(c) < 3 or not c.std() > 0 or not math.isfinite(secret_nll):
        return math.nan
    a, loc, scale = stats.skewnorm.fit(c)
    logp = float(stats.skewnorm.logcdf(secret_nll, a, loc, scale))
    return -logp / math.log(2) if math.isfinite(logp) else math.inf


def sampled_exposure(secret_nll: float, unif_nll, unif_logq, draw_nll, draw_logq, log2_space: float,
                     level: float = LEVEL) -> tuple[float, float, float]:
    """(exposure, lo, hi) of the secret over the whole space S of its format (Carlini et al.
    2019, def. 4: log2|S| - log2 rank, rank 1 + #{x in S: nll(x) < nll(secret)}), the count
    estimated by importance sampling. unif_*: n_u candidates drawn uniformly from S (u = 1/|S|),
    draw_*: n_q draws from q, the model's next-token distribution renormalised over the format's
    tokens; logq: log q of each. Every draw x_i of either kind is weighted by the deterministic
    mixture of the two (the balance heuristic, Veach & Guibas 1995; Owen & Zhou 2000):
        p = (1/N) sum_i 1{nll_i < secret_nll} u / (a_u u + a_q q(x_i)),  a = n/N, N = n_u + n_q
    is unbiased for P_u(nll(X) < secret_nll) = (rank - 1) / |S|. Each weight is at most 1/a_u
    (2 with as many draws as candidates), and the variance is within (1/min n - 1/N) p^2 of any
    other weighting of the same draws, the candidates alone included (Veach & Guibas, thm. 1).
    se from each group's sample variance (sum_j a_j^2 s_j^2 / n_j); the interval is the delta
    method on the log scale; estimate and interval lie within [0, log2|S|]. With no draw below
    the secret there is no estimate, only "at least lo" (NaN, lo, log2|S|), lo from the uniform
    draws alone (p <= -ln(1 - level) / n_u, the zero-count bound: 3/n_u at 95%). Pass nll
    strictly below the secret's only for what should count (ties, the secret itself: inf)."""
    un, ul = np.asarray(unif_nll, float), np.asarray(unif_logq, float)
    dn, dl = np.asarray(draw_nll, float), np.asarray(draw_logq, float)
    n_u, n_q = len(un), len(dn)
    if n_u + n_q == 0 or not math.isfinite(secret_nll):
        return math.nan, math.nan, math.nan
    a_u, a_q, log_s = n_u / (n_u + n_q), n_q / (n_u + n_q), log2_space * math.log(2)
    groups = []
    for nll, logq in ((un, ul), (dn, dl)):  # weight u / (a_u u + a_q q) = 1 / (a_u + a_q q / u)
        w = 1.0 / (a_u + a_q * np.exp(np.minimum(logq + log_s, 700.0)))
        groups.append(np.where(nll < secret_nll, w, 0.0))
    size = 2.0 ** log2_space
    p = min(float(np.concatenate(groups).mean()), 1 - 1 / size)  # the rank is at most |S|
    var = sum(a * a * g.var(ddof=1) / len(g) for a, g in zip((a_u, a_q), groups) if len(g) > 1)
    est = log2_space - math.log2(1 + size * p)
    z = float(stats.norm.ppf(0.5 + level / 2))
    if p > 0:
        half = z * size * math.sqrt(var) / ((1 + size * p) * math.log(2))
        return est, max(est - half, 0.0), min(est + half, log2_space)
    lo = log2_space - math.log2(1 + size * -math.log(1 - level) / n_u) if n_u else 0.0
    return math.nan, max(lo, 0.0), log2_space


# -----------------------------------------------------------------------------
# intervals of a mean

def band(mean: float, se: float, df: int, level: float) -> tuple[float, float]:
    """mean +- t_{(1+level)/2, df} se; NaN without a standard error or df < 1."""
    if not (df >= 1 and np.isfinite(se) and np.isfinite(mean)):
        return math.nan, math.nan
    h = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return mean - h, mean + h
