"""
Saturation of a metric over training (stage 4): the one home of the normalised score,
the saturation rule and the small-multiples plot used by visualize_sat_output.py and
visualize_sat_batch.py.

$ python -c "from prebias import saturation as s; print(s.saturation_step([0, 1, 2, 4], [0, .5, .97, 1]))"   # -> 2

Normalised score. For a metric with values v_0..v_n at checkpoint steps s_0..s_n,
    norm_i = (v_i - v_first) / (v_final - v_first)
where v_first and v_final are the first and the last finite values. The score runs
from 0 at the first checkpoint to 1 at the last whatever the metric's unit or direction
(a falling loss rises from 0 to 1 too); an overshoot shows as > 1, a dip as < 0.
NaN values (e.g. a batch mean at step 0, before any batch) stay NaN and are ignored.
Flat curve: when v_final == v_first (within 1e-9 of the curve's scale) the ratio is
undefined; the score is then 1 + (v_i - v_final) / (max v - min v), i.e. distance from
the final level in units of the curve's own range, and a constant curve is 1 throughout.

Saturation rule. The saturation step is the first checkpoint step s_i such that
|norm_j - 1| <= tol for every checkpoint j >= i (default tol 0.05, the edge included):
from s_i on, the score stays within 5% of the total change of its final level. A curve that enters the
band and leaves it again saturates only at its last re-entry. The final checkpoint is
always inside, so a curve that never settles saturates at its last step; a curve with
a single finite point saturates there; a curve with no finite value has no step (NaN).

Caveat, flagged as [near-flat] on the plots and by range_over_change in the tables:
when a curve ends close to where it started compared with how much it moves
(range > 3 x |v_final - v_first|), the score mostly magnifies noise, and so does its
saturation step (typical of cumulative batch means under a shuffled order).
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from prebias.common import LEVEL, UserError, save_figure, step_axis
from prebias.paths import RunPaths

TOL = 0.05
NOISY = 3.0  # range / |change| above this: the score mostly shows noise (flagged on plots)


# -----------------------------------------------------------------------------
# the rule

def normalised_score(values) -> np.ndarray:
    """(v - v_first) / (v_final - v_first) over the finite values; see the module docstring."""
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, np.nan)
    ok = np.isfinite(v)
    if not ok.any():
        return out
    f = v[ok]
    first, final = f[0], f[-1]
    span, rng = final - first, f.max() - f.min()
    scale = max(abs(first), abs(final), rng)
    if abs(span) > 1e-9 * scale:
        out[ok] = (f - first) / span
    elif rng > 0:  # flat from first to final, but moved in between
        out[ok] = 1.0 + (f - final) / rng
    else:  # constant
        out[ok] = 1.0
    return out


def saturation_index(norm, tol: float = TOL) -> int | None:
    """Index of the first point from which every later finite score is within tol of 1
    (NaN points are skipped); None when no point is finite."""
    z = np.asarray(norm, dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(z))
    if idx.size == 0:
        return None
    outside = np.abs(z[idx] - 1.0) > tol + 1e-12  # the band edge counts as inside
    if not outside.any():
        return int(idx[0])
    last_out = np.flatnonzero(outside)[-1]  # the last point outside the band
    return int(idx[last_out + 1]) if last_out + 1 < idx.size else int(idx[-1])


def saturation_step(steps, values, tol: float = TOL) -> float:
    """The saturation step of a metric curve (values at checkpoint steps), NaN if none."""
    steps = np.asarray(steps)
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    i = saturation_index(normalised_score(values), tol)
    return math.nan if i is None else float(steps[i])


def _range_over_change(f: np.ndarray) -> float:
    change, rng = abs(f[-1] - f[0]), f.max() - f.min()
    if rng == 0:
        return 1.0
    return rng / change if change > 0 else math.inf


def saturation_table(df: pd.DataFrame, metrics: list[str], step_col: str = "iter", tol: float = TOL,
                     run: str = "") -> pd.DataFrame:
    """One row per metric: run, metric, saturation_step, first/final step and value,
    change = final - first, range_over_change = (max - min) / |change| (1 for a monotone
    curve; large when the curve ends near where it started, so its score mostly shows
    noise; inf when change is 0), n_points (finite values) and tol."""
    df = df.sort_values(step_col)
    steps = df[step_col].to_numpy()
    rows = []
    for m in metrics:
        v = df[m].to_numpy(dtype=np.float64)
        ok = np.flatnonzero(np.isfinite(v))
        first, last = (ok[0], ok[-1]) if ok.size else (None, None)
        rows.append({
            "run": run, "metric": m, "saturation_step": saturation_step(steps, v, tol),
            "first_step": steps[first] if ok.size else math.nan,
            "final_step": steps[last] if ok.size else math.nan,
            "first_value": v[first] if ok.size else math.nan,
            "final_value": v[last] if ok.size else math.nan,
            "change": v[last] - v[first] if ok.size else math.nan,
            "range_over_change": _range_over_change(v[ok]) if ok.size else math.nan,
            "n_points": int(ok.size), "tol": tol})
    return pd.DataFrame(rows)


# -----------------------------------------------------------------------------
# command-line plumbing shared by the two visualize_sat_* scripts

def split_out_dirs(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull the list-valued --out_dir out of argv: '--out_dir=a,b,c', '--out_dir a b c'
    or '--out_dir=a b c'. Returns (out_dirs, the other arguments)."""
    dirs, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--out_dir" or a.startswith("--out_dir="):
            if "=" in a:
                dirs += [d for d in a.split("=", 1)[1].split(",") if d]
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                dirs += [d for d in argv[i].split(",") if d]
                i += 1
            continue
        rest.append(a)
        i += 1
    return dirs, rest


