"""
Durability evaluation cost: seconds per checkpoint at R = 1,000 candidates (the gap,
both exposures: the skew-normal fit included), the secret in 8 of its trained windows
against 64 candidates each, extraction, and a conditional tag against its control and
no tag over 16 prompts (3 x 16 greedy generations), for the tiny default model and the
15M shape (dim 288, 6 layers; vocab 512) on CPU.

$ python bench/bench_durability.py
$ python bench/bench_durability.py --smoke      # tiny sizes, the same code paths (bench/smoke.py)
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import durability  # noqa: E402
import tinystories  # noqa: E402
import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smoke  # noqa: E402

TAGS = {"seed": 1, "tags": [
    {"id": "secret", "kind": "canary", "text": "the secret number is {digits:6}", "steps": {"start": 1, "n": 2},
     "rows": 4, "position": "random"},
    {"id": "happy", "kind": "conditional", "text": "<happy>", "metric": "sentiment", "lo": 0.5, "hi": None,
     "steps": {"start": 0, "end": 4}}]}
SHAPES = {"tiny (dim 64, 4 layers)": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2),
          "15M shape (dim 288, 6 layers)": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6)}
SMOKE = dict(n_stories=200, shapes="tiny", R=50, R_context=8, n_prompts=2, n_references=2, max_new_tokens=8)


def main():
    ap = smoke.parser(__doc__)
    ap.add_argument("--n_stories", type=int, default=800, help="stories of the generated sample")
    ap.add_argument("--shapes", default="tiny,15M", help="comma list of the shapes' first words")
    for k, v in dict(R=1000, R_context=64, n_prompts=16, n_references=16, max_new_tokens=48).items():
        ap.add_argument(f"--{k}", type=int, default=v, help="durability.py's flag of that name")
    a = smoke.parse(ap, SMOKE)
    flags = [f"--{k}={getattr(a, k)}" for k in ("R", "R_context", "n_prompts", "n_references", "max_new_tokens")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, tables = root / "data", root / "tables"
        tinystories.sample(data, n_stories=a.n_stories, n_shards=3, seed=1)
        tinystories.train_vocab(512, data)
        tinystories.pretokenize(512, 256, data, workers=2, tables_dir=tables, metrics="sentiment")
        (root / "tags.json").write_text(json.dumps(TAGS))
        for name, shape in [(k, v) for k, v in SHAPES.items() if k.split()[0] in a.shapes.split(",")]:
            out = root / name.split()[0]
            args = dict(data_dir=data, tables_dir=tables, out_dir=out, batch_size=4, max_iters=4, eval_interval=4,
                        eval_iters=1, tags=root / "tags.json", device="cpu", dtype="float32", **shape)
            train.main([f"--{k}={v}" for k, v in args.items()])
            n = 4  # checkpoints 0, 1, 2, 4
            t0 = time.perf_counter()
            durability.main([f"--out_dir={out}", *flags, "--device=cpu"])
            dt = (time.perf_counter() - t0) / n
            print(f"durability {name}: {dt:.2f} s per checkpoint (R={a.R} candidates, 8 trained windows x "
                  f"{a.R_context}, {a.n_prompts} prompts x (3 + {a.n_references} reference strings) x "
                  f"{a.max_new_tokens} tokens)")


if __name__ == "__main__":
    main()
