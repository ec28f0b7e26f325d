"""
pretokenize with and without batch metrics, the whole command as a user runs it (a
fresh process: imports, tokenizing, index, fitting the reference scorer, scoring and
writing the CSV), and the steady-state per-story cost of the per-shard work.

$ python bench/bench_pretokenize.py                     # 60,000 stories in 6 shards (74,592 batches)
$ python bench/bench_pretokenize.py --n_stories=4000 --n_shards=5 --workers=1
$ python bench/bench_pretokenize.py --repeat=3           # best of 3 for each, runs interleaved (a busy machine)
$ python bench/bench_pretokenize.py --smoke              # tiny sizes, the same code paths (bench/smoke.py)

Prints (1) the whole command's wall time with --metrics=none and --metrics=all and their
ratio (target: at most 2x at any size, fixed costs included), and (2) the steady-state
cost per story, measured in-process after a warm-up: tokenizing a shard
(tinystories._tokenize_shard) against scoring its batches (batchmetrics._score_shard),
projected to the full TinyStories on 16 cores (target < 30 minutes).
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics  # noqa: E402
import tinystories  # noqa: E402
from prebias import batchmetrics  # noqa: E402
from prebias.data import BatchData, raw_shards, tok_dir  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

SMOKE = dict(n_stories=200, n_shards=2, workers=1)

FULL_STORIES, CORES = 4_900_000, 16
ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def whole_command(root: Path, metric_spec: str, workers: int) -> float:
    shutil.rmtree(tok_dir(root, 512), ignore_errors=True)
    shutil.rmtree(root / "tables", ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "tinystories.py"), "pretokenize", "--vocab_size=512", f"--data_dir={root}",
           f"--tables_dir={root / 'tables'}", f"--metrics={metric_spec}"] + ([f"--workers={workers}"] if workers else [])
    return timed(lambda: subprocess.run(cmd, check=True, capture_output=True))


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--n_stories", type=int, default=60000)
    ap.add_argument("--n_shards", type=int, default=6)
    ap.add_argument("--workers", type=int, default=0, help="pretokenize --workers (0: its default, all cores)")
    ap.add_argument("--repeat", type=int, default=1, help="whole commands: best of this many runs of each, "
                    "none and all alternating (other load on the machine only ever adds time)")
    a = smoke.parse(ap, SMOKE)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tinystories.sample(root, n_stories=a.n_stories, n_shards=a.n_shards)
        model = tinystories.train_vocab(512, root)
        runs = [(whole_command(root, "none", a.workers), whole_command(root, "all", a.workers))
                for _ in range(max(a.repeat, 1))]
        w_tok, w_all = min(r[0] for r in runs), min(r[1] for r in runs)
        if len(runs) > 1:
            print("whole-command runs (none, all): " + ", ".join(f"({t:.2f}, {m:.2f})" for t, m in runs))
        n_batches = len(BatchData(root, 512, 256))
        # steady state: the same per-shard functions the process pool runs, warmed up
        shards = raw_shards(root)
        names = metrics.resolve_metrics("all")
        tok_jobs = [(s, root / "tmp.bin", model) for s in shards]
        met_jobs = [(root, 512, 256, i, names, "", root / "tmp.npy", metrics.gender_words()) for i in range(len(shards))]
        tinystories._tokenize_shard(tok_jobs[0]), batchmetrics._score_shard(met_jobs[0])
        t_tok = min(timed(lambda: [tinystories._tokenize_shard(j) for j in tok_jobs]) for _ in range(3))
        t_met = min(timed(lambda: [batchmetrics._score_shard(j) for j in met_jobs]) for _ in range(3))
    n = a.n_stories
    print(f"\nwhole command, {n} stories, {n_batches} batches, workers={a.workers or 'all cores'}"
          + (f", best of {len(runs)}" if len(runs) > 1 else "") + ": "
          f"--metrics=none {w_tok:.2f} s | --metrics=all {w_all:.2f} s | ratio {w_all / w_tok:.2f}x (target <= 2x)")
    print(f"steady state per story: tokenize {1e6 * t_tok / n:.0f} us | batch metrics {1e6 * t_met / n:.0f} us "
          f"-> metrics cost {t_met / t_tok:.2f}x tokenizing (target <= 2x)")
    full = (t_tok + t_met) / n * FULL_STORIES / CORES / 60
    print(f"projected full TinyStories ({FULL_STORIES / 1e6:.1f}M stories) on {CORES} cores: {full:.1f} min "
          f"(target < 30 min); tokens only {t_tok / n * FULL_STORIES / CORES / 60:.1f} min")


if __name__ == "__main__":
    main()
