"""
Tokenization throughput: llama2.c's per-story encode loop against sentencepiece's
batched encode (what pretokenize uses), with 1 and 2 threads, on the sample stories.

$ python bench/bench_spine.py
$ python bench/bench_spine.py --smoke      # tiny sizes, the same code paths (bench/smoke.py)

(The KV-cache generation speed-up is in bench/bench_eval.py; run.c in bench/bench_runc.py.)
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tinystories  # noqa: E402
from prebias.storygen import generate_stories  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

SMOKE = dict(n_stories=200, vocabs="512", rounds=1)


def best_rate(fn, n, rounds=3):
    best = min(_time(fn) for _ in range(rounds))
    return n / best


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--n_stories", type=int, default=4000, help="stories encoded (and in the sample the vocab learns)")
    ap.add_argument("--vocabs", default="512,4096", help="comma list of vocabulary sizes")
    ap.add_argument("--rounds", type=int, default=3, help="best of this many timings")
    a = smoke.parse(ap, SMOKE)
    stories = generate_stories(a.n_stories, seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        tinystories.sample(tmp, n_stories=a.n_stories, n_shards=5)
        for vocab in map(int, a.vocabs.split(",")):
            try:
                enc = Tokenizer(tinystories.train_vocab(vocab, tmp))
            except RuntimeError as e:  # the sample may be too small for this vocabulary
                print(f"vocab {vocab}: cannot train on the sample ({e})")
                continue
            loop = best_rate(lambda: [enc.encode(s, bos=True) for s in stories], len(stories), a.rounds)
            batch1 = best_rate(lambda: enc.encode_batch(stories, num_threads=1), len(stories), a.rounds)
            batch2 = best_rate(lambda: enc.encode_batch(stories, num_threads=os.cpu_count()), len(stories), a.rounds)
            print(f"vocab {vocab}: per-story loop {loop:8.0f} stories/s | batched 1 thread {batch1:8.0f} "
                  f"({batch1 / loop:.2f}x) | batched {os.cpu_count()} threads {batch2:8.0f} ({batch2 / loop:.2f}x)")
    print("pretokenize encodes each shard with the batched call, one process per shard")


if __name__ == "__main__":
    main()
