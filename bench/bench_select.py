"""
Does batch selection pay here? Uniform, loss, rho (online, pool K) and offline pruning
(keep the batches with the lowest reference-scorer loss) on a noisy sample and on the
clean one, several seeds each, same steps. Per method: the steps to reach the validation
loss that uniform reaches at the end (ratio to uniform, mean and 95% t-interval over
seeds; each seed against uniform's own final loss with that seed), wall-clock to that loss
including the scoring cost (ratio to uniform's whole run), and the share of noisy batches
trained on. Finished runs are reused with --keep_dir.

$ python bench/bench_select.py                       # noise 0.2 and clean, 3 seeds (~20 min on 2 cores)
$ python bench/bench_select.py --seeds=1 --max_iters=100 --noise=0.2 --clean=False
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import select_batches  # noqa: E402
import tinystories  # noqa: E402
import train  # noqa: E402
from prebias import batchmetrics  # noqa: E402
from prebias import checkpoint  # noqa: E402
from prebias.data import BatchData  # noqa: E402

METHODS = ("uniform", "loss", "rho", "prune")


def make_data(root: Path, noise: float, n_stories: int, seq: int) -> tuple[Path, Path]:
    data, tables = root / "data", root / "tables"
    if noise:
        tinystories.sample(data, n_stories=n_stories, n_shards=5, seed=1337, noise=noise)
    else:
        tinystories.sample(data, n_stories=n_stories, n_shards=5, seed=1337)
    tinystories.train_vocab(512, data)
    tinystories.pretokenize(512, seq, data, tables_dir=tables)
    return data, tables


def run(method, seed, data, tables, out, a) -> dict:
    args = dict(data_dir=data, tables_dir=tables, out_dir=out, vocab_size=512, max_seq_len=a.seq, dim=a.dim,
                n_layers=a.layers, n_heads=4, n_kv_heads=2, batch_size=a.batch, max_iters=a.max_iters,
                eval_interval=a.eval_interval, eval_iters=8, log_interval=a.max_iters, learning_rate=5e-3,
                warmup_iters=10, seed=seed, device="cpu", dtype="float32", model_bin="none")
    if method in ("loss", "rho"):
        args.update(select=method, select_pool=a.pool)
    if method == "prune":
        spec = select_batches.main([f"--data_dir={data}", f"--tables_dir={tables}", "--vocab_size=512",
                                    f"--max_seq_len={a.seq}", "--by=ref_nll", f"--keep={a.keep}", "--easiest"])
        args.update(schedule_spec=spec)
    done = Path(out) / "bench_wall.json"  # a finished run is reused (--keep_dir)
    if done.exists():
        wall = json.loads(done.read_text())["wall"]
    else:
        t0 = time.perf_counter()
        train.main([f"--{k}={v}" for k, v in args.items()])
        wall = time.perf_counter() - t0
        done.write_text(json.dumps({"wall": wall}))
    steps, val = [], []
    for it, p in checkpoint.list_checkpoints(out):
        ck = checkpoint.load_checkpoint(p)
        steps.append(it)
        val.append(float(ck["val_loss"]))
    ids = np.load(out / "batch_ids.npy")
    bm, _ = batchmetrics.load_batch_metrics(tables, BatchData(data, 512, a.seq))
    noisy = float(bm["noisy"].to_numpy()[ids].mean()) if "noisy" in bm else float("nan")
    return {"steps": np.array(steps), "val": np.array(val), "wall": wall, "noisy": noisy}


def steps_to(r: dict, target: float) -> float:
    """First step at which val loss <= target, interpolated between checkpoints; inf if never."""
    s, v = r["steps"], r["val"]
    for i in range(1, len(s)):
        if v[i] <= target:
            f = (v[i - 1] - target) / max(v[i - 1] - v[i], 1e-12)
            return s[i - 1] + f * (s[i] - s[i - 1]) if i > 0 else s[0]
    return math.inf


def interval(x) -> str:
    x = np.asarray(x, float)
    if not np.isfinite(x).all():
        return f"not reached in {int((~np.isfinite(x)).sum())}/{len(x)} seeds"
    if len(x) == 1:
        return f"{x[0]:.2f}"
    from scipy import stats
    h = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return f"{x.mean():.2f} [{x.mean() - h:.2f}, {x.mean() + h:.2f}]"


def bench(noise: float, a, root: Path):
    data, tables = make_data(root / f"noise{noise}", noise, a.n_stories, a.seq)
    res = {m: [run(m, s, data, tables, root / f"noise{noise}" / f"{m}_s{s}", a) for s in range(1, a.seeds + 1)]
           for m in METHODS}
    targets = [r["val"][-1] for r in res["uniform"]]  # each seed against uniform's own end
    print(f"\n== {'noisy sample (noise=' + str(noise) + ')' if noise else 'clean sample'}: {a.seeds} seeds, "
          f"{a.max_iters} steps; target: the val loss uniform reaches at step {a.max_iters} with the same seed "
          f"(mean {np.mean(targets):.4f})")
    print(f"{'method':8s} {'final val':>10s} {'steps to target / uniform':>30s} {'wall-clock to target / uniform':>32s} "
          f"{'noisy share':>11s}")
    for m, rs in res.items():
        st = [steps_to(r, t) if m != "uniform" else a.max_iters for r, t in zip(rs, targets)]
        ratio = [s / a.max_iters for s in st]
        wall = [r["wall"] * s / a.max_iters / u["wall"] for r, s, u in zip(rs, st, res["uniform"])]
        print(f"{m:8s} {np.mean([r['val'][-1] for r in rs]):10.4f} {interval(ratio):>30s} {interval(wall):>32s} "
              f"{np.mean([r['noisy'] for r in rs]):11.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--clean", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    ap.add_argument("--n_stories", type=int, default=4000)
    ap.add_argument("--max_iters", type=int, default=200)
    ap.add_argument("--eval_interval", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--pool", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.8, help="prune: fraction kept (lowest ref_nll)")
    ap.add_argument("--keep_dir", default="", help="keep the runs here instead of a temp folder")
    a = ap.parse_args()
    root = Path(a.keep_dir) if a.keep_dir else Path(tempfile.mkdtemp(prefix="bench_select_"))
    try:
        if a.noise:
            bench(a.noise, a, root)
        if a.clean:
            bench(0.0, a, root)
    finally:
        if not a.keep_dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
