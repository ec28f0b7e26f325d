"""
pretokenize with and without batch metrics on the sample, one worker, and the
projected time for the full TinyStories (~4.9M stories) on 16 cores.

$ python bench/bench_pretokenize.py [--n_stories=4000]

Targets: metrics at most 2x the cost of tokenizing alone; the full dataset in under
30 minutes on 16 cores. The projection scales the one-worker time per story linearly
(shards are independent, one process each).
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tinystories  # noqa: E402

FULL_STORIES, CORES = 4_900_000, 16


def timed_pretokenize(root: Path, metrics: str) -> float:
    shutil.rmtree(tinystories.tok_dir(root, 512), ignore_errors=True)
    t0 = time.perf_counter()
    tinystories.pretokenize(512, 256, root, workers=1, tables_dir=root / "tables", metrics=metrics)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_stories", type=int, default=4000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tinystories.sample(root, n_stories=a.n_stories, n_shards=5)
        tinystories.train_vocab(512, root)
        t_tok = min(timed_pretokenize(root, "none") for _ in range(2))
        t_all = min(timed_pretokenize(root, "all") for _ in range(2))
    per_story = t_all / a.n_stories
    full_min = per_story * FULL_STORIES / CORES / 60
    print(f"\npretokenize, {a.n_stories} stories, 1 worker: tokens+index {t_tok:.2f} s, "
          f"with all batch metrics {t_all:.2f} s -> metrics cost {(t_all - t_tok) / t_tok:.2f}x tokenizing "
          f"(target <= 2x)")
    print(f"projected full TinyStories ({FULL_STORIES / 1e6:.1f}M stories) on {CORES} cores: "
          f"{full_min:.1f} min (target < 30 min); tokens only: {t_tok / a.n_stories * FULL_STORIES / CORES / 60:.1f} min")


if __name__ == "__main__":
    main()
