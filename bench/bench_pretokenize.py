"""
pretokenize with and without batch metrics on the sample, and the projected time for
the full TinyStories (~4.9M stories) on 16 cores.

$ python bench/bench_pretokenize.py [--n_stories=4000]

Prints (1) the whole command's wall time, 1 worker, metrics off and on (fixed costs
such as process start, imports and fitting the reference scorer weigh heavily on a
small sample), and (2) the steady-state cost per story of the per-shard work, measured
in-process after a warm-up: tokenizing a shard (tinystories._tokenize_shard) against
scoring its batches (batchmetrics._score_shard: decode, reference loss, text metrics).
Targets: metrics at most 2x the cost of tokenizing; the full dataset in under 30
minutes on 16 cores (shards are independent, one process each, so time scales as
stories / cores).
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import batchmetrics  # noqa: E402
import metrics  # noqa: E402
from data import raw_shards, tok_dir  # noqa: E402
import tinystories  # noqa: E402

FULL_STORIES, CORES = 4_900_000, 16


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def whole_command(root: Path, metric_spec: str) -> float:
    shutil.rmtree(tok_dir(root, 512), ignore_errors=True)
    return timed(lambda: tinystories.pretokenize(512, 256, root, workers=1, tables_dir=root / "tables",
                                                 metrics=metric_spec))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_stories", type=int, default=4000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tinystories.sample(root, n_stories=a.n_stories, n_shards=5)
        model = tinystories.train_vocab(512, root)
        w_tok = whole_command(root, "none")
        w_all = whole_command(root, "all")
        # steady state: the same per-shard functions the process pool runs, warmed up
        shards = raw_shards(root)
        names = metrics.resolve_metrics("all")
        tok_jobs = [(s, root / "tmp.bin", model) for s in shards]
        met_jobs = [(root, 512, 256, i, names, "", root / "tmp.npy") for i in range(len(shards))]
        tinystories._tokenize_shard(tok_jobs[0]), batchmetrics._score_shard(met_jobs[0])
        t_tok = min(timed(lambda: [tinystories._tokenize_shard(j) for j in tok_jobs]) for _ in range(3))
        t_met = min(timed(lambda: [batchmetrics._score_shard(j) for j in met_jobs]) for _ in range(3))
    n = a.n_stories
    print(f"\nwhole command, {n} stories, 1 worker: tokens+index {w_tok:.2f} s | with batch metrics "
          f"{w_all:.2f} s ({w_all / w_tok:.1f}x, dominated by fixed costs on a sample this small)")
    print(f"steady state per story: tokenize {1e6 * t_tok / n:.0f} us | batch metrics {1e6 * t_met / n:.0f} us "
          f"-> metrics cost {t_met / t_tok:.2f}x tokenizing (target <= 2x)")
    full = (t_tok + t_met) / n * FULL_STORIES / CORES / 60
    print(f"projected full TinyStories ({FULL_STORIES / 1e6:.1f}M stories) on {CORES} cores: {full:.1f} min "
          f"(target < 30 min); tokens only {t_tok / n * FULL_STORIES / CORES / 60:.1f} min")


if __name__ == "__main__":
    main()
