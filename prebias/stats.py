"""
Statistics over seeds, for experiments (experiment.py, report.py): a mean with its t
interval, the difference of an arm from the baseline arm with Welch's interval and
p-value, an exact permutation test, Holm's adjustment across metrics, and the
experiment's aggregate tables built from each run's tables/summary.csv.

$ python -c "from prebias import stats; print(stats.mean_interval([1.0, 2.0, 3.0]))"    # n, mean, sd, lo, hi

Definitions (n seeds per arm; NaN values are dropped first). A test between arms is one
registered unit of TESTS; each gives the difference, its interval and a p-value:
  mean_interval   mean +- t_{0.975, n-1} * sd / sqrt(n), sd with n - 1 (n = 1: no interval)
  paired          (default when every arm has the same seeds: seed s of every arm shares
                  its initialisation and data order) d_s = arm_s - baseline_s over the
                  seeds both have; mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n),
                  p = 2 * P(T_{n-1} > |t|). A seed effect shared by the arms cancels.
  sign_flip       exact two-sided permutation test of the same d_s: the share of the 2^n
                  sign flips with |mean| >= the observed one (all flips up to 2^14, else
                  20,000 seeded random ones, p = (b + 1) / (m + 1)); interval: paired's
  welch           d = mean(arm) - mean(baseline); se = sqrt(s_a^2/n_a + s_b^2/n_b);
                  df by Welch-Satterthwaite; interval d +- t_{0.975, df} * se;
                  p = 2 * P(T_df > |d| / se). Needs 2+ values per side; se = 0 gives NaN
                  (no spread to test against: a deterministic metric, reported as is)
  permutation     exact two-sided p over every split of the pooled values into groups of
                  the original sizes: the share of splits with |mean difference| >= the
                  observed one (the observed split included, so p >= 1 / C(n_a + n_b, n_a);
                  3 vs 3 seeds cannot go below 0.1). Over 20,000 splits: 20,000 random ones
                  from a fixed seed, p = (b + 1) / (m + 1) (never 0); interval: Welch's
  holm            Holm-Bonferroni step-down over a family of p-values (NaN ones left out).
The family is one arm's metrics of one side (outputs, inputs, tags) against the baseline.
Two intervals are given per difference, labelled: `lo`/`hi` at 95% for that metric alone
(unadjusted), and `lo_sim`/`hi_sim` at 1 - 0.05/m for a family of m metrics (Bonferroni:
all m hold together with 95% probability). A simultaneous interval that excludes 0
implies Holm's p < 0.05 (Holm rejects everything Bonferroni does); the reverse need not
hold. `mdd80` is the smallest difference the design detects with 80% power at the
family's Bonferroni level, from the observed spread (noncentral t; see mdd).
"""

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import brentq

from prebias.common import LEVEL, Registry, save_figure

MAX_EXACT = 20_000  # splits enumerated exactly; above this, as many random splits
TESTS = Registry("test between arms")  # name -> fn(baseline, arm, level) -> dict (by-seed Series)


def register_test(name: str, paired: bool):
    """@register_test("name", paired=...): fn(baseline, arm, level) -> {diff, lo, hi, df, se, p}
    where baseline and arm are pd.Series of one metric indexed by seed."""
    def deco(fn):
        fn.paired = paired
        return TESTS.register(name)(fn)
    return deco


