"""make validity, area stats: the tests between arms and the intervals of prebias/stats.py
on simulated experiments whose truth is known (see bench/validity.py).

The simulated experiment: a metric of arm a at seed s is mu_a + u_s + e_as, with a seed
effect u_s ~ N(0, 0.3^2) shared by the arms (same initialisation and data order per
seed) and run noise e_as ~ N(0, 0.05^2), as in the README's worked example where the
seed spread swamps the ordering effect.
"""

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

from prebias import stats
from validity import Line

SEED_SD, NOISE_SD = 0.3, 0.05
# replicates per check and size (validity.SIZES): full, quick, smoke
REPS = {"t_interval": (20000, 2000, 60), "type_one": (2000, 500, 20), "welch": (2000, 500, 20),
        "simultaneous": (1000, 300, 5), "holm": (20000, 2000, 60), "mdd": (4000, 1000, 40)}


def n_reps(check: str, size: str) -> int:
    return REPS[check][("full", "quick", "smoke").index(size)]


def _arms(rng, n_seeds: int, delta: float, reps: int, shared: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(baseline, arm) values (reps, n_seeds); shared=False: each arm has seeds of its own
    (an unpaired design)."""
    u = rng.normal(0, SEED_SD, (reps, n_seeds))
    v = u if shared else rng.normal(0, SEED_SD, (reps, n_seeds))
    return u + rng.normal(0, NOISE_SD, (reps, n_seeds)), v + delta + rng.normal(0, NOISE_SD, (reps, n_seeds))


def _rate(p: np.ndarray, alpha: float = 0.05) -> float:
    return float(np.mean(np.asarray(p) < alpha))


def _pvalues(name: str, base: np.ndarray, arm: np.ndarray) -> np.ndarray:
    seeds = np.arange(base.shape[1])
    fn = stats.TESTS[name]
    return np.array([fn(pd.Series(b, index=seeds), pd.Series(a, index=seeds), 0.95)["p"] for b, a in zip(base, arm)])


def t_interval_coverage(size: str) -> list[Line]:
    rng, reps, out = np.random.default_rng(1), n_reps("t_interval", size), []
    for n in (3, 5, 10):
        x = rng.normal(2.5, 0.3, (reps, n))
        ok = 0
        for row in x:
            _, _, _, lo, hi = stats.mean_interval(row)
            ok += lo <= 2.5 <= hi
        cov = ok / reps
        out.append(Line(f"stats.mean_interval 95% t interval, n={n} seeds (normal values)", "mean 2.5",
                        f"coverage {cov:.3f} over {reps} replicates", 0.93 <= cov <= 0.97, "coverage in [0.93, 0.97]"))
    return out


def type_one_error_and_power(size: str) -> list[Line]:
    """Each test on the design it is for: the paired ones on arms that share their seeds,
    the unpaired ones on arms with seeds of their own."""
    rng, reps, out = np.random.default_rng(2), n_reps("type_one", size), []
    n = 8  # seeds: the exact sign-flip test cannot go below 2 / 2^n (n = 5: 0.0625 > 0.05)
    for name, fn in stats.TESTS.items():
        design = "seed-correlated (shared seeds)" if fn.paired else "independent (seeds of their own)"
        delta = 0.06 if fn.paired else 0.4
        base, arm = _arms(rng, n, 0.0, reps, shared=fn.paired)
        base1, arm1 = _arms(rng, n, delta, reps, shared=fn.paired)
        t1, power = _rate(_pvalues(name, base, arm)), _rate(_pvalues(name, base1, arm1))
        out.append(Line(f"stats.TESTS[{name!r}] type I error at alpha 0.05, {n} seeds per arm, {design}",
                        "no difference", f"type I {t1:.3f}; power {power:.2f} at a true difference of {delta} "
                        f"(seed sd {SEED_SD}, noise sd {NOISE_SD}), {reps} replicates", 0.03 <= t1 <= 0.07,
                        "type I in [0.03, 0.07]"))
    return out


def paired_beats_welch(size: str) -> list[Line]:
    """On shared seeds Welch's variance holds the seed spread the arms share, so it is far
    too conservative there: the paired test sees a difference Welch cannot."""
    rng, reps = np.random.default_rng(3), n_reps("welch", size)
    base0, arm0 = _arms(rng, 5, 0.0, reps)
    base, arm = _arms(rng, 5, 0.15, reps)
    pw, pp = _rate(_pvalues("welch", base, arm)), _rate(_pvalues("paired", base, arm))
    t1w = _rate(_pvalues("welch", base0, arm0))
    return [Line("paired vs Welch on seed-correlated arms, 5 seeds, true difference 0.15", "the arm is 0.15 higher",
                 f"power: paired {pp:.2f}, Welch {pw:.2f}; Welch's type I there {t1w:.3f} ({reps} replicates)",
                 pp > 0.9 and pw < 0.3, "paired sees it (power > 0.9), Welch does not (< 0.3)")]


def simultaneous_coverage(size: str) -> list[Line]:
    """A family of m = 10 metrics, each with a true difference: how often all 10
    intervals hold their truths at once."""
    rng, reps, m, n = np.random.default_rng(4), n_reps("simultaneous", size), 10, 5
    truth = np.linspace(-0.1, 0.1, m)
    all_sim = all_raw = 0
    for _ in range(reps):
        rows = []
        u = rng.normal(0, SEED_SD, n)
        for k in range(m):
            for arm, shift in (("base", 0.0), ("x", truth[k])):
                for s in range(n):
                    rows.append({"arm": arm, "seed": s, "iter": 1, "metric": f"m{k}",
                                 "v": u[s] + shift + rng.normal(0, NOISE_SD)})
        df = pd.DataFrame(rows).pivot_table(index=["arm", "seed", "iter"], columns="metric", values="v").reset_index()
        names = [f"m{k}" for k in range(m)]
        d = stats.difference_table(df, names, ["base", "x"], "base", {c: "output" for c in names}).set_index("metric")
        all_sim += all(d.loc[c, "lo_sim"] <= truth[k] <= d.loc[c, "hi_sim"] for k, c in enumerate(names))
        all_raw += all(d.loc[c, "lo"] <= truth[k] <= d.loc[c, "hi"] for k, c in enumerate(names))
    cs, cr = all_sim / reps, all_raw / reps
    return [Line(f"simultaneous 95% intervals (Bonferroni) over a family of {m} metrics, {n} seeds, paired",
                 "10 known differences", f"all 10 covered together in {cs:.3f} of {reps} replicates (the unadjusted "
                 f"95% intervals: {cr:.3f})", 0.94 <= cs <= 0.995, "family coverage in [0.94, 0.995]")]


def holm_family_error(size: str) -> list[Line]:
    rng, reps, m = np.random.default_rng(5), n_reps("holm", size), 12
    p = rng.uniform(size=(reps, m))  # every null true: p uniform
    fwer = float(np.mean([(stats.holm(row) < 0.05).any() for row in p]))
    return [Line(f"stats.holm over {m} true nulls", "no effect anywhere", f"family-wise error {fwer:.3f} ({reps} "
                 "replicates)", fwer <= 0.06, "family-wise error <= 0.05 (+ 0.01 for simulation error)")]


def mdd_power(size: str) -> list[Line]:
    """At a true difference equal to the design's mdd80 (computed from the true spread),
    the paired test at the same level rejects about 80% of the time."""
    rng, reps, n, alpha = np.random.default_rng(6), n_reps("mdd", size), 5, 0.05 / 12
    sd_d = NOISE_SD * math.sqrt(2)
    delta = stats.mdd({"se": sd_d / math.sqrt(n), "df": n - 1}, alpha)
    base, arm = _arms(rng, n, delta, reps)
    power = _rate(_pvalues("paired", base, arm), alpha)
    exact = float(sps.nct.sf(sps.t.ppf(1 - alpha / 2, n - 1), n - 1, delta / (sd_d / math.sqrt(n))))
    return [Line(f"stats.mdd: power at the 80% minimum detectable difference, {n} seeds, alpha 0.05/12", "power 0.80",
                 f"power {power:.3f} ({reps} replicates; the noncentral t gives {exact:.3f})", 0.76 <= power <= 0.84,
                 "power in [0.76, 0.84]")]


def checks(size: str) -> list[Line]:
    out = []
    for fn in (t_interval_coverage, type_one_error_and_power, paired_beats_welch, simultaneous_coverage,
               holm_family_error, mdd_power):
        out += fn(size)
    return out
