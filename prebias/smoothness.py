"""
Metasmoothness: is training smooth in its data weights, so that a metagradient predicts
what reweighting does? (Engstrom et al. 2025, "Optimizing ML Training with Metagradient
Descent", section 3: a metagradient is only useful where the run's output is smooth in the
weights; they tune the training setting until it is.)

Every trained occurrence (step, row) has a loss weight w, 1 in the run (train.py
--train_weights). Along a random direction d in weight space (Rademacher +-1 on every
trained occurrence, 0 elsewhere) the run is retrained with w = 1 + eps d and w = 1 - eps d
at several step sizes eps, and the probe's change Delta(+-eps) against the run is
compared with the linear prediction +-eps <g, d>, g = d probe / d w (steps, B):

  predicted   eps <g, d>: from a metagradient table when one is given (attribute.py takes
              the `magic` estimator's when it is registered), else the central difference
              at the smallest step, (Delta(+eps0) - Delta(-eps0)) / (2 eps0) (first-order
              accurate to O(eps0^2): the harness then measures linearity, not a gradient)
  rel_err     max over the two signs of |Delta(+-eps) -+ eps <g, d>| / |eps <g, d>|
  curvature   |Delta(+eps) + Delta(-eps)| / |Delta(+eps) - Delta(-eps)|: the even (second-
              order) part against the odd (first-order) part, free of any gradient

First order holds up to the largest eps at which rel_err <= tol, and at every smaller eps.
Scale: a Rademacher step eps moves the weights by eps sqrt(n) in L2, as much as dropping
a share eps^2 of the occurrences: eps = 0.1 matches the 1% drops of the LDS.
"""

import math
import textwrap

import numpy as np
import pandas as pd

from prebias.common import save_figure


def directions(occurrences: np.ndarray, shape: tuple[int, int], R: int, seed: int) -> np.ndarray:
    """(R, steps, B): Rademacher +-1 at each trained occurrence (n, 2) [step, row], 0 elsewhere
    (a masked row stays masked); direction r is its own seeded draw."""
    out = np.zeros((R, *shape))
    s, r = np.asarray(occurrences, np.int64).reshape(-1, 2).T
    for k in range(R):
        out[k, s, r] = np.random.default_rng([seed, 0x736D6F6F, k]).integers(0, 2, len(s)) * 2.0 - 1.0
    return out


def parse_eps(text: str) -> list[float]:
    """'0.001,0.01,0.1,1' -> sorted distinct positive step sizes (ValueError otherwise)."""
    eps = sorted({float(x) for x in text.split(",") if x.strip()})
    if not eps or not all(math.isfinite(e) and e > 0 for e in eps):
        raise ValueError(text)
    return eps


def smoothness_table(eps: list[float], plus: np.ndarray, minus: np.ndarray, slope: np.ndarray | None = None,
                     tol: float = 0.1) -> pd.DataFrame:
    """One row per (direction, eps): plus, minus (R, E) the measured probe changes at
    w = 1 +- eps d; slope (R,) <g, d> of a metagradient, or None for the central difference
    at the smallest eps. Columns: direction, eps, measured_plus, measured_minus,
    predicted (eps <g, d>), rel_err, curvature, holds (rel_err <= tol at this eps and every
    smaller one), source ('metagradient' | 'central difference')."""
    plus, minus = np.asarray(plus, float), np.asarray(minus, float)
    src = "metagradient" if slope is not None else "central difference"
    if slope is None:
        slope = (plus[:, 0] - minus[:, 0]) / (2 * eps[0])
    rows = []
    for r in range(plus.shape[0]):
        ok = True
        for e, (dp, dm) in enumerate(zip(plus[r], minus[r])):
            pred = eps[e] * float(slope[r])
            with np.errstate(divide="ignore", invalid="ignore"):
                err = max(abs(dp - pred), abs(dm + pred)) / abs(pred) if pred else math.inf
                curv = abs(dp + dm) / abs(dp - dm) if dp != dm else math.inf
            ok = ok and err <= tol
            rows.append({"direction": r, "eps": eps[e], "measured_plus": dp, "measured_minus": dm, "predicted": pred,
                         "rel_err": err, "curvature": curv, "holds": ok, "source": src})
    return pd.DataFrame(rows)


def first_order_size(table: pd.DataFrame) -> pd.Series:
    """Per direction, the largest eps up to which first order holds (0 where it fails at the
    smallest eps already)."""
    held = table[table["holds"]]
    return held.groupby("direction")["eps"].max().reindex(sorted(table["direction"].unique()), fill_value=0.0)


def plot(table: pd.DataFrame, tol: float, title: str, path):
    """|measured| and |predicted| against eps (log-log, one colour a direction), and the
    relative error of the linear prediction against eps with the tolerance line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r, part in table.groupby("direction"):
        c = f"C{int(r) % 10}"
        a.loglog(part["eps"], part["measured_plus"].abs(), "o-", color=c, label=f"direction {r}: measured +eps")
        a.loglog(part["eps"], part["measured_minus"].abs(), "x:", color=c)
        a.loglog(part["eps"], part["predicted"].abs(), "--", color=c, alpha=0.6)
        b.loglog(part["eps"], part["rel_err"].clip(lower=1e-6), "o-", color=c)
    a.set_xlabel("step size eps (w = 1 +- eps d)")
    a.set_ylabel("|probe change|\n(o +eps, x -eps; dashed: eps <g, d>)")
    a.set_title(textwrap.fill(title, 80), fontsize=8)  # a window's title is long: wrapped, not cut
    a.legend(fontsize=7)
    b.axhline(tol, color="0.4", lw=0.8, ls="--")
    b.set_xlabel("step size eps")
    b.set_ylabel("relative error of the linear prediction")
    b.set_title(f"first order holds where the error is below {tol:g}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