def run_names(out_dirs: list[str]) -> list[str]:
    """Legend names: folder names when they are distinct, else the paths as given."""
    base = [Path(d).name or str(d) for d in out_dirs]
    return base if len(set(base)) == len(base) else [str(d) for d in out_dirs]


def read_summary(out_dir: str, script: str) -> pd.DataFrame:
    p = RunPaths(out_dir).tables / "summary.csv"
    if not p.exists():
        raise UserError(f"no {p}: run python eval.py --out_dir={out_dir} first, then python {script}")
    df = pd.read_csv(p)
    if "iter" not in df.columns or df.empty:
        raise UserError(f"{p} has no checkpoint rows: re-run python eval.py --out_dir={out_dir}")
    return df.sort_values("iter").reset_index(drop=True)


def output_paths(out_dirs: list[str], plot_dir: str, png: str, csv: str) -> tuple[Path, Path]:
    """One run: <run>/visualize/<png>, <run>/tables/<csv>. Several: both into plot_dir
    if given, else into the first run's visualize/ and tables/."""
    if plot_dir:
        return Path(plot_dir) / png, Path(plot_dir) / csv
    return RunPaths(out_dirs[0]).visualize / png, RunPaths(out_dirs[0]).tables / csv


# -----------------------------------------------------------------------------
# the figure

