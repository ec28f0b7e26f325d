"""
make validity, area selection (bench/validity.py): batch selection on the noisy bed,
whose noise is planted and known (tinystories.py sample --noise=0.2: a fifth of the
training stories corrupted, the noisy column of batch_metrics.csv says which tokens).

  holdout drawn like the training data   its share of corrupted stories against the 99%
                                         interval of a random draw of its size
  reference blind to the validation shard  the share of the reference's memorisation gap
                                         (seen holdout vs unseen training text) that the
                                         validation shard shows: 0 when unseen; a scorer
                                         fitted on holdout + validation shows ~1 (the contrast)
  rho / prune avoid the noise            the noisy share trained on, against the known share
                                         (uniform's: the measure's calibration; rho_ref's is the
                                         bench's finding, not a pass rule: with a model as weak as
                                         a 100-step one it seeks the noise, see README section 6)
  rho_ref's reference held out           its recorded training data: the holdout only
  the holdout is never trained on        holdout ids among every trained and pooled id
  compute record, matched baseline       recorded FLOPs against the hand count; the matched
                                         uniform run's learning rate at its last step

$ python bench/validity.py --only=selection            # ~10 min on 2 cores under load (--quick: ~6)
$ python bench/validity.py --only=selection --smoke    # every check at tiny sizes (bench/smoke.py)
"""

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import bench_select
from model import ModelArgs, Transformer
from prebias import checkpoint, refscorer
from prebias.common import parse_config
from prebias.compute import compute_curve, matched_steps
from prebias.configs import TrainConfig
from prebias.data import BOS_ID, BatchData, holdout_stories, holdout_tokens, story_noise
from prebias.schedule import get_lr
from validity import Line


SIZES = {"full": dict(n_stories=4000, seeds=3, max_iters=100, ref_iters=100),  # by validity.SIZES
         "quick": dict(n_stories=2000, seeds=2, max_iters=60, ref_iters=60),
         "smoke": dict(n_stories=800, seeds=2, max_iters=4, ref_iters=4, seq=64, dim=16, batch=2, eval_interval=2,
                       peak_flops=1e12)}  # peak_flops: no matmul timing in each of its ~15 runs


def settings(size: str):
    """bench_select's settings (its defaults for the rest: no real stories, a temp folder)."""
    return bench_select.settings(**{**dict(noise=0.2, holdout=0.1, seq=256, dim=64, layers=2, batch=8,
                                           eval_interval=20, pool=4, keep=0.8, ref_dim=64), **SIZES[size]})


def interval(x, level=0.95) -> tuple[float, float, float]:
    x = np.asarray(x, float)
    h = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean(), x.mean() - h, x.mean() + h


def holdout_lines(data_dir: Path, bm: pd.DataFrame, data: BatchData) -> list[Line]:
    """The holdout's noise against a random draw; the validation shard unseen by the reference."""
    rec = holdout_stories(data_dir, 512)
    raw = data_dir / "TinyStories_all_data"
    noisy = np.concatenate([story_noise(raw / sh["name"].replace(".bin", ".json")) for sh in data.meta["shards"][1:]])
    first = np.cumsum([0] + [sh["n_stories"] for sh in data.meta["shards"][1:]])  # training story numbering
    held = np.concatenate([np.arange(first[s - 1] + lo, first[s - 1] + hi) for s, lo, hi in rec["stories"]])
    n, k, N = len(held), int(noisy.sum()), len(noisy)
    lo, hi = stats.hypergeom.ppf([0.005, 0.995], N, k, n) / n
    share, in_val = noisy[held].mean(), int(np.isin(data.holdout_ids, data.val_ids).sum())
    out = [Line("holdout: share of corrupted stories (blocks of 32 whole training stories)",
                f"a random {n} of the {N} training stories: {k / N:.3f}, 99% draw interval [{lo:.3f}, {hi:.3f}]",
                f"{share:.3f}; validation batches in it: {in_val}", bool(lo <= share <= hi and in_val == 0),
                "inside the 99% interval, no validation batch")]
    # the share of the reference's memorisation gap (seen holdout vs unseen training text, clean
    # batches) that the validation shard shows; the contrast: a scorer fitted on holdout + validation
    clean = bm["noisy"].to_numpy() == 0
    seen, unseen = clean & (bm["split"] == "holdout").to_numpy(), clean & (bm["split"] == "train").to_numpy()
    val = (bm["split"] == "val").to_numpy()
    toks = np.asarray(data.tokens[0], np.int64)
    leaky = refscorer.NGramScorer(3, 512).fit(holdout_tokens(data_dir, 512) +
                                              np.split(toks, np.flatnonzero(toks == BOS_ID)[1:]))
    ratios = [(nll[val].mean() - nll[unseen].mean()) / (nll[seen].mean() - nll[unseen].mean())
              for nll in (bm["ref_nll"].to_numpy(), leaky.nll_many(data.windows(np.arange(len(data)))))]
    out.append(Line("reference (3-gram of the holdout): the validation shard's share of its memorisation gap",
                    "0 (the validation shard unseen); a scorer fitted on holdout + validation: 1",
                    f"{ratios[0]:+.3f}; the leaky contrast {ratios[1]:+.3f}",
                    bool(abs(ratios[0]) < 0.2 and ratios[1] > 0.5), "|estimate| < 0.2 and the contrast > 0.5"))
    return out


