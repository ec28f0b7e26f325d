"""make validity, area attribution (see bench/validity.py): the graders of attribution on
problems whose answer is known.
- LDS (prebias.attribution.lds): ridge regression retrained in closed form, scored by its
  exact influence g_probe^T H^-1 g_i; the truth is the LDS over 4,000 subsets, each replicate
  draws M = 50 of them: bias of the estimate and coverage of the bias-corrected bootstrap
  interval; noise scores: the interval's coverage of 0.
- The correlation interval of the order-aware validation (bootstrap_corr): 30 pairs of a
  bivariate normal with correlation 0.5.
- The order-aware first-order prediction (move_prediction): random swaps on random
  quadratics, against the change of grad f . (theta'_T - theta_T) (exact) and the measured
  change (Pearson over moves).
- The top-k ratio's interval (attribute.py: top / the t interval of the random mean):
  coverage of top / mu with 5 normal draws.
"""

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prebias import attribution as A  # noqa: E402
from validity import Line  # noqa: E402


def ridge_problem(seed=0, n=100, d=3, P=20, lam=30.0):
    rng = np.random.default_rng(seed)
    X, Xq = rng.normal(size=(n, d)), rng.normal(size=(P, d))
    th = rng.normal(size=d)
    y, yq = X @ th + rng.normal(size=n), Xq @ th + rng.normal(size=P)

    def fit(keep):
        return np.linalg.solve(X[keep].T @ X[keep] + lam * np.eye(d), X[keep].T @ y[keep])
    t = fit(np.ones(n, bool))
    S = ((X @ t - y)[:, None] * X) @ np.linalg.solve(X.T @ X + lam * np.eye(d), ((Xq @ t - yq)[:, None] * Xq).T)
    big = np.random.default_rng(99).random((4000, n)) < 0.5
    meas = np.stack([0.5 * (Xq @ fit(k) - yq) ** 2 for k in big])
    return S, big, meas


def lds_checks(reps: int) -> list:
    S, big, meas = ridge_problem()
    out = []
    for name, scores in (("exact influence", S), ("noise", np.random.default_rng(7).normal(size=S.shape))):
        truth = float(np.nanmean(A.spearman_cols(big.astype(float) @ scores, -meas)))
        est, cov = [], []
        for r in range(reps):
            ix = np.random.default_rng([5, r]).choice(len(big), 50, replace=False)
            res = A.lds(scores, big[ix], meas[ix], n_boot=500, seed=r)
            est.append(res["lds"])
            cov.append(res["lo"] <= truth <= res["hi"])
        c = float(np.mean(cov))
        out.append(Line(f"LDS of {name}, ridge regression, M=50 subsets (alpha 0.5), 20 probes, {reps} replicates",
                        f"LDS {truth:+.3f} (4,000 subsets)",
                        f"bias {np.mean(est) - truth:+.4f}, 95% interval coverage {c:.2f}",
                        0.90 <= c <= 0.985 and abs(np.mean(est) - truth) < 0.03,
                        "coverage in [0.90, 0.985], |bias| < 0.03"))
    return out


def corr_check(reps: int) -> Line:
    cov = []
    for r in range(reps):
        rng = np.random.default_rng([11, r])
        z = rng.normal(size=(30, 2))
        x, y = z[:, 0], 0.5 * z[:, 0] + math.sqrt(0.75) * z[:, 1]
        res = A.bootstrap_corr(x, y, n_boot=500, seed=r)
        cov.append(res["lo"] <= 0.5 <= res["hi"])
    c = float(np.mean(cov))
    return Line(f"order validation's correlation interval (bias-corrected bootstrap), 30 pairs, {reps} replicates",
                "Pearson 0.5", f"coverage {c:.2f}", 0.88 <= c <= 0.985, "coverage in [0.88, 0.985]")


def quadratic_move_check(n_moves: int) -> Line:
    rng = np.random.default_rng(3)
    dim, T, B, n = 6, 30, 2, 100
    Am = torch.from_numpy(np.diag(rng.uniform(0.2, 2, dim)))
    c, cstar = torch.from_numpy(rng.normal(size=(n, dim))), torch.from_numpy(rng.normal(size=dim))
    order = rng.choice(n, (T, B), replace=False)

    def lr(t):
        return 0.1 * (1 - t / (2 * T))

    def run(o):
        th, traj = torch.zeros(dim, dtype=torch.float64), []
        for t in range(T):
            traj.append(th)
            th = th - lr(t) * sum(Am @ (th - c[z]) for z in o[t]) / B
        return th, traj
    f = lambda th: 0.5 * float((th - cstar) @ (th - cstar))  # noqa: E731
    thT, traj = run(order)
    one = torch.ones(dim, dtype=torch.float64)
    adj = A.unrolled_adjoints(T, lr, lambda t, x: Am @ x, lambda t: one, thT - cstar, set(range(T + 1)))
    pred, meas, err = [], [], []
    for m in range(n_moves):
        r = np.random.default_rng([4, m])
        new, moves = order.copy(), []
        for _ in range(3):  # 3 batches of the first 3 steps trade places with 3 of the last 3
            s1, r1, s2, r2 = int(r.integers(0, 3)), int(r.integers(B)), int(r.integers(T - 3, T)), int(r.integers(B))
            new[s1, r1], new[s2, r2] = new[s2, r2], new[s1, r1]
        for s, w in zip(*np.nonzero(order != new)):
            moves.append((int(new[s, w]), int(np.argwhere(order == new[s, w])[0][0]), int(s)))
        p = A.move_prediction(moves, lr, B, lambda z, s: Am @ (traj[s] - c[z]), lambda s: adj[s + 1], lambda s: one)
        th2, _ = run(new)
        pred.append(p)
        meas.append(f(th2) - f(thT))
        err.append(abs(p - float((thT - cstar) @ (th2 - thT))))
    r = float(np.corrcoef(pred, meas)[0, 1])
    return Line(f"order-aware first-order prediction, SGD on random quadratics, {n_moves} random moves",
                "the exact first-order change; the measured change",
                f"max |prediction - first order| {max(err):.1e}; Pearson with measured {r:.4f}",
                max(err) < 1e-10 and r > 0.99, "first order exact (< 1e-10), Pearson > 0.99")


def ratio_check(reps: int) -> Line:
    from scipy import stats
    top, mu, sd, cov = 0.3, 0.1, 0.02, []
    for r in range(reps):
        x = np.random.default_rng([13, r]).normal(mu, sd, 5)
        h = x.std(ddof=1) * stats.t.ppf(0.975, 4) / math.sqrt(5)
        lo, hi = x.mean() - h, x.mean() + h
        cov.append(lo > 0 and top / hi <= top / mu <= top / lo)
    c = float(np.mean(cov))
    return Line(f"top-k ratio interval (top / t interval of 5 random draws), {reps} replicates",
                f"ratio {top / mu:.1f}", f"coverage {c:.2f}", 0.92 <= c <= 0.98, "coverage in [0.92, 0.98]")


SIZES = {"full": (200, 60), "quick": (40, 20), "smoke": (2, 3)}  # (replicates, moves) by size


def checks(size: str) -> list:
    reps, moves = SIZES[size]
    return lds_checks(reps) + [corr_check(reps), quadratic_move_check(moves), ratio_check(reps * 5)]