def _grid(n: int, ncols: int, lines: list[str]):
    """(fig, axes, ncols, nrows, colour per line) for n small-multiple subplots sharing
    the step axis; the unused cells hidden."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.7 * nrows + 1.4), squeeze=False,
                             sharex=True)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    return fig, axes, ncols, nrows, {x: colors[i % len(colors)] for i, x in enumerate(lines)}


def _save_grid(fig, handles, title: str, path) -> Path:
    """Title and legend above the grid, then the PNG, atomically."""
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=11, y=1 - 0.2 / fig.get_figheight(), va="top")
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.5 / fig.get_figheight()), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.95 / fig.get_figheight()))
    path = Path(path)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_saturation(curves: dict[str, pd.DataFrame], metrics: list[str], path, title: str,
                    labels: dict[str, str] | None = None, tol: float = TOL, step_col: str = "iter",
                    ncols: int = 4, sat: pd.DataFrame | None = None):
    """Small multiples, one subplot per metric, one line per run, against the training
    step (symlog x, so step 0 shows), a dashed vertical line at each run's saturation step.
    One run: the normalised score with the final +-tol band. Several runs: the raw values
    (each metric on its own scale, so runs that end at different levels stay apart; the
    normalised score would put every run's end at 1), with each run's saturation point
    ringed. Written atomically to path."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    labels = labels or {}
    runs = list(curves)
    n = len(metrics)
    fig, axes, ncols, nrows, color = _grid(n, ncols, runs)
    max_step = max(float(c[step_col].max()) for c in curves.values())
    raw = len(runs) > 1
    for k, m in enumerate(metrics):
        ax = axes[k // ncols][k % ncols]
        if raw:
            _plot_raw(ax, curves, runs, m, color, tol, step_col)
            _finish_axis(ax, k, n, ncols, nrows, max_step, labels.get(m, m), "value (own units)")
            continue
        ax.axhspan(1 - tol, 1 + tol, color="0.85", zorder=0)
        ax.axhline(0, color="0.6", lw=0.6, ls=":")
        zs = {}
        for r in runs:
            c = curves[r]
            if m in c.columns:
                zs[r] = (c[step_col].to_numpy(dtype=float), normalised_score(c[m].to_numpy(dtype=float)))
        finite = np.concatenate([z[np.isfinite(z)] for _, z in zs.values()] + [np.zeros(0)])
        # keep wild scores (a near-flat noisy curve) from squashing the rest: clip the view
        # to [-1.5, 2.5] and draw off-scale points as triangles on the edge
        lo = max(min(-0.1, finite.min(initial=0.0)), -1.5)
        hi = min(max(1.15, finite.max(initial=1.0)), 2.5)
        pad = 0.04 * (hi - lo)
        for r, (x, z) in zs.items():
            ok = np.isfinite(z)
            ax.plot(x[ok], np.clip(z[ok], lo, hi), "-", lw=1.3, color=color[r])
            inside = ok & (z >= lo) & (z <= hi)
            ax.plot(x[inside], z[inside], "o", ms=2.5, color=color[r])
            ax.plot(x[ok & (z > hi)], np.full((ok & (z > hi)).sum(), hi), "^", ms=5, color=color[r])
            ax.plot(x[ok & (z < lo)], np.full((ok & (z < lo)).sum(), lo), "v", ms=5, color=color[r])
            s = saturation_step(x, curves[r][m].to_numpy(dtype=float), tol)
            if np.isfinite(s):
                ax.axvline(s, color=color[r], ls="--", lw=1.0)
        ax.set_ylim(lo - pad, hi + pad)
        head = labels.get(m, m)
        rows = sat[sat["metric"] == m] if sat is not None else []
        if len(rows):  # raw first -> final value (single run), and a warning for near-flat curves
            if len(runs) == 1:
                r0 = rows.iloc[0]
                head += f"\nfirst {r0.first_value:.3g} \u2192 final {r0.final_value:.3g}"
            if (rows["range_over_change"] > NOISY).any():
                head += " [near-flat]"
        _finish_axis(ax, k, n, ncols, nrows, max_step, head, "normalised score\n(0 = first, 1 = final)")
    handles = [Line2D([], [], color=color[r], marker="o", ms=3, label=r) for r in runs]
    if raw:
        handles += [Line2D([], [], color="0.3", ls="--", marker="o", mfc="none", ms=7,
                           label=f"saturation step (within {tol:g} of the run's total change)")]
    else:
        handles += [Line2D([], [], color="0.3", ls="--", label="saturation step"),
                    Patch(color="0.85", label=f"final level \u00b1 {tol:g}"),
                    Line2D([], [], color="0.3", marker="^", ls="", label="off-scale value")]
    if sat is not None and (sat["range_over_change"] > NOISY).any():
        handles.append(Line2D([], [], ls="",
                              label=f"[near-flat]: range > {NOISY:g}x net change, score is mostly noise"))
    return _save_grid(fig, handles, title, path)


def _plot_raw(ax, curves, runs, m, color, tol, step_col):
    """Several runs on one metric's own scale; each run's saturation point ringed."""
    for r in runs:
        c = curves[r]
        if m not in c.columns:
            continue
        x, v = c[step_col].to_numpy(dtype=float), c[m].to_numpy(dtype=float)
        ok = np.isfinite(v)
        ax.plot(x[ok], v[ok], "-o", lw=1.3, ms=2.5, color=color[r])
        s = saturation_step(x, v, tol)
        if np.isfinite(s):
            ax.axvline(s, color=color[r], ls="--", lw=1.0)
            ax.plot([s], v[x == s][:1], "o", ms=8, mfc="none", mew=1.5, color=color[r])


def _focus_late(ax, late: np.ndarray) -> bool:
    """Zoom the y axis onto the values from 10% of training on, where arms differ, when
    the untrained model's outputs (a degenerate first text can score a grade of 600) would
    otherwise flatten them; True when something was cut off."""
    late = late[np.isfinite(late)]
    if late.size == 0:
        return False
    lo, hi = late.min(), late.max()
    if hi <= lo:  # flat late on: nothing to zoom onto
        return False
    pad = 0.15 * (hi - lo)
    y0, y1 = ax.get_ylim()
    if (y1 - y0) > 3 * (hi - lo):  # the late values would fill under a third of the view
        ax.set_ylim(lo - pad, hi + pad)
        return True
    return False


def _finish_axis(ax, k, n, ncols, nrows, max_step, head, ylabel):
    step_axis(ax, max_step, label=False)
    ax.grid(True, alpha=0.3, which="major")
    ax.set_title(head, fontsize=8.5)
    if k % ncols == 0:
        ax.set_ylabel(ylabel, fontsize=8)
    if k // ncols == nrows - 1 or k + ncols >= n:
        step_axis(ax, max_step, fontsize=8)
        ax.tick_params(axis="x", labelbottom=True)
    ax.tick_params(labelsize=7)


def plot_bands(curves: pd.DataFrame, sat: pd.DataFrame, metrics: list[str], arms: list[str], path,
               title: str, labels: dict[str, str] | None = None, ncols: int = 4, level: float = LEVEL):
    """An experiment's curves: one subplot per metric on its raw scale, one line per arm
    (the mean over seeds at each checkpoint) with its interval as a band, and each arm's
    saturation step (the mean over seeds, dashed) with the seeds' min..max as a bar on top.
    curves: stats.curve_table; sat: stats.saturation_tables' per-arm table."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    labels = labels or {}
    n = len(metrics)
    fig, axes, ncols, nrows, color = _grid(n, ncols, arms)
    max_step = float(curves["iter"].max())
    for k, m in enumerate(metrics):
        ax = axes[k // ncols][k % ncols]
        seen = []
        for j, a in enumerate(arms):
            c = curves[(curves["arm"] == a) & (curves["metric"] == m)].sort_values("iter")
            x = c["iter"].to_numpy(dtype=float)
            mean, lo, hi = (c[q].to_numpy(dtype=float) for q in ("mean", "lo", "hi"))
            ok = np.isfinite(mean)
            ax.plot(x[ok], mean[ok], "-o", lw=1.3, ms=2.5, color=color[a])
            band = ok & np.isfinite(lo)
            ax.fill_between(x[band], lo[band], hi[band], color=color[a], alpha=0.18, lw=0)
            late = x >= 0.1 * max_step
            seen.append(np.concatenate([mean[ok & late], lo[band & late], hi[band & late]]))
            s = sat[(sat["arm"] == a) & (sat["metric"] == m)]
            if len(s) and np.isfinite(s["mean"].iloc[0]):
                ax.axvline(s["mean"].iloc[0], color=color[a], ls="--", lw=1.0)
                y = 1.0 - 0.05 * (j + 1)  # the seeds' spread, stacked below the top edge
                ax.plot([s["min"].iloc[0], s["max"].iloc[0]], [y, y], "-|", color=color[a], lw=2, ms=6,
                        transform=ax.get_xaxis_transform())
        head = labels.get(m, m)
        if _focus_late(ax, np.concatenate(seen + [np.zeros(0)])):
            head += "\n(early values off the view)"
        _finish_axis(ax, k, n, ncols, nrows, max_step, head, "value (own units)")
    nseeds = int(curves["n"].max()) if len(curves) else 0
    handles = [Line2D([], [], color=color[a], marker="o", ms=3, label=a) for a in arms]
    handles += [Patch(color="0.6", alpha=0.4, label=f"{level:.0%} interval over {nseeds} seeds"),
                Line2D([], [], color="0.3", ls="--", label="saturation step (mean)"),
                Line2D([], [], color="0.3", marker="|", lw=2, label="saturation step, min..max over seeds")]
    return _save_grid(fig, handles, title, path)


def pick_metrics(df: pd.DataFrame, candidates: list[str], spec: str, script: str) -> list[str]:
    """The candidates with at least one finite value, or the comma list `spec`."""
    if spec and spec != "all":
        want = [s.strip() for s in spec.split(",") if s.strip()]
        bad = [w for w in want if w not in candidates]
        if bad:
            raise UserError(f"{script}: unknown metric(s) {', '.join(bad)}; valid: {', '.join(candidates)}")
        return want
    return [c for c in candidates if np.isfinite(df[c].to_numpy(dtype=float)).any()]


def column_label(col: str) -> str:
    """A summary.csv column's panel title, in every figure: val_loss, out_<m> (a metric of
    the generated text), in_<m>_cum / in_<m>_since (the trained batches' mean so far / since
    the previous checkpoint); any other column (tag_*) as it is."""
    if col == "val_loss":
        return "val_loss (nats/token, held-out batches)"
    if col.startswith("out_"):
        return f"{col[len('out_'):]} (generated text)"
    for suffix, what in (("_cum", "mean, all batches so far"), ("_since", "mean since prev. ckpt")):
        if col.startswith("in_") and col.endswith(suffix):
            return f"{col[len('in_'):-len(suffix)]} ({what})"
    return col


def visualize(out_dirs: list[str], plot_dir: str, spec: str, tol: float, ncols: int, script: str,
              candidates, png: str, csv: str, title: str):
    """The body of both visualize_sat_* scripts: read each run's summary.csv, choose
    the metric columns (candidates(df) -> names), write the saturation CSV and the
    figure, and print both paths."""
    if not out_dirs:
        raise UserError(f"{script}: give at least one run with --out_dir=<run folder>")
    if not 0 < tol < 1:
        raise UserError(f"--tol={tol}: must be in (0, 1)")
    names = run_names(out_dirs)
    curves = {n: read_summary(d, script) for n, d in zip(names, out_dirs)}
    both = pd.concat(curves.values(), ignore_index=True)
    cands = [c for c in dict.fromkeys(c for df in curves.values() for c in candidates(df))]
    for c in cands:  # a column one run lacks (e.g. sampled outputs) is NaN there
        for df in curves.values():
            if c not in df.columns:
                df[c] = np.nan
    both = pd.concat(curves.values(), ignore_index=True)
    metrics = pick_metrics(both, cands, spec, script)
    if not metrics:
        raise UserError(f"{script}: no metric with a finite value in {', '.join(out_dirs)}/tables/summary.csv")
    sat = pd.concat([saturation_table(df, metrics, tol=tol, run=n) for n, df in curves.items()],
                    ignore_index=True)
    png_p, csv_p = output_paths(out_dirs, plot_dir, png, csv)
    from prebias.common import write_csv_atomic
    write_csv_atomic(sat, csv_p)
    runs = ", ".join(names)
    how = "normalised score" if len(names) == 1 else "values (each metric's own scale)"
    plot_saturation(curves, metrics, png_p, f"{title}: {how} vs training step ({runs})",
                    {m: column_label(m) for m in metrics}, tol,
                    ncols=ncols, sat=sat)
    print(f"wrote {png_p}")
    print(f"wrote {csv_p}")
    return sat