def fmt_interval(mean, lo, hi, digits: int = 4, sign: str = "") -> str:
    """'mean [lo, hi]' (just the mean where there is no interval, 'n/a' where no mean);
    sign='+' marks differences."""
    f = f"{sign}.{digits}g"
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:{f}} [{lo:{f}}, {hi:{f}}]" if np.isfinite(lo) else f"{mean:{f}}"


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def mean_interval(x, level: float = LEVEL) -> tuple[int, float, float, float, float]:
    """(n, mean, sd, lo, hi) of the finite values; a t interval (NaN for n < 2)."""
    x = _finite(x)
    n = x.size
    if n == 0:
        return 0, math.nan, math.nan, math.nan, math.nan
    m = float(x.mean())
    if n == 1:
        return 1, m, math.nan, math.nan, math.nan
    sd = float(x.std(ddof=1))
    h = float(sps.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return n, m, sd, m - h, m + h


def welch(baseline, arm, level: float = LEVEL) -> dict:
    """Difference mean(arm) - mean(baseline) with Welch's interval, df, se and p-value."""
    a, b = _finite(baseline), _finite(arm)
    out = {"diff": math.nan, "lo": math.nan, "hi": math.nan, "df": math.nan, "se": math.nan, "p_welch": math.nan}
    if a.size and b.size:
        out["diff"] = float(b.mean() - a.mean())
    if a.size < 2 or b.size < 2:
        return out
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return out
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    h = float(sps.t.ppf(0.5 + level / 2, df)) * se
    t = out["diff"] / se
    out.update(lo=out["diff"] - h, hi=out["diff"] + h, df=float(df), se=se, p_welch=float(2 * sps.t.sf(abs(t), df)))
    return out


def seed_differences(baseline: pd.Series, arm: pd.Series) -> np.ndarray:
    """arm_s - baseline_s over the seeds where both are finite (Series indexed by seed)."""
    both = pd.concat([pd.Series(baseline, dtype=float), pd.Series(arm, dtype=float)], axis=1, join="inner").dropna()
    return (both.iloc[:, 1] - both.iloc[:, 0]).to_numpy(np.float64)


def paired(baseline: pd.Series, arm: pd.Series, level: float = LEVEL) -> dict:
    """The paired t test over seed-matched differences (see the module docstring)."""
    d = seed_differences(baseline, arm)
    out = {"diff": float(d.mean()) if d.size else math.nan, "lo": math.nan, "hi": math.nan, "df": math.nan,
           "se": math.nan, "p_paired": math.nan, "n_pairs": int(d.size)}
    if d.size < 2:
        return out
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    if se == 0:
        return out
    h = float(sps.t.ppf(0.5 + level / 2, d.size - 1)) * se
    out.update(lo=out["diff"] - h, hi=out["diff"] + h, df=float(d.size - 1), se=se,
               p_paired=float(2 * sps.t.sf(abs(out["diff"]) / se, d.size - 1)))
    return out


def sign_flip_p(d, max_exact: int = 1 << 14, draws: int = MAX_EXACT, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p of the mean of the differences d: every flip up
    to max_exact of them (the observed one included), else `draws` seeded random flips
    with p = (b + 1) / (m + 1)."""
    d = _finite(d)
    if d.size == 0:
        return math.nan
    observed = abs(d.mean())
    eps = 1e-12 * max(1.0, float(np.abs(d).max()))
    if 2 ** d.size <= max_exact:
        signs = 1 - 2 * ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1)
        return float(np.mean(np.abs(signs @ d) / d.size >= observed - eps))
    signs = 1 - 2 * np.random.default_rng(seed).integers(0, 2, (draws, d.size))
    b = int((np.abs(signs @ d) / d.size >= observed - eps).sum())
    return (b + 1) / (draws + 1)


def permutation_p(baseline, arm, max_exact: int = MAX_EXACT, seed: int = 0) -> float:
    """Two-sided permutation p-value of the difference in means (see the docstring)."""
    a, b = _finite(baseline), _finite(arm)
    if a.size == 0 or b.size == 0:
        return math.nan
    pooled = np.concatenate([a, b])
    n, na = pooled.size, a.size
    observed = abs(b.mean() - a.mean())
    eps = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    exact = math.comb(n, na) <= max_exact
    if exact:
        splits = np.array(list(itertools.combinations(range(n), na)))
    else:
        rng = np.random.default_rng(seed)
        splits = np.array([rng.permutation(n)[:na] for _ in range(max_exact)])
    in_a = np.zeros((len(splits), n), dtype=bool)
    in_a[np.arange(len(splits))[:, None], splits] = True
    total = pooled.sum()
    sum_a = (in_a * pooled).sum(axis=1)
    hits = np.abs((total - sum_a) / (n - na) - sum_a / na) >= observed - eps
    return float(hits.mean()) if exact else (int(hits.sum()) + 1) / (len(splits) + 1)


@register_test("paired", paired=True)
def _paired_test(baseline, arm, level):
    r = paired(baseline, arm, level)
    return {**r, "p": r["p_paired"]}


@register_test("sign_flip", paired=True)
def _sign_flip_test(baseline, arm, level):
    r = paired(baseline, arm, level)
    return {**r, "p": sign_flip_p(seed_differences(baseline, arm))}


@register_test("welch", paired=False)
def _welch_test(baseline, arm, level):
    r = welch(baseline, arm, level)
    return {**r, "p": r["p_welch"]}


@register_test("permutation", paired=False)
def _permutation_test(baseline, arm, level):
    r = welch(baseline, arm, level)
    return {**r, "p": permutation_p(baseline, arm)}


def default_test(runs: pd.DataFrame) -> str:
    """paired when every arm's runs have the same seeds (the experiment's design), else welch."""
    seeds = {arm: frozenset(g["seed"]) for arm, g in runs.groupby("arm")}
    return "paired" if len(set(seeds.values())) == 1 else "welch"


def _interval(r: dict, level: float) -> tuple[float, float]:
    """diff +- t_{level, df} * se (NaN where the test has no se)."""
    if not (np.isfinite(r.get("se", math.nan)) and np.isfinite(r.get("df", math.nan))):
        return math.nan, math.nan
    h = float(sps.t.ppf(0.5 + level / 2, r["df"])) * r["se"]
    return r["diff"] - h, r["diff"] + h


def mdd(r: dict, alpha: float, power: float = 0.8) -> float:
    """The smallest true difference the test detects with this power at two-sided level
    alpha, from its se and df: the noncentrality at which a noncentral t on df degrees of
    freedom exceeds t_{1-alpha/2} with that probability, times se (exact for the t tests;
    the (t_{1-alpha/2} + t_power) * se shortcut under-states it on few seeds)."""
    se, df = r.get("se", math.nan), r.get("df", math.nan)
    if not (np.isfinite(se) and np.isfinite(df)):
        return math.nan
    crit = float(sps.t.ppf(1 - alpha / 2, df))
    f = lambda nc: float(sps.nct.sf(crit, df, nc)) - power  # noqa: E731
    hi = max(2.0 * crit, 1.0)  # at 1 df and a Bonferroni alpha crit is in the hundreds: widen until it brackets
    while f(hi) < 0:
        if hi > 1e12:
            return math.inf  # no difference this test can detect with that power
        hi *= 4.0
    return brentq(f, 0.0, hi, xtol=1e-12 * hi) * se


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, same order; NaN stays NaN and is not counted."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# -----------------------------------------------------------------------------
# the experiment's tables. `runs` is every run's summary.csv stacked, with columns
# arm, seed, iter and the metric columns.

def curve_table(runs: pd.DataFrame, metrics: list[str], level: float = LEVEL) -> pd.DataFrame:
    """Per arm, metric and checkpoint step: n, mean, sd, lo, hi over seeds."""
    rows = []
    for (arm, it), g in runs.groupby(["arm", "iter"], sort=False):
        for m in metrics:
            n, mean, sd, lo, hi = mean_interval(g[m], level)
            rows.append({"arm": arm, "metric": m, "iter": int(it), "n": n, "mean": mean, "sd": sd, "lo": lo,
                         "hi": hi})
    return pd.DataFrame(rows).sort_values(["arm", "metric", "iter"], kind="stable").reset_index(drop=True)


def final_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's last checkpoint row."""
    return runs.sort_values("iter").groupby(["arm", "seed"], sort=False).tail(1).reset_index(drop=True)


def final_table(runs: pd.DataFrame, metrics: list[str], arms: list[str], level: float = LEVEL) -> pd.DataFrame:
    """Per arm and metric at each run's last checkpoint: n, mean, sd, lo, hi, the values
    by seed."""
    last = final_rows(runs)
    rows = []
    for arm in arms:
        g = last[last["arm"] == arm].sort_values("seed")
        for m in metrics:
            n, mean, sd, lo, hi = mean_interval(g[m], level)
            vals = " ".join(f"{v:.6g}" for v in g[m].to_numpy(dtype=float))
            rows.append({"arm": arm, "metric": m, "iter": int(g["iter"].max()) if len(g) else -1, "n": n,
                         "mean": mean, "sd": sd, "lo": lo, "hi": hi, "values": vals})
    return pd.DataFrame(rows)


def difference_table(runs: pd.DataFrame, metrics: list[str], arms: list[str], baseline: str,
                     side: dict[str, str], test: str = "auto", level: float = LEVEL) -> pd.DataFrame:
    """Every arm but the baseline against the baseline at the last checkpoint, per metric:
    baseline and arm means, diff (arm - baseline) with the chosen test's interval (lo, hi:
    per metric, unadjusted; lo_sim, hi_sim: simultaneous over the family), its p and
    p_holm (Holm within (arm, side)), mdd80, and every test's p for reference.
    test='auto': paired when every arm has the same seeds, else welch."""
    test = default_test(runs) if test == "auto" else test
    fn = TESTS.lookup(test, "test")
    last = final_rows(runs)
    base = last[last["arm"] == baseline].set_index("seed")
    rows = []
    for arm in arms:
        if arm == baseline:
            continue
        g = last[last["arm"] == arm].set_index("seed")
        for m in metrics:
            r = fn(base[m], g[m], level)
            row = {"arm": arm, "baseline": baseline, "metric": m, "side": side.get(m, "output"),
                   "n_baseline": _finite(base[m]).size, "n_arm": _finite(g[m]).size,
                   "baseline_mean": mean_interval(base[m])[1], "arm_mean": mean_interval(g[m])[1],
                   "diff": r["diff"], "lo": r["lo"], "hi": r["hi"], "df": r["df"], "se": r["se"], "p": r["p"]}
            row.update({f"p_{name}": t(base[m], g[m], level)["p"] for name, t in TESTS.items()})
            rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["p_holm"], df["lo_sim"], df["hi_sim"], df["mdd80"], df["family"] = np.nan, np.nan, np.nan, np.nan, 0
    for _, idx in df.groupby(["arm", "side"], sort=False).groups.items():
        m = int(np.isfinite(df.loc[idx, "p"]).sum())
        df.loc[idx, "p_holm"] = holm(df.loc[idx, "p"].to_numpy())
        df.loc[idx, "family"] = m
        for i in idx:
            r = df.loc[i].to_dict()
            df.loc[i, ["lo_sim", "hi_sim"]] = _interval(r, 1 - (1 - level) / max(m, 1))
            df.loc[i, "mdd80"] = mdd(r, (1 - level) / max(m, 1))
    df["test"] = test
    return df


def saturation_tables(runs: pd.DataFrame, metrics: list[str], arms: list[str], step_of,
                      level: float = LEVEL) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per run: arm, seed, metric, saturation_step; per arm and metric: n, mean, lo, hi,
    min, max of the steps). step_of(steps, values) is the saturation rule."""
    per_run = []
    for (arm, seed), g in runs.groupby(["arm", "seed"], sort=False):
        g = g.sort_values("iter")
        for m in metrics:
            per_run.append({"arm": arm, "seed": int(seed), "metric": m,
                            "saturation_step": step_of(g["iter"].to_numpy(), g[m].to_numpy(dtype=float))})
    per_run = pd.DataFrame(per_run)
    rows = []
    for arm in arms:
        for m in metrics:
            s = per_run[(per_run["arm"] == arm) & (per_run["metric"] == m)]["saturation_step"]
            n, mean, sd, lo, hi = mean_interval(s, level)
            f = _finite(s)
            rows.append({"arm": arm, "metric": m, "n": n, "mean": mean, "lo": lo, "hi": hi,
                         "min": f.min() if f.size else math.nan, "max": f.max() if f.size else math.nan})
    return per_run, pd.DataFrame(rows)


def plot_forest(diff: pd.DataFrame, metrics: list[str], arms: list[str], path, title: str,
                labels: dict[str, str] | None = None, level: float = LEVEL):
    """End-of-run differences against the baseline: one row per metric, each on its own
    scale (its own x axis: a grade and a loss share no unit), one point per arm with its
    interval, a line at 0 (no difference), and the Holm-adjusted p-values on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = [a for a in arms if a in set(diff["arm"])]
    color = {a: colors[(i + 1) % len(colors)] for i, a in enumerate(arms)}  # colour 0 is the baseline's
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 0.55 * len(metrics) * max(1, len(arms)) ** 0.5 + 1.0),
                             squeeze=False)
    for k, m in enumerate(metrics):
        ax = axes[k][0]
        d = diff[diff["metric"] == m]
        ps = []
        for j, a in enumerate(arms):
            r = d[d["arm"] == a]
            if not len(r):
                continue
            r = r.iloc[0]
            y = -j
            if np.isfinite(r["lo_sim"]):
                ax.errorbar([r["diff"]], [y], xerr=[[r["diff"] - r["lo_sim"]], [r["hi_sim"] - r["diff"]]], fmt="o",
                            color=color[a], ms=5, capsize=3, lw=1.5)
            else:
                ax.plot([r["diff"]], [y], "o", color=color[a], ms=5)
            ps.append(f"{a}: p={r['p_holm']:.2g}" if np.isfinite(r["p_holm"]) else f"{a}: p n/a")
        ax.axvline(0, color="0.4", lw=0.8, ls=":")
        reach = np.nanmax(np.abs(d[["diff", "lo_sim", "hi_sim"]].to_numpy(dtype=float)), initial=0.0)
        if reach > 0:  # 0 in the middle of every row: which side an interval lies on reads at a glance
            ax.set_xlim(-1.1 * reach, 1.1 * reach)
        ax.set_ylim(-len(arms) + 0.4, 0.6)
        ax.set_yticks([])
        ax.set_ylabel(labels.get(m, m), rotation=0, ha="right", va="center", fontsize=8.5)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
        ax.text(1.01, 0.5, "\n".join(ps), transform=ax.transAxes, fontsize=7, va="center")
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=color[a], marker="o", ls="-", label=a) for a in arms]
    base = diff["baseline"].iloc[0] if len(diff) else "baseline"
    test = diff["test"].iloc[0] if len(diff) else ""
    fig.suptitle(f"{title}\narm - {base} at the end of training ({test} test over seeds)\nsimultaneous {level:.0%} "
                 "intervals over each family (Bonferroni); p: Holm-adjusted", fontsize=9.5,
                 y=1 - 0.1 / fig.get_figheight(), va="top")  # three lines: one was wider than the figure
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.78 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 0.85, 1 - 1.0 / fig.get_figheight()), h_pad=0.6)
    save_figure(fig, path)
    plt.close(fig)
    return path
