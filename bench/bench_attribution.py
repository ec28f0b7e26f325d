"""
Does attribution pass the field's test? On the generated sample and on the real stories
(--real_dir: a folder of real TinyStories dataNN.json shards, e.g. data/TinyStories_all_data
after `tinystories.py download`; skipped without it), a run of the demo's model shape is trained once, then
retrained in place (train.py --train_mask, --train_weights) many times:
  1) LDS (Park et al. 2023) of every estimator (ESTIMATORS below) with 1% drops: M = 100
     subsets each dropping 1% of the trained (step, row) occurrences (--drop=0.01), and
     with 50% drops: M = 50 batch-level subsets (alpha = 0.5); bootstrap intervals and each
     one's paired interval of the difference to grad_dot
  2) top-k in-place removal vs timing-matched random-k (the best estimator by 50% LDS)
  3) order-aware attribution: predicted vs measured change of the validation loss over
     random moves (batches of the first tenth of the run swapped with the last tenth)
     and the same moves on the continued run at smaller learning rates (--order_lrs): the
     loss a smoother run costs, against how well magic predicts its order
  4) metasmoothness: the validation loss along random directions in weight space at
     several step sizes against the linear prediction (--validate=smoothness)
and prints the cost per retrain and per estimator. Everything is cached under --root: a
rerun reuses the trained run, every finished retrain and the gradient caches.

$ python bench/bench_attribution.py                          # ~30 min per dataset and phase, 2 quiet cores
$ python bench/bench_attribution.py --datasets=sample --subsets=20 --jobs=1
$ python bench/bench_attribution.py --magic                   # magic's planted truth and cost only
$ python bench/bench_attribution.py --datasets=sample --subsets=20 --drop_subsets=20 --directions=1 --jobs=1
$ python bench/bench_attribution.py --smoke      # tiny sizes, the same code paths, in a temp folder (bench/smoke.py)

Two phases of training are graded apart (--phases): the run from scratch, and a run
continued from its last checkpoint (train.py --init_from, CONTINUED below), because the first
is chaotic in its data weights (a 1e-6 change of every weight moves the probe by ~0.03; the
steps after ~100 are smooth: docs/results.md) and the second is not.

Settings: dim 64, 4 layers, 4 heads, 2 kv heads, vocab 512 (the demo's shape) with
max_seq_len 64 and batch_size 8 (the demo trains 256 x 16: smaller here so the retrains fit
the 2-core machine: ~6 s of training each when it is quiet), 200 steps, lr 5e-3, warmup 20, checkpoints
at 0, 1, 2, ..., 32 and every 50 steps with the optimizer moments kept; the continued run:
200 more steps at lr 1e-3 (warmup 20, cosine); probes: the first 16 validation windows; d = 512.
"""

import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import attribute  # noqa: E402
import tinystories  # noqa: E402
import train  # noqa: E402
from prebias import attribution as A  # noqa: E402
from prebias import magic  # noqa: E402
from prebias.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import smoke  # noqa: E402

RUN = dict(vocab_size=512, max_seq_len=64, batch_size=8, dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
           max_iters=200, eval_interval=50, warmup_iters=20, eval_iters=4, log_interval=50,
           keep_optimizer=True, device="cpu", dtype="float32", model_bin="none")
# the continued phase: from the run's last checkpoint, as many steps again at a fifth of the rate
CONTINUED = dict(learning_rate=1e-3)
ATTR = dict(probe="val", n_val=16, d=512)
# the order validation: each move trades 8 batches of the first tenth of the run with 8 of the last
MOVES = dict(move_rows=8, move_frac=0.1)  # attribute.py --move_rows, --move_frac
# every estimator graded side by side (those whose extras are installed); a new one is one name here
ESTIMATORS = ["grad_dot", "tracin", "tracin_adam", "trak", "ekfac", "magic"]
TOL = 0.1  # smoothness: first order holds while the relative error is at most this (attribute.py --tol)
# smoke: a fresh temp root (never the cache of full runs), 8 steps on 300 stories, 3 retrains a validation
SMOKE = dict(root="", datasets="sample", n_stories=300, max_iters=8, subsets=3, drop_subsets=3, directions=1,
             eps="1", k=2, n_random=2, moves=2, jobs=1, n_val=4, d=32)


def prepare(name: str, root: Path, real_dir: str = "", n_stories: int = 4000) -> Path | None:
    """The dataset's data folder (sample generated, real stories copied), pretokenized once."""
    data = root / name / "data"
    if (data / "tok512" / f"index_T{RUN['max_seq_len']}").exists():
        return data
    if name == "real":
        if not (real_dir and list(Path(real_dir).glob("data*.json"))):
            print("real stories: skipped (" + (f"no data*.json in --real_dir={real_dir})" if real_dir else
                                               "give --real_dir=<a folder of real TinyStories dataNN.json shards>)"))
            return None
        shutil.copytree(real_dir, data / "TinyStories_all_data", dirs_exist_ok=True)
    else:
        tinystories.sample(data, n_stories=n_stories)
    tinystories.train_vocab(512, data)
    tinystories.pretokenize(512, RUN["max_seq_len"], data, workers=1, metrics="none", tables_dir=root / name / "tables")
    return data


