"""
Statistics over seeds, for experiments (experiment.py, report.py): a mean with its t
interval, the difference of an arm from the baseline arm with Welch's interval and
p-value, an exact permutation test, Holm's adjustment across metrics, and the
experiment's aggregate tables built from each run's tables/summary.csv.

$ python -c "from prebias import stats; print(stats.mean_interval([1.0, 2.0, 3.0]))"    # n, mean, sd, lo, hi

Definitions (n seeds per arm; NaN values are dropped first):
  mean_interval   mean +- t_{0.975, n-1} * sd / sqrt(n), sd with n - 1 (n = 1: no interval)
  welch           d = mean(arm) - mean(baseline); se = sqrt(s_a^2/n_a + s_b^2/n_b);
                  df by Welch-Satterthwaite; interval d +- t_{0.975, df} * se;
                  p = 2 * P(T_df > |d| / se). Needs 2+ values per side; se = 0 gives NaN
                  (no spread to test against: a deterministic metric, reported as is)
  permutation     exact two-sided p over every split of the pooled values into groups of
                  the original sizes: the share of splits with |mean difference| >= the
                  observed one (the observed split included, so p >= 1 / C(n_a + n_b, n_a);
                  3 vs 3 seeds cannot go below 0.1). Over 20,000 splits: 20,000 random ones
                  from a fixed seed (numpy's generator, never the training RNG).
  holm            Holm-Bonferroni step-down over a family of p-values (NaN ones left out).
The family for Holm is one arm's metrics of one side (outputs, or inputs) against the
baseline, tested with the experiment's chosen test (welch by default).
"""

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats as sps

from prebias.common import save_figure

LEVEL = 0.95
MAX_EXACT = 20_000  # splits enumerated exactly; above this, as many random splits


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
    """Difference mean(arm) - mean(baseline) with Welch's interval, df and p-value."""
    a, b = _finite(baseline), _finite(arm)
    out = {"diff": math.nan, "lo": math.nan, "hi": math.nan, "df": math.nan, "p_welch": math.nan}
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
    out.update(lo=out["diff"] - h, hi=out["diff"] + h, df=float(df), p_welch=float(2 * sps.t.sf(abs(t), df)))
    return out


def permutation_p(baseline, arm, max_exact: int = MAX_EXACT, seed: int = 0) -> float:
    """Two-sided permutation p-value of the difference in means (see the docstring)."""
    a, b = _finite(baseline), _finite(arm)
    if a.size == 0 or b.size == 0:
        return math.nan
    pooled = np.concatenate([a, b])
    n, na = pooled.size, a.size
    observed = abs(b.mean() - a.mean())
    eps = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    if math.comb(n, na) <= max_exact:
        splits = np.array(list(itertools.combinations(range(n), na)))
    else:
        rng = np.random.default_rng(seed)
        splits = np.array([rng.permutation(n)[:na] for _ in range(max_exact)])
    in_a = np.zeros((len(splits), n), dtype=bool)
    in_a[np.arange(len(splits))[:, None], splits] = True
    total = pooled.sum()
    sum_a = (in_a * pooled).sum(axis=1)
    diffs = np.abs((total - sum_a) / (n - na) - sum_a / na)
    return float(np.mean(diffs >= observed - eps))


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
                     side: dict[str, str], test: str = "welch", level: float = LEVEL) -> pd.DataFrame:
    """Every arm but the baseline against the baseline at the last checkpoint, per metric:
    baseline and arm means, diff (arm - baseline) with Welch's interval, p_welch, p_perm,
    and p_holm, the chosen test's p Holm-adjusted within (arm, side)."""
    if test not in ("welch", "permutation"):
        raise ValueError(f"test={test!r}: welch or permutation")
    last = final_rows(runs)
    base = last[last["arm"] == baseline]
    rows = []
    for arm in arms:
        if arm == baseline:
            continue
        g = last[last["arm"] == arm]
        for m in metrics:
            w = welch(base[m], g[m], level)
            rows.append({"arm": arm, "baseline": baseline, "metric": m, "side": side.get(m, "output"),
                         "n_baseline": _finite(base[m]).size, "n_arm": _finite(g[m]).size,
                         "baseline_mean": mean_interval(base[m])[1], "arm_mean": mean_interval(g[m])[1],
                         **w, "p_perm": permutation_p(base[m], g[m])})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    col = "p_welch" if test == "welch" else "p_perm"
    df["p_holm"] = np.nan
    for _, idx in df.groupby(["arm", "side"], sort=False).groups.items():
        df.loc[idx, "p_holm"] = holm(df.loc[idx, col].to_numpy())
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
            if np.isfinite(r["lo"]):
                ax.errorbar([r["diff"]], [y], xerr=[[r["diff"] - r["lo"]], [r["hi"] - r["diff"]]], fmt="o",
                            color=color[a], ms=5, capsize=3, lw=1.5)
            else:
                ax.plot([r["diff"]], [y], "o", color=color[a], ms=5)
            ps.append(f"{a}: p={r['p_holm']:.2g}" if np.isfinite(r["p_holm"]) else f"{a}: p n/a")
        ax.axvline(0, color="0.4", lw=0.8, ls=":")
        reach = np.nanmax(np.abs(d[["diff", "lo", "hi"]].to_numpy(dtype=float)), initial=0.0)
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
    fig.suptitle(f"{title}\n{'arm'} - {base} at the end of training, {level:.0%} Welch interval over seeds; "
                 "p: Holm-adjusted", fontsize=9.5, y=1 - 0.1 / fig.get_figheight(), va="top")
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.62 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 0.85, 1 - 0.85 / fig.get_figheight()), h_pad=0.6)
    save_figure(fig, path)
    plt.close(fig)
    return path
