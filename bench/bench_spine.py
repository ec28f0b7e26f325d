"""
Tokenization throughput: llama2.c's per-story encode loop against sentencepiece's
batched encode (what pretokenize uses), with 1 and 2 threads, on the sample stories.

$ python bench/bench_spine.py

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


def best_rate(fn, n, rounds=3):
    best = min(_time(fn) for _ in range(rounds))
    return n / best


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    stories = generate_stories(4000, seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        tinystories.sample(tmp, n_stories=4000, n_shards=5)
        for vocab in (512, 4096):
            try:
                enc = Tokenizer(tinystories.train_vocab(vocab, tmp))
            except RuntimeError as e:  # the sample may be too small for this vocabulary
                print(f"vocab {vocab}: cannot train on the sample ({e})")
                continue
            loop = best_rate(lambda: [enc.encode(s, bos=True) for s in stories], len(stories))
            batch1 = best_rate(lambda: enc.encode_batch(stories, num_threads=1), len(stories))
            batch2 = best_rate(lambda: enc.encode_batch(stories, num_threads=os.cpu_count()), len(stories))
            print(f"vocab {vocab}: per-story loop {loop:8.0f} stories/s | batched 1 thread {batch1:8.0f} "
                  f"({batch1 / loop:.2f}x) | batched {os.cpu_count()} threads {batch2:8.0f} ({batch2 / loop:.2f}x)")
    print("pretokenize encodes each shard with the batched call, one process per shard")


if __name__ == "__main__":
    main()