def run_lines(a, data: Path, tables: Path, root: Path, bm: pd.DataFrame, held: np.ndarray) -> list[Line]:
    """rho, rho_ref and prune on the bed, each seed; what they trained on."""
    res = bench_select.bed_runs("noisy", data, tables, a, root, methods=("rho", "prune"), matched=())
    one = bench_select.settings(**{**vars(a), "seeds": 1})  # rho_ref's lines read its record: one seed does
    res["rho_ref"] = bench_select.bed_runs("noisy", data, tables, one, root, methods=("rho_ref",), matched=())["rho_ref"]
    train_ids = (bm["split"] != "val").to_numpy()
    s0 = float(bm.loc[train_ids, "noisy"].mean())  # tokens of corrupted stories among the training batches
    truth = f"the training batches' noisy share {s0:.3f} (20% of stories corrupted)"
    out = []
    shares = np.concatenate([bm["noisy"].to_numpy()[np.load(Path(r["dir"]) / "batch_ids.npy").ravel()]
                             for r in res["uniform"]])  # uniform's batches: random draws from the training set
    m, h = shares.mean(), stats.norm.ppf(0.995) * shares.std(ddof=1) / math.sqrt(len(shares))
    out.append(Line("uniform: noisy share trained (calibration of the measure)", truth,
                    f"{m:.3f} [{m - h:.3f}, {m + h:.3f}] (99%, over its {len(shares)} batches)",
                    bool(m - h <= s0 <= m + h), "the 99% interval holds the known share"))
    for meth, what in (("rho", "3-gram of the holdout"), ("prune", "keep 80% lowest ref_nll")):
        m, lo, hi = interval([r["noisy"] for r in res[meth]])
        out.append(Line(f"{meth} ({what}): noisy share trained", truth, f"{m:.3f} [{lo:.3f}, {hi:.3f}]",
                        bool(hi < s0), "the 95% interval over seeds below the known share"))
    refs = [checkpoint.load_checkpoint(checkpoint.latest_checkpoint(r["dir"]))["schedule"]["reference"]
            for r in res["rho_ref"]]
    out.append(Line("rho_ref: the irreducible-loss model's recorded training data", "the holdout only (0 other batches)",
                    ", ".join(f"{r['trained_on']} ({r['outside_holdout']} other)" for r in refs),
                    all(r["outside_holdout"] == 0 for r in refs), "0 batches outside the holdout"))
    seen = np.concatenate([np.load(Path(r["dir"]) / f).ravel() for meth in ("rho", "rho_ref", "prune")
                           for r in res[meth] for f in ("batch_ids.npy", "pool_ids.npy")
                           if (Path(r["dir"]) / f).exists()])
    out.append(Line("rho, rho_ref, prune: holdout batches trained on or pooled", "0",
                    f"{int(np.isin(seen, held).sum())} of {len(seen)} ids", bool(not np.isin(seen, held).any()),
                    "none"))
    out += compute_lines(a, res)
    return out


def compute_lines(a, res: dict) -> list[Line]:
    """The compute record against the hand count, and the matched baseline's schedule."""
    r = res["rho"][0]
    ck = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(r["dir"]))
    win = Transformer(ModelArgs.from_dict(ck["model_args"])).flops_per_token() * a.seq
    want = a.max_iters * (a.batch * win + a.pool * a.batch * win / 3)
    got = compute_curve(r["dir"])["flops"][-1]
    steps = matched_steps(got, res["uniform"][0]["flops"][-1] / a.max_iters)
    # the baseline as bench_select launches it: its cosine must end at the budget, not at max_iters
    cfg = parse_config(TrainConfig(), bench_select.train_args("d", "t", "o", 1, steps, a, eval_interval=steps))
    lr_end, floor = get_lr(cfg.max_iters - 1, cfg), cfg.min_lr or cfg.learning_rate / 10
    return [Line("compute record: rho's FLOPs (K=4: B windows trained + K*B scored)",
                 f"{want:.4e} = steps x (B + K*B/3) x 3-pass FLOPs of a window", f"{got:.4e}",
                 bool(abs(got - want) <= 1e-9 * want), "equal"),
            Line("matched uniform baseline: steps and learning rate at its last step",
                 f"{round(a.max_iters * (1 + a.pool / 3))} steps (rho's FLOPs), lr -> min_lr {floor:.2e}",
                 f"{cfg.max_iters} steps, lr {lr_end:.3e}", bool(cfg.max_iters == round(a.max_iters * (1 + a.pool / 3))
                                                                and lr_end - floor < 0.01 * (cfg.learning_rate - floor)),
                 "same steps; within 1% of the decay from min_lr")]


def checks(size: str) -> list[Line]:
    a = settings(size)
    root = Path(tempfile.mkdtemp(prefix="validity_selection_"))
    try:
        data, tables = bench_select.make_bed("noisy", root, a)
        d = BatchData(data, 512, a.seq)
        bm = pd.read_csv(tables / "batch_metrics.csv")
        lines = holdout_lines(data, bm, d)
        lines += run_lines(a, data, tables, root, bm, d.holdout_ids)
        return lines
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    for line in checks("quick"):
        print(line)
