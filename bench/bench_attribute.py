"""
Attribution cost on CPU: seconds per 1,000 batches per checkpoint (per-batch gradients
plus their projection) and peak memory, at the tiny default and the 15M shape (dim 288,
6 layers; vocab 512), for two projection sizes.

$ python bench/bench_attribute.py
$ python bench/bench_attribute.py --smoke      # tiny sizes, the same code paths (bench/smoke.py)
"""

import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prebias import attribution as attribute  # noqa: E402  (Projector, batch_grads)
from model import ModelArgs, Transformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

SHAPES = {"tiny (dim 64, 4 layers)": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2),
          "15M shape (dim 288, 6 layers)": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6)}
SMOKE = dict(T=16, max_batches=4, d="16,32", shapes="tiny")


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--T", type=int, default=256, help="tokens per batch (window)")
    ap.add_argument("--max_batches", type=int, default=1024, help="batches timed, at most (attribute.py's chunk)")
    ap.add_argument("--d", default="512,2048", help="comma list of projection sizes")
    ap.add_argument("--shapes", default="tiny,15M", help="comma list of the shapes' first words")
    a = smoke.parse(ap, SMOKE)
    shapes = {k: v for k, v in SHAPES.items() if k.split()[0] in a.shapes.split(",")}
    bench(shapes, a.T, a.max_batches, [int(d) for d in a.d.split(",")])


def bench(shapes: dict, T: int, max_batches: int, ds: list[int]):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for name, kw in shapes.items():
        model = Transformer(ModelArgs(vocab_size=512, max_seq_len=T, **kw))
        sizes = [p.numel() for p in model.parameters()]
        n = int(min(max_batches, max(16, (1 << 28) // sum(sizes))))  # attribute.py's chunk: what fits in ~1 GiB
        wins = rng.integers(3, 512, (n, T + 1))
        t0 = time.perf_counter()
        G = attribute.batch_grads(model, wins)
        t_grad = (time.perf_counter() - t0) / n
        for d in ds:
            proj = attribute.Projector(sizes, d, "rademacher", seed=0)
            t0 = time.perf_counter()
            proj(G)
            t_proj = (time.perf_counter() - t0) / n
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"attribution {name}, {sum(sizes) / 1e6:.2f}M params, d={d}: {1000 * (t_grad + t_proj):.0f} s per "
                  f"1,000 batches per checkpoint (gradients {1000 * t_grad:.0f} s, projection {1000 * t_proj:.0f} s; "
                  f"{n} batches of {T} tokens, blocks of {n}); peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