def base_run(name: str, root: Path, data: Path, max_iters: int) -> Path:
    out = root / name / "run"
    found = list_checkpoints(out)
    if not found or found[-1][0] != max_iters:
        args = {**RUN, "max_iters": max_iters, "data_dir": data, "tables_dir": root / name / "tables", "out_dir": out}
        train.main([f"--{k}={v}" for k, v in args.items()] + (["--init_from=resume"] if found else []))
    return out


def attribution(out: Path, args, **over):
    a = {**ATTR, "n_val": args.n_val, "d": args.d, "out_dir": out, "jobs": args.jobs,
         "estimators": ",".join(ESTIMATORS), **over}
    return attribute.main([f"--{k}={v}" for k, v in a.items()])


def continued_run(name: str, root: Path, data: Path, base: Path, max_iters: int, lr: float = 0.0) -> Path:
    """The continued phase: a new run from the from-scratch run's last checkpoint
    (train.py --init_from=<ckpt>, a fresh AdamW) of max_iters more steps at CONTINUED's
    learning rate (or lr); its retrains start from that checkpoint."""
    out = root / name / ("continued" + (f"_lr{lr:g}" if lr else ""))
    found = list_checkpoints(out)
    if not found or found[-1][0] != max_iters:
        args = {**RUN, **CONTINUED, **({"learning_rate": lr} if lr else {}), "max_iters": max_iters,
                "data_dir": data, "tables_dir": root / name / "tables", "out_dir": out}
        args = {k: v for k, v in args.items() if k not in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads")}
        init = ["--init_from=resume"] if found else [f"--init_from={list_checkpoints(base)[-1][1]}"]
        train.main([f"--{k}={v}" for k, v in args.items()] + init)
    return out


def dataset(name: str, args) -> dict | None:
    root = Path(args.root)
    data = prepare(name, root, args.real_dir, args.n_stories)
    if data is None:
        return None
    phases = args.phases.split(",")
    base = base_run(name, root, data, args.max_iters)  # the continued phase starts from its last checkpoint
    runs = {"from scratch": base} if "scratch" in phases else {}
    if "continued" in phases:
        runs["continued"] = continued_run(name, root, data, base, args.max_iters)
    res = {phase: analyse(name, phase, out, args) for phase, out in runs.items()}
    if "continued" in phases and args.order_lrs:
        res["continued"]["by_lr"] = order_by_lr(name, root, data, base, runs["continued"], res["continued"]["order"],
                                                args)
    return res


def order_by_lr(name: str, root: Path, data: Path, base: Path, first: Path, first_order: pd.DataFrame,
                args) -> pd.DataFrame:
    """Metasmoothness bought with the learning rate: the continued run again at each of
    --order_lrs, its final validation loss (what the setting costs) and magic's order
    Pearson over the same kind of moves (seeded alike), beside the continued run's own."""
    rows = []
    for lr in [CONTINUED["learning_rate"]] + [float(x) for x in args.order_lrs.split(",")]:
        out = first if lr == CONTINUED["learning_rate"] else continued_run(name, root, data, base, args.max_iters, lr)
        o = first_order if out == first else attribution(out, args, validate="order", moves=args.moves, **MOVES,
                                                         estimators="magic")
        o = o.set_index("estimator").loc["magic"]
        rows.append({"lr": lr, "val_loss": float(load_checkpoint(list_checkpoints(out)[-1][1])["val_loss"]),
                     "pearson": o["pearson"], "pearson_lo": o["pearson_lo"], "pearson_hi": o["pearson_hi"],
                     "spearman": o["spearman"]})
    return pd.DataFrame(rows)


def analyse(name: str, phase: str, out: Path, args) -> dict:
    """Every validation of one run: LDS at 1% and 50% drops, top-k, order, smoothness."""
    t0 = time.time()
    print(f"== {name}, {phase}: run {out}")
    lds1 = attribution(out, args, validate="lds", subsets=args.drop_subsets, drop=0.01)
    lds = attribution(out, args, validate="lds", subsets=args.subsets, alpha=0.5)
    best = lds.sort_values("lds", ascending=False).iloc[0]["estimator"]
    attribution(out, args, validate="topk", estimator=best, k=args.k, n_random=args.n_random)
    topk = pd.read_csv(out / "tables" / f"influence_{attribute.table_name(attribute.AttributeConfig(estimator=best))}"
                                        "_validation.csv").iloc[0].to_dict()
    order = attribution(out, args, validate="order", moves=args.moves, **MOVES)
    smooth = attribution(out, args, validate="smoothness", directions=args.directions, eps=args.eps, tol=TOL,
                         metagradient=magic_table(out, args))
    return {"lds1": lds1, "lds": lds, "best": best, "topk": topk, "order": order, "smooth": smooth,
            "seconds": time.time() - t0}


def magic_table(out: Path, args) -> Path:
    """The (step, row) metagradient table the LDS above computed for the same probes: the
    smoothness check compares retrains with its linear prediction, not a finite difference."""
    ctx, _ = attribute.context(attribute.AttributeConfig(**{**ATTR, "n_val": args.n_val, "d": args.d,
                                                            "out_dir": str(out)}))
    return magic.table_path(ctx.cache_dir, ctx.traj, ctx.probes)


def lds_lines(df: pd.DataFrame, what: str):
    print(f"LDS, {what}: {int(df['subsets'].iloc[0])} in-place retrains, {int(df['probes'].iloc[0])} probes; "
          f"{df['retrain_s'].iloc[0]:.1f} s per retrain (training)")
    print(f"{'estimator':<12} {'LDS [95% CI]':<24} {'minus grad_dot [95% CI]':<24} {'cost':>7}")
    for x in df.itertuples():
        vs = f"[{x.vs_grad_dot_lo:+.3f}, {x.vs_grad_dot_hi:+.3f}]" if "vs_grad_dot_lo" in df else ""
        print(f"{x.estimator:<12} {x.lds:+.3f} [{x.lo:+.3f}, {x.hi:+.3f}]    {vs:<24}{x.seconds:>6.0f}s")


def summary(name: str, r: dict):
    print(f"\n==== {name}")
    lds_lines(r["lds1"], "1% drops (each subset drops 1% of the trained (step, row) occurrences)")
    lds_lines(r["lds"], "50% drops (each batch kept with probability 0.5)")
    t = r["topk"]
    print(f"top-{int(t['k'])} removed in place ({r['best']}): {t['top_effect']:+.4f}; timing-matched random-"
          f"{int(t['k'])}: {t['random_mean']:+.4f} [{t['random_lo']:+.4f}, {t['random_hi']:+.4f}] "
          f"({int(t['n_random'])} draws); ratio {t['ratio']:.2f} [{t['ratio_lo']:.2f}, {t['ratio_hi']:.2f}], "
          f"difference {t['difference']:+.4f} [{t['difference_lo']:+.4f}, {t['difference_hi']:+.4f}]")
    for x in r["order"].itertuples():
        print(f"order-aware ({x.estimator}): Pearson {x.pearson:+.3f} [{x.pearson_lo:+.3f}, {x.pearson_hi:+.3f}], "
              f"Spearman {x.spearman:+.3f} [{x.spearman_lo:+.3f}, {x.spearman_hi:+.3f}]")
    for x in r.get("by_lr", pd.DataFrame()).itertuples():
        print(f"order-aware (magic), continued at lr {x.lr:g}: final val loss {x.val_loss:.4f}, Pearson "
              f"{x.pearson:+.3f} [{x.pearson_lo:+.3f}, {x.pearson_hi:+.3f}], Spearman {x.spearman:+.3f}")
    sm = r["smooth"]
    size = sm.groupby("direction")["first_order_size"].first()
    held = (f"up to eps = {size.min():g} in all {len(size)} directions" if size.min() > 0 else
            f"at no eps tried in {int((size == 0).sum())} of {len(size)} directions")  # 0: failed at the smallest
    print(f"smoothness ({sm['source'].iloc[0]}): first order within {int(100 * TOL)}% {held} (median of the "
          f"largest eps where it held {size.median():g}); median relative error by eps: " +
          ", ".join(f"{e:g}: {v:.2f}" for e, v in sm.groupby("eps")["rel_err"].median().items()))
    print(f"total {r['seconds'] / 60:.0f} min (cached parts not counted again)")


def magic_planted_truth(dim=16, n_layers=2, steps=20, pairs=50, seed=0) -> dict:
    """d probe / d w by the reverse pass against central differences in float64 (prebias/magic.py
    planted_truth: warmup, clipping active) at `pairs` random (step, row) pairs. Target: <= 1e-4."""
    t0 = time.perf_counter()
    r = magic.planted_truth(dim=dim, n_layers=n_layers, steps=steps, pairs=pairs, seed=seed)
    e = r["rel_err"]
    print(f"magic planted truth (dim {dim}, {n_layers} layers, {steps} steps, float64, clip active on "
          f"{100 * r['clipped']:.0f}% of the steps): {pairs} (step, row) pairs, relative error max {e.max():.2e}, "
          f"median {np.median(e):.2e} (target <= 1e-4: {'met' if e.max() <= 1e-4 else 'NOT met'}), "
          f"{time.perf_counter() - t0:.0f} s")
    return r


def magic_cost(root: Path, data: Path, n_probes: int = 1, **over) -> dict:
    """One probe's reverse pass against the run's own training, timed in one process on the same
    machine: a fresh run of the bench config (RUN, with `over`; its kept optimizer files are the
    reverse pass's anchors, without them it replays the run once more), then metagradients of
    the first n_probes validation windows. Peak memory: the process's max RSS (ru_maxrss)."""
    out = root / "magic_cost" / "run"
    shutil.rmtree(out, ignore_errors=True)
    args = {**RUN, **over, "data_dir": data, "tables_dir": root / "magic_cost" / "tables",
            "out_dir": out}
    t0 = time.perf_counter()
    train.main([f"--{k}={v}" for k, v in args.items()])
    t_run = time.perf_counter() - t0
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    traj = A.Trajectory(out)
    t_steps = float(load_checkpoint(traj.last).get("compute", {}).get("train_s", t_run))  # the steps alone
    probes = [A.Item(w) for w in traj.data.windows(traj.data.val_ids[:n_probes])]
    res = magic.metagradients(traj, probes)
    r = {"train_s": t_run, "train_steps_s": t_steps, "reverse_s": res.seconds, "ratio": res.seconds / t_run,
         "ratio_steps": res.seconds / t_steps, "peak_rss_train_mb": rss_train,
         "peak_rss_mb": res.peak_rss_mb, "replay_max_diff": res.replay_max_diff,
         "steps": traj.run.max_iters, "ratio_interleaved": res.seconds / (traj.run.max_iters * res.step_s)}
    print(f"magic cost ({traj.run.max_iters} steps, dim {traj.run.dim}, {traj.run.n_layers} layers, {n_probes} "
          f"probe): training {t_run:.1f} s (whole train.py run; its steps alone {t_steps:.1f} s), reverse pass "
          f"{res.seconds:.1f} s = {r['ratio']:.2f}x the run, {r['ratio_steps']:.2f}x its steps; "
          f"{r['ratio_interleaved']:.2f}x its steps timed interleaved in the pass (target <= 3x); "
          f"peak RSS {rss_train:.0f} MB after training, {res.peak_rss_mb:.0f} MB after the reverse pass; replay vs "
          f"checkpoints max |diff| {res.replay_max_diff:.3g}")
    return r


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--root", default="/tmp/prebias_bench_attribution", help="the cache ('': a temp folder, removed)")
    ap.add_argument("--datasets", default="sample,real")
    ap.add_argument("--phases", default="scratch,continued",
                    help="scratch: the run from step 0; continued: a run continued from its last checkpoint")
    ap.add_argument("--real_dir", default="", help="folder of real TinyStories dataNN.json shards (dataset real)")
    ap.add_argument("--subsets", type=int, default=50, help="LDS at 50%% drops: batch-level subsets")
    ap.add_argument("--drop_subsets", type=int, default=100, help="LDS at 1%% drops: occurrence-level subsets")
    ap.add_argument("--directions", type=int, default=2, help="smoothness: random directions in weight space")
    ap.add_argument("--eps", default="0.001,0.01,0.1,1", help="smoothness: step sizes")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--n_random", type=int, default=3)
    ap.add_argument("--moves", type=int, default=30, help="order: retrained moves (the target asks >= 30)")
    ap.add_argument("--order_lrs", default="3e-4", help="order: the continued run again at these learning rates "
                    "(comma-separated; '' = none), its loss beside magic's order Pearson")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--magic", action="store_true", help="only magic's planted truth and its cost on the sample")
    ap.add_argument("--n_stories", type=int, default=4000, help="stories of the generated sample")
    ap.add_argument("--max_iters", type=int, default=RUN["max_iters"], help="steps of the run (and of each retrain)")
    ap.add_argument("--n_val", type=int, default=ATTR["n_val"], help="probes: the first validation windows")
    ap.add_argument("--d", type=int, default=ATTR["d"], help="projection size")
    args = smoke.parse(ap, SMOKE)
    if not args.phases or set(args.phases.split(",")) - {"scratch", "continued"}:
        ap.error(f"--phases={args.phases}: scratch, continued or both (comma-separated)")
    temp = not args.root
    args.root = args.root or tempfile.mkdtemp(prefix="bench_attribution_")
    try:
        if args.magic:
            magic_planted_truth()
            magic_cost(Path(args.root), prepare("sample", Path(args.root)))
            return
        results = {}
        for name in args.datasets.split(","):
            r = dataset(name, args)
            if r:
                results[name] = r
        for name, phases in results.items():
            for phase, r in phases.items():
                summary(f"{name}, {phase}", r)
    finally:
        if temp:
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
